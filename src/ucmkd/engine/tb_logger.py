"""TensorBoard logging of a run (``logging.tensorboard: true``; ``pip install ucmkd[tensorboard]``).

Tags, all against the global training step (1 = after the first optimiser step):

- ``train/<name>``: every named loss term and metric the distiller returns for a step (``ce``,
  ``kd``, ``fa``, ``pl_mask``, ...), every ``logging.every_steps`` steps;
- ``train/lr``: the learning rate of that step;
- ``<tag>``: each per-step diagnostic the distiller returns for those steps, a metric whose name
  has a ``/`` (:func:`~ucmkd.engine.strategies.is_diagnostic`), under its own name; the logger
  asks for them (``distiller.step_diagnostics``). E.g. ``ot/fa/iterations``,
  ``ot/fa/plan_entropy``: the Sinkhorn iterations run and the plan's entropy (nats) of the OT
  feature-alignment loss ``fa``, on the steps it ran;
- ``val/<candidate>/acc``, ``val/<candidate>/loss``: after every epoch, each candidate the
  trainer validates (``student``, and e.g. ``fallback``, ucmkd's CE shadow), at the epoch's last
  step; ``epoch/<name>``: the epoch's other numbers (e.g. ``pl_threshold``, ``shadow_active``);
- ``diagnostics/<name>``: the alignment diagnostics of the returned student and
  ``diagnostics/selected_is_student``, once, at the step after the last one.

The test split is not logged (it is in ``metrics.jsonl``). Resume: a resumed run opens a new
event file with ``purge_step`` = the resumed step + 1, so TensorBoard drops whatever the
interrupted process logged after its last commit, and every step appears once. Event files are
flushed before each epoch's commit, so nothing committed is missing after a kill.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from .strategies import is_diagnostic


def require_tensorboard():
    """``torch.utils.tensorboard.SummaryWriter``, or a ConfigError saying how to install it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError(f"logging.tensorboard=true needs the optional package 'tensorboard' ({e}); install "
                          f"it with `pip install ucmkd[tensorboard]` (or `pip install tensorboard`)") from None
    return SummaryWriter


class TensorBoardLogger:
    """Trainer hooks writing the tags of the module docstring to ``log_dir``."""

    def __init__(self, log_dir: str | Path, every_steps: int = 1):
        self.SummaryWriter = require_tensorboard()
        self.log_dir = Path(log_dir)
        self.every_steps = every_steps
        self.writer = None
        self.distiller = None

    @classmethod
    def for_run(cls, cfg, run_dir: Optional[Path]) -> "TensorBoardLogger":
        """The logger of ``cfg`` (a :class:`~ucmkd.config.LoggingConfig`) for a run in ``run_dir``."""
        if cfg.tensorboard_dir is None and run_dir is None:
            raise ConfigError("logging.tensorboard=true needs a run directory (run_dir, --run-dir) or "
                              "logging.tensorboard_dir")
        return cls(cfg.tensorboard_dir if cfg.tensorboard_dir is not None else Path(run_dir) / "tb",
                   cfg.every_steps)

    # ------------------------------------------------------------------ trainer hooks
    def start(self, step: int, distiller) -> None:
        """Open the event file; ``step``: the step the run (re)starts from (0: a fresh run)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.writer = self.SummaryWriter(str(self.log_dir), purge_step=step + 1 if step > 0 else None)
        self.distiller = distiller
        distiller.step_diagnostics = True

    def step(self, step: int, lr: float, logs: dict) -> None:
        if step % self.every_steps:
            return
        w = self.writer
        w.add_scalar("train/lr", lr, step)
        for k, v in logs.items():
            w.add_scalar(k if is_diagnostic(k) else f"train/{k}", v, step)

    def epoch(self, step: int, row: dict, candidates: list) -> None:
        w = self.writer
        used = {"epoch", "lr"}
        for name in candidates:
            prefix = "" if name == "student" else f"{name}_"
            for k in ("val_acc", "val_loss"):
                if row.get(prefix + k) is not None:
                    w.add_scalar(f"val/{name}/{k[4:]}", row[prefix + k], step)
            used |= {prefix + k for k in ("val_acc", "val_loss", "test_acc")}
        for k, v in row.items():
            if k not in used and not k.startswith("train_") and isinstance(v, (int, float)):
                w.add_scalar(f"epoch/{k}", v, step)
        w.flush()

    def final(self, step: int, diagnostics: dict, selected: str) -> None:
        w = self.writer
        for k, v in diagnostics.items():
            if isinstance(v, (int, float)) and not math.isnan(v):
                w.add_scalar(f"diagnostics/{k}", v, step + 1)
        w.add_scalar("diagnostics/selected_is_student", float(selected == "student"), step + 1)
        w.flush()

    def close(self) -> None:
        if self.distiller is not None:
            self.distiller.step_diagnostics = False
            self.distiller = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


__all__ = ["TensorBoardLogger", "require_tensorboard"]
