"""The training loop shared by every method (and by teacher training).

AdamW (or SGD) with linear warm-up then cosine decay (per step, or per epoch as in the
authors' scripts: :func:`scheduled_lr`), mixed precision (``optim.precision``), gradient-norm clipping, validation
every epoch, test accuracy recorded at the best validation epoch (never used to select),
full-state checkpoints with exact resume, metrics as JSONL + CSV.

Candidates: every model the distiller lists in ``candidates()`` (the student first, then e.g. a
plain-CE shadow) is validated after every epoch; the trainer keeps each one's best-validation
record and weights, and at the end returns the one the distiller's ``select_candidate``
chooses (its weights are loaded into the student). Every candidate's numbers are recorded.

One commit point per epoch: ``latest.pt`` holds everything the run needs to continue (model,
optimiser, epoch, RNG, history, every candidate's best record AND best weights) and is written
atomically, once per epoch. ``metrics.jsonl``, ``metrics.csv``, ``best.pt`` (the student's best
trainable state) and ``best_<candidate>.pt`` are exports derived from it, written after it and
rewritten from it on resume; nothing is ever read back from them. So a process killed at any
moment resumes exactly where the last commit left it.

Data parallelism (``dist``, :mod:`ucmkd.engine.distributed`): every rank trains on its shard of
each global batch (the sampler's), under the strategy's gradient averaging. After each epoch
the trainer averages the logged values over the ranks, gives every rank rank 0's buffers
(batch-norm statistics) before evaluating, evaluates each split sharded across the ranks and
sums the counts (so every rank takes the same best-epoch and candidate decisions), lets the
distiller's end-of-epoch hook (calibration) run on every rank and then gives every rank rank
0's buffers and logged values. Only rank 0 writes (checkpoints, exports, metrics).
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..cache import atomic_path, clean_tmp, write_text
from ..config import OptimConfig
from ..data.base import ModalityData
from ..data.lazy import batch_rows
from ..data.pairing import PairingSampler
from ..errors import ConfigError, DataError, NumericalError
from . import distributed
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .precision import Precision

CHECKPOINT_FORMAT = 2     # latest.pt holds every candidate's best record and weights
from .shadow import CEShadow
from .strategies import STRATEGIES, is_diagnostic


def warmup_cosine(step: int, total: int, warmup: int, base_lr: float, min_lr: float) -> float:
    """Learning rate at ``step`` (0-based): linear from min_lr to base_lr over ``warmup``
    steps, then cosine from base_lr down to min_lr at ``total``."""
    if warmup > 0 and step < warmup:
        return min_lr + (base_lr - min_lr) * (step + 1) / warmup
    return _decay(min(1.0, (step - warmup) / max(1, total - warmup)), base_lr, min_lr, "cosine")


def _decay(frac: float, lr: float, min_lr: float, kind: str) -> float:
    """lr after the warm-up at fraction ``frac`` in [0, 1] of the decay phase."""
    if kind == "poly":
        return min_lr + (lr - min_lr) * (1.0 - frac) ** 0.9
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * frac))


def scheduled_lr(optim: OptimConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate of the 0-based ``step`` under ``optim``'s schedule.

    ``schedule_unit: step`` with ``lr_decay: cosine`` is :func:`warmup_cosine` over steps.
    ``schedule_unit: epoch`` holds the lr for a whole epoch e (the authors' scripts: torch
    ``LinearLR(start_factor=min_lr/lr, total_iters=W)`` then ``CosineAnnealingLR(T_max=E-W,
    eta_min=min_lr)`` in a ``SequentialLR`` stepped once per epoch): ``min_lr + (lr - min_lr) e / W``
    for e < W (epoch 0 runs at min_lr), then ``min_lr + (lr - min_lr) (1 + cos(pi (e-W)/(E-W))) / 2``.
    ``lr_decay: poly`` replaces the cosine by ``min_lr + (lr - min_lr) (1 - (t-W)/(T-W))^0.9``
    (the scripts' ``adjust_lr`` with floor min_lr).
    """
    lr, lo = optim.lr, optim.min_lr
    if optim.schedule_unit == "epoch":
        t, total, warm = step // max(1, steps_per_epoch), optim.epochs, optim.warmup_epochs
        if t < warm:
            return lo + (lr - lo) * t / warm
    else:
        t, total, warm = step, optim.epochs * steps_per_epoch, optim.warmup_epochs * steps_per_epoch
        if t < warm:
            return lo + (lr - lo) * (t + 1) / warm
    return _decay(min(1.0, (t - warm) / max(1, total - warm)), lr, lo, optim.lr_decay)


