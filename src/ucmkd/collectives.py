"""The collectives a method uses on the global batch under data parallelism, and the
:class:`DataParallel` description of a process's place in the job: the bottom layer that
methods and losses import (the engine, :mod:`ucmkd.engine.distributed`, joins the process group
and makes a group :func:`active` around its training steps; outside one, every collective here
returns its input).

- :func:`gather`: every rank's rows of one or more tensors, concatenated in rank order (the
  global batch, in the single-process order), without gradient, in one collective.
- :func:`gather_with_grad`: the same for one tensor whose gradient must reach each rank's own
  rows. Backward sums the gathered tensor's gradient over ranks (a reduce-scatter): every rank
  computes the same global loss from it, so each rank's rows receive N times their gradient,
  and DDP's mean over ranks divides the N back out. (``torch.distributed.nn.functional.
  all_gather`` has the same semantics; it is deprecated in PyTorch 2.13 and had a
  non-contiguous-gradient bug, pytorch #120386: inputs and gradients are made contiguous here.)
- :func:`local_rows`: this rank's rows of a global tensor; :func:`local_masked_rows`: its rows
  among the rows a global mask picks.
Every collective adds its payload to :data:`COMM` (bytes each rank passes in), for benchmarks.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

#: Bytes each rank passed to tensor collectives, by kind (``gather``, ``gather_grad``: forward
#: and backward, ``all_reduce``, ``broadcast``), since the last :func:`reset_comm` (DDP's own
#: gradient all-reduce is not counted here: its payload is the trainable gradients' size).
COMM: dict[str, int] = {}


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel job."""

    rank: int          # 0 .. world_size - 1
    world_size: int
    local_rank: int    # rank on this node (its CUDA device index)
    backend: str       # gloo | nccl

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, metrics and results."""
        return self.rank == 0


_ACTIVE: Optional[DataParallel] = None     # the group the collectives act on


# --------------------------------------------------------------------------- the active group
@contextlib.contextmanager
def active(dp: Optional[DataParallel]) -> Iterator[None]:
    """Make ``dp`` the group of the method-side collectives inside the block (the trainer's
    training steps); None: they stay no-ops."""
    global _ACTIVE
    prev, _ACTIVE = _ACTIVE, dp
    try:
        yield
    finally:
        _ACTIVE = prev


def current() -> Optional[DataParallel]:
    """The active data-parallel group (None outside a distributed training step)."""
    return _ACTIVE


def world_size() -> int:
    """Number of ranks sharing the current global batch (1 outside a distributed step)."""
    return _ACTIVE.world_size if _ACTIVE is not None else 1


def reset_comm() -> None:
    COMM.clear()


def _count(kind: str, tensors: Iterable[torch.Tensor]) -> None:
    COMM[kind] = COMM.get(kind, 0) + sum(t.numel() * t.element_size() for t in tensors)


# --------------------------------------------------------------------------- packing
def _pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The bytes of ``tensors`` (any dtypes) in one flat uint8 tensor."""
    return torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def _unpack(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of :func:`_pack` on stacked copies: flat [R, n_bytes] -> for each tensor of shape
    S in ``like``, its R copies [R, *S] (same dtype)."""
    out, off = [], 0
    for t in like:
        n = t.numel() * t.element_size()
        part = flat[:, off:off + n].reshape(-1).clone()      # own storage: aligned for any dtype
        out.append(part.view(t.dtype).reshape(flat.shape[0], *t.shape))
        off += n
    return out


# --------------------------------------------------------------------------- method-side collectives
def _all_gather_into(out: torch.Tensor, x: torch.Tensor) -> None:
    # PyTorch 2.13 renamed all_gather_into_tensor (which now warns) to all_gather_single
    getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(out, x)


def _reduce_scatter_into(out: torch.Tensor, g: torch.Tensor) -> None:
    getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)(out, g, op=dist.ReduceOp.SUM)


def gather(*tensors: torch.Tensor):
    """Every rank's rows of each tensor, concatenated in rank order: [b, ...] -> [N b, ...]
    (no gradient). All tensors travel in one collective; each must have the same shape and
    dtype on every rank (the sampler's shards do). Returns one tensor for one argument, else a
    tuple; outside a distributed step, the inputs themselves."""
    dp = _ACTIVE
    if dp is None:
        return tensors[0] if len(tensors) == 1 else tensors
    if any(t.ndim == 0 for t in tensors):
        raise ValueError("gather: tensors must have a batch dimension, got a 0-dim tensor")
    flat = _pack(tensors)
    out = flat.new_empty(dp.world_size * flat.numel())
    _count("gather", [flat])
    _all_gather_into(out, flat)
    res = [r.reshape(-1, *t.shape[1:]) for r, t in zip(_unpack(out.view(dp.world_size, -1), tensors), tensors)]
    return res[0] if len(res) == 1 else tuple(res)


class _GatherWithGrad(torch.autograd.Function):
    """[b, ...] -> [N b, ...]; backward: reduce-scatter (sum) of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, world: int) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _count("gather_grad", [x])
        _all_gather_into(out, x)
        ctx.shape = x.shape
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g = g.contiguous()
        out = g.new_empty(ctx.shape)
        _count("gather_grad", [g])
        _reduce_scatter_into(out, g)
        return out, None


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``x`` [b, ...] -> [N b, ...], differentiable: the gradient of the
    result, summed over ranks, flows back into each rank's own rows (module docstring: every
    rank computes the same global loss, DDP's mean over ranks undoes the sum). Outside a
    distributed step: ``x``."""
    dp = _ACTIVE
    return x if dp is None else _GatherWithGrad.apply(x, dp.world_size)


def local_rows(x: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global tensor [N b, ...] -> [b, ...] (rows [r b, (r + 1) b))."""
    dp = _ACTIVE
    if dp is None:
        return x
    n = x.shape[0]
    if n % dp.world_size:
        raise ValueError(f"local_rows: {n} rows cannot be split into {dp.world_size} equal shards")
    b = n // dp.world_size
    return x[dp.rank * b:(dp.rank + 1) * b]


def local_masked_rows(selected: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """This rank's rows of ``selected = x[mask]``, where ``mask`` [N b] (bool) picks rows of a
    global tensor: the picked rows that lie in this rank's shard, in order."""
    dp = _ACTIVE
    if dp is None:
        return selected
    b = mask.shape[0] // dp.world_size
    start = int(mask[:dp.rank * b].sum())
    return selected[start:start + int(mask[dp.rank * b:(dp.rank + 1) * b].sum())]


__all__ = ["DataParallel", "COMM", "active", "current", "world_size", "reset_comm", "gather", "gather_with_grad",
           "local_rows", "local_masked_rows"]
