"""Mixed precision of a training run (``optim.precision``): ``fp32``, ``bf16`` or ``fp16``.

The strategies run the distiller's forwards (student, teacher, projector) under
``torch.autocast`` on the run's device type; parameters, optimiser state and gradients stay
float32. The optimal-transport solve is kept in float32 (the feature-alignment loss switches
autocast off around itself, :class:`ucmkd.methods.fa_only.FullPrecisionFA`), and the paper
methods compute their cross-entropies on float32 logits.

``fp16`` needs a CUDA device: its gradients are scaled by a :class:`torch.amp.GradScaler`,
which skips a step whose unscaled gradients overflow and lowers the scale. ``bf16`` has the
float32 exponent range and needs no scaler; on CPU it runs the matmuls and convolutions in
bfloat16 (PyTorch's CPU autocast lists).
"""
from __future__ import annotations

import contextlib

import torch

from ..errors import ConfigError
from ..losses.numerics import at_least_fp32, full_precision  # noqa: F401  (re-exported)

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """``autocast()`` context for the forwards and the gradient scaling of one run.

    Args:
        name: ``fp32`` | ``bf16`` | ``fp16``.
        device: the run's device (``cpu``, ``cuda``, ``cuda:1``...); autocast uses its type.
    """

    def __init__(self, name: str = "fp32", device="cpu"):
        if name not in DTYPES:
            raise ConfigError(f"precision: unknown value {name!r}; choose one of {', '.join(DTYPES)}")
        self.name, self.dtype = name, DTYPES[name]
        self.device_type = torch.device(device).type
        if name == "fp16" and self.device_type != "cuda":
            raise ConfigError(f"precision fp16 needs a CUDA device (its GradScaler is CUDA-only), the run is on "
                              f"{device!r}: use precision bf16 or fp32 there")
        self.scaler = torch.amp.GradScaler("cuda") if name == "fp16" else None

    def autocast(self):
        """Context for the forwards: ``torch.autocast(device_type, dtype)``, or nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def loss_scale(self) -> float:
        """Factor the loss is multiplied by before differentiation (1 without a scaler)."""
        return 1.0 if self.scaler is None else float(self.scaler.get_scale())

    def state_dict(self) -> dict:
        return {} if self.scaler is None else {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