def build_optimizer(params, optim: OptimConfig) -> torch.optim.Optimizer:
    """``torch.optim.AdamW(lr, weight_decay)`` or ``torch.optim.SGD(lr, momentum, weight_decay)``
    (SGD's weight decay is the coupled L2 term) for ``optim.optimizer``."""
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    if optim.optimizer == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    raise ConfigError(f"optimizer: unknown value {optim.optimizer!r}; choose one of adamw, sgd")


@torch.no_grad()
def evaluate(model: torch.nn.Module, x, y: torch.Tensor, device="cpu",
             batch_size: int = 1024, dist: Optional[distributed.DataParallel] = None) -> tuple[float, float]:
    """Accuracy in [0, 1] and mean cross-entropy of ``model`` (logits) on (x [N, ...], y [N]).
    ``x`` is a tensor or a lazily read split (:class:`ucmkd.data.lazy.LazyArray`), read in
    chunks of ``batch_size`` items (fewer for large items: :func:`ucmkd.data.lazy.batch_rows`).
    With ``dist``, every rank evaluates its contiguous share of the items and the sums are
    all-reduced: every rank returns the same numbers."""
    n = len(y)
    lo, hi = (0, n) if dist is None else (n * dist.rank // dist.world_size, n * (dist.rank + 1) // dist.world_size)
    was = model.training
    model.eval()
    correct, loss = 0, 0.0
    batch_size = batch_rows(tuple(x.shape), batch_size)
    for i in range(lo, hi, batch_size):
        j = min(i + batch_size, hi)
        xb, yb = x[i:j].to(device), y[i:j].to(device)
        logits = model(xb)
        correct += int((logits.argmax(1) == yb).sum())
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
    model.train(was)
    if dist is not None:
        correct, loss = distributed.sum_over_ranks(dist, [correct, loss], device)
        correct = int(round(correct))
    return correct / max(1, n), loss / max(1, n)


@dataclass
class FitResult:
    best_epoch: int
    val_acc: float
    test_acc: float           # at the best validation epoch
    last_val_acc: float
    last_test_acc: float
    epochs: int
    seconds: float
    history: list = field(default_factory=list)
    selected: str = "student"   # the candidate the distiller chose (``select_candidate``)
    candidates: dict = field(default_factory=dict)   # name -> best {epoch, val_acc, val_loss, test_acc}
    runtime: dict = field(default_factory=dict)      # what the run ran with, read inside it (:meth:`Trainer.runtime`)


def _clone(state: dict) -> dict:
    """A detached copy of a (nested) state dict."""
    return {k: _clone(v) if isinstance(v, dict) else v.detach().clone() for k, v in state.items()}


def _blank() -> dict:
    return {"epoch": -1, "val_acc": -1.0, "val_loss": float("inf"), "test_acc": float("nan")}


class Trainer:
    """Train ``distiller`` on batches from ``sampler``; evaluate its student on ``data`` splits.

    Args:
        distiller: a :class:`~ucmkd.methods.Distiller`.
        sampler: a :class:`~ucmkd.data.PairingSampler`.
        data: the student modality (its ``val``/``test`` splits are evaluated).
        optim: optimiser/schedule config.
        run_dir: where checkpoints and metrics go (None: keep nothing on disk).
        config_hash: identifies the run; a ``latest.pt`` from another config is not resumed.
        dist: this process's data-parallel group (None: one process); the sampler must shard
            the global batches for the same group.
        logger: optional hooks (e.g. :class:`~ucmkd.engine.tb_logger.TensorBoardLogger`):
            ``start(step, distiller)`` after any resume, ``step(step, lr, logs)`` after every
            step, ``epoch(step, row, candidates)`` before each epoch's commit (give it to the
            writing process only).
    """

    def __init__(self, distiller, sampler: PairingSampler, data: ModalityData, optim: OptimConfig,
                 run_dir: Optional[Path] = None, config_hash: str = "", device: str = "cpu",
                 progress: bool = False, desc: str = "", dist: Optional[distributed.DataParallel] = None,
                 logger=None):
        world = 1 if dist is None else dist.world_size
        if getattr(sampler, "world_size", 1) != world:
            raise ConfigError(f"trainer: the sampler shards batches for {getattr(sampler, 'world_size', 1)} "
                              f"processes, the run has {world}")
        self.shadow = CEShadow.attach(distiller)     # a plain-CE shadow, when the method's params enable one
        self.distiller = distiller.to(device)
        self.sampler, self.data, self.optim = sampler, data, optim
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.config_hash, self.device, self.desc = config_hash, device, desc
        self.dist = dist
        self.writer = dist is None or dist.is_main      # the one process that writes (and shows progress)
        self.progress = progress and self.writer
        self.logger = logger if self.writer else None
        self.optimizer = build_optimizer(distiller.trainable_parameters(), optim)
        self.strategy = STRATEGIES.get(distiller.strategy)(distiller, self.optimizer, optim.clip_norm,
                                                           precision=Precision(optim.precision, device), dist=dist,
                                                           shadow=self.shadow)
        self.total_steps = optim.epochs * len(sampler)
        self.warmup_steps = optim.warmup_epochs * len(sampler)
        self.step_count = 0
        self.epoch = 0                 # epochs completed
        self.history: list = []
        self.best: dict[str, dict] = {}          # candidate -> best-validation record
        self.best_states: dict[str, dict] = {}   # candidate -> its weights at that record
        self._eval = {s: data.split(s) for s in ("val", "test")}

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        """Everything a resumed run needs (the content of ``latest.pt``)."""
        return {"format": CHECKPOINT_FORMAT, "model": self.distiller.trainable_state_dict(),
                "optimizer": self.optimizer.state_dict(), "strategy": self.strategy.state_dict(),
                "epoch": self.epoch, "step": self.step_count,
                "best": {k: dict(v) for k, v in self.best.items()}, "best_states": self.best_states,
                "history": list(self.history), "config_hash": self.config_hash, "rng": rng_state()}

    def load_state(self, st: dict, source: str = "checkpoint") -> None:
        if self.config_hash and st.get("config_hash") != self.config_hash:
            raise DataError(f"{source}: written by a different config ({st.get('config_hash')} != "
                            f"{self.config_hash}); use a fresh run directory")
        if st.get("format") != CHECKPOINT_FORMAT:
            raise DataError(f"{source}: checkpoint format {st.get('format', 1)} (an older ucmkd); this "
                            f"version writes format {CHECKPOINT_FORMAT}: use a fresh run directory")
        self.distiller.load_trainable_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.strategy.load_state_dict(st.get("strategy", {}))    # the fp16 loss scale (absent before it was saved)
        self.epoch, self.step_count = st["epoch"], st["step"]
        self.best = {k: dict(v) for k, v in st["best"].items()}
        self.best_states = st["best_states"]
        self.history = list(st["history"])
        set_rng_state(st["rng"])

    def maybe_resume(self) -> bool:
        """Continue from ``latest.pt`` if there is one (and rewrite the exports from it). Under
        data parallelism rank 0 reads it and every rank gets its content (only rank 0 needs the
        run directory)."""
        if self.run_dir is None:
            return False
        path = self.run_dir / "latest.pt"

        def read() -> Optional[dict]:
            if not path.is_file():
                return None
            clean_tmp(self.run_dir)
            return load_checkpoint(path)

        st = distributed.on_rank_zero(self.dist, read)
        if st is None:
            return False
        self.load_state(st, str(path))
        if self.writer:
            self._export(list(self.best))
        return True

    # ------------------------------------------------------------------ loop
    def _set_lr(self) -> float:
        lr = scheduled_lr(self.optim, self.step_count, len(self.sampler))
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def fit(self, stop_after: Optional[int] = None) -> FitResult:
        """Train up to ``optim.epochs`` (resuming from ``latest.pt`` if present); ``stop_after``
        stops after that many epochs in total (to simulate an interruption)."""
        t0 = time.time()
        runtime = self.runtime()
        self.maybe_resume()
        if self.logger is not None:
            self.logger.start(self.step_count, self.distiller)
        end = self.optim.epochs if stop_after is None else min(stop_after, self.optim.epochs)
        bar = tqdm(range(self.epoch, end), desc=self.desc or self.distiller.name, leave=False,
                   disable=not self.progress, initial=self.epoch, total=self.optim.epochs)
        for ep in bar:
            self.distiller.train()
            self.distiller.progress = ep / self.optim.epochs
            sums: dict = {}
            for step, batch in enumerate(self.sampler.epoch(ep)):
                lr = self._set_lr()
                try:
                    with distributed.active(self.dist):
                        logs = self.strategy.step(self.distiller.augment_labelled(batch.to(self.device)))
                except NumericalError as e:
                    where = f"epoch {ep}, step {step}"
                    keep = (f"; the last good state is {self.run_dir / 'latest.pt'} (epoch {self.epoch})"
                            if self.run_dir is not None and self.epoch > 0 else "")
                    raise NumericalError(f"{self.desc or self.distiller.name}: {e} at {where}{keep}") from None
                self.step_count += 1
                if self.logger is not None:      # under DDP: rank 0's shard (epoch rows: all ranks)
                    self.logger.step(self.step_count, lr, logs)
                for k, v in logs.items():
                    if not is_diagnostic(k):
                        sums[k] = sums.get(k, 0.0) + v
            self.epoch = ep + 1
            sums = distributed.mean_over_ranks(self.dist, sums)
            distributed.broadcast_buffers(self.dist, self._trainable_modules())
            row = {"epoch": self.epoch, "lr": lr, **{f"train_{k}": v / len(self.sampler) for k, v in sums.items()}}
            improved = []
            cands = {**self.distiller.candidates(), **(self.shadow.candidates() if self.shadow else {})}
            for name, model in cands.items():
                cur, better = self._validate(model, self.best.get(name, _blank()))
                prefix = "" if name == "student" else f"{name}_"
                row.update({f"{prefix}{k}": cur[k] for k in ("val_acc", "val_loss", "test_acc")})
                if better:
                    self.best[name] = cur
                    improved.append(name)
            row.update(self._end_epoch(row))
            self.history.append(row)
            for name in improved:   # weights after calibration (it may set the student's buffers)
                self.best_states[name] = _clone(self.distiller.trainable_state_dict() if name == "student"
                                                else cands[name].state_dict())
            if self.logger is not None:      # flushed before the commit: a resume never lacks them
                self.logger.epoch(self.step_count, row, list(cands))
            self._commit(improved)
            bar.set_postfix(val=f"{row['val_acc']:.3f}", best=f"{self.best['student']['val_acc']:.3f}")
        bar.close()
        last = self.history[-1] if self.history else {"val_acc": float("nan"), "test_acc": float("nan")}
        records = self.records()
        selected = self.selected()
        chosen = records[selected]
        return FitResult(best_epoch=chosen["epoch"], val_acc=chosen["val_acc"], test_acc=chosen["test_acc"],
                         last_val_acc=last["val_acc"], epochs=self.epoch,
                         last_test_acc=float("nan") if last["test_acc"] is None else last["test_acc"],
                         seconds=time.time() - t0, history=list(self.history), selected=selected,
                         candidates=records, runtime=runtime)

    def runtime(self) -> dict:
        """The settings this process trains with, read from the objects in use (not from the
        config): torch's intra-op ``threads``, the student's ``device``, the autocast
        ``precision``, the ``data_workers`` reading batches (0: this process reads them), the
        ``world_size`` and the ``logger`` (e.g. ``TensorBoardLogger``; None)."""
        param = next(self.distiller.student.parameters(), None)
        return {"threads": torch.get_num_threads(),
                "device": str(param.device) if param is not None else str(self.device),
                "precision": self.strategy.precision.name, "data_workers": getattr(self.sampler, "reader_workers", 0),
                "world_size": 1 if self.dist is None else self.dist.world_size,
                "logger": None if self.logger is None else type(self.logger).__name__}

    def _validate(self, model, best: dict) -> tuple[dict, bool]:
        """Validate ``model`` after the current epoch: ({epoch, val_acc, val_loss, test_acc},
        whether it beats ``best`` on (val acc, -val loss)). The test split is only read where it
        is reported, at a new best validation epoch and at the last epoch (never to select)."""
        val_acc, val_loss = evaluate(model, *self._eval["val"], self.device, dist=self.dist)
        improved = (val_acc, -val_loss) > (best["val_acc"], -best["val_loss"])
        test_acc = (evaluate(model, *self._eval["test"], self.device, dist=self.dist)[0]
                    if improved or self.epoch == self.optim.epochs else None)
        return {"epoch": self.epoch, "val_acc": val_acc, "val_loss": val_loss, "test_acc": test_acc}, improved

    def _end_epoch(self, row: dict) -> dict:
        """The distiller's end-of-epoch hook (calibration on the validation split, decisions from
        the epoch's row). Under data parallelism every rank runs it (a method may use
        collectives in it) and rank 0's outcome is kept everywhere: its buffers and its logged
        values."""
        logs = self.distiller.end_epoch(*self._eval["val"], dict(row))
        if self.shadow is not None:
            logs.update(self.shadow.end_epoch(len(self._eval["val"][1]), self.distiller.progress, row))
        distributed.broadcast_buffers(self.dist, self._trainable_modules())
        return distributed.broadcast_object(self.dist, logs)

    def _trainable_modules(self) -> list:
        return [self.distiller.student, self.distiller.extra]

    def records(self) -> dict[str, dict]:
        """Each candidate's best-validation record, the student first."""
        names = ["student"] + [k for k in self.best if k != "student"]
        return {k: dict(self.best.get(k, _blank())) for k in names}

    def selected(self) -> str:
        """The candidate the distiller chooses from :meth:`records`."""
        records = self.records()
        sel = self.distiller.select_candidate(records)
        if self.shadow is not None:
            sel = self.shadow.select(records, sel)
        if sel not in records:
            raise DataError(f"method {self.distiller.name!r}: select_candidate chose {sel!r}, not one of the "
                            f"validated candidates {sorted(records)}")
        return sel

    def restore_best(self) -> None:
        """Load the selected candidate's best-validation weights into the student: the student's
        best trainable state, then, if another candidate is selected, that one's weights (from
        memory, or from the committed ``latest.pt`` of a finished run)."""
        if not self.best_states:
            self.maybe_resume()
        if "student" in self.best_states:
            self.distiller.load_trainable_state_dict(self.best_states["student"])
        sel = self.selected()
        if sel != "student" and sel in self.best_states:
            self.distiller.student.load_state_dict(self.best_states[sel])

    # ------------------------------------------------------------------ disk
    def _commit(self, improved: list) -> None:
        """The epoch's one commit point (``latest.pt``), then the exports derived from it (rank 0
        only: every rank holds the same state)."""
        if self.run_dir is None or not self.writer:
            return
        save_checkpoint(self.state(), self.run_dir / "latest.pt")
        self._export(improved)

    def _export(self, candidates: list) -> None:
        """Rewrite the metrics files and the best-weight files of ``candidates`` (each written
        atomically; derived from the committed state, never read back)."""
        for name in candidates:
            if name in self.best_states:
                path = self.run_dir / ("best.pt" if name == "student" else f"best_{name}.pt")
                save_checkpoint({"model": self.best_states[name], "best": dict(self.best[name]),
                                 "config_hash": self.config_hash}, path)
        write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in self.history))
        keys = sorted({k for row in self.history for k in row}, key=lambda k: (k != "epoch", k))
        with atomic_path(self.run_dir / "metrics.csv") as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                w.writerows(self.history)
