"""Domain-shift corruption of training inputs, per input kind (the authors' stress preset).

Images: brightness/contrast jitter, Gaussian blur and random erasing, scaled by ``level``.
Signals and vectors: additive Gaussian noise with std ``0.05 + 0.20 * level`` (in units of
the standardised input).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def corrupt(x: torch.Tensor, kind: str, level: float, gen: torch.Generator) -> torch.Tensor:
    """Return a corrupted copy of batch ``x`` ([B, *input_shape]); ``level`` in [0, 1]."""
    if level <= 0:
        return x
    if kind == "image":
        return _corrupt_image(x, level, gen)
    noise = torch.randn(x.shape, generator=gen, dtype=x.dtype) * (0.05 + 0.20 * level)
    return x + noise.to(x.device)


def _corrupt_image(x: torch.Tensor, level: float, gen: torch.Generator) -> torch.Tensor:
    b, c, h, w = x.shape
    dev = x.device

    def rand(*shape):
        return torch.rand(shape, generator=gen).to(dev)

    # brightness / contrast jitter ("colour jitter" for grayscale or per channel)
    contrast = 1.0 + level * 0.8 * (2 * rand(b, 1, 1, 1) - 1)
    bright = level * 0.8 * (2 * rand(b, 1, 1, 1) - 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + bright
    # Gaussian blur, sigma grows with level
    sigma = 0.3 + 1.2 * level
    k = torch.arange(-1, 2, dtype=x.dtype, device=dev)
    k1 = torch.exp(-(k ** 2) / (2 * sigma ** 2))
    k1 = k1 / k1.sum()
    kernel = (k1[:, None] * k1[None, :]).expand(c, 1, 3, 3)
    x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=c)
    # random erasing of a square patch, applied with probability = level
    side = max(1, int(round(min(h, w) * (0.25 + 0.25 * level))))
    erase = rand(b) < level
    top = (rand(b) * (h - side + 1)).long()
    left = (rand(b) * (w - side + 1)).long()
    rows = torch.arange(h, device=dev)[None, :, None]
    cols = torch.arange(w, device=dev)[None, None, :]
    mask = ((rows >= top[:, None, None]) & (rows < top[:, None, None] + side)
            & (cols >= left[:, None, None]) & (cols < left[:, None, None] + side) & erase[:, None, None])
    return x.masked_fill(mask[:, None], 0.0)
