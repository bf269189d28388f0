"""The params a method mixes into its ``Params`` to enable the trainer's validation-gated plain-CE
shadow (:mod:`ucmkd.engine.shadow`)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ranged


@dataclass
class FallbackParams:
    """The shadow's settings, as method params (a method's ``Params`` inherits them)."""

    fallback: bool = False      # validation-gated fallback to a plain-CE shadow
    gate_z: float = ranged(0.5, 0.0)          # fall back when the shadow validates better by > gate_z standard errors
    retire_after: float = ranged(0.2, 0.0, 1.0)   # the CE shadow may retire once this fraction of training is done ...
    retire_z: float = ranged(3.0, 0.0)        # ... when the student leads it by > retire_z standard errors (val acc) ...
    retire_epochs: int = ranged(2, 1)         # ... in this many consecutive epochs (then the student is final)
