"""The pairing sampler: how each training batch joins student items with teacher-modality items.

Modes (``PairingConfig.mode``):
- ``class-matched`` (default): each student item (x_b, y) is joined with a random teacher
  item of the same label y (the authors' unpaired protocol);
- ``unpaired``: the teacher batch is drawn independently of the student labels;
- ``paired``: each student item is joined with its TRUE pair (datasets with ``pair_id`` only).
Stress options, combinable with the modes: marginal mismatch (``mismatch_ratio`` r: each
class pool is split, the student keeps a share r and the teacher the disjoint rest), label
imbalance (``imbalance_rho`` on one side: class of rank c keeps (1/rho)^(c/(K-1))), domain
shift (``shift_level``: corruption of training inputs) and a student label budget
(``label_budget`` k per class; the rest of the student pool becomes unlabelled data).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import DataConfig, PairingConfig, check_ranges
from ..errors import ConfigError, DataError
from .base import ModalityData, check_compatible
from .corruption import corrupt

MODES = ("class-matched", "unpaired", "paired")
SIDES = ("teacher", "student")

#: Named presets: ``pairing.preset``-style shortcuts as dotted overrides of ``pairing``.
PRESETS: dict[str, dict] = {
    "class-matched": {"mode": "class-matched"},
    "unpaired": {"mode": "unpaired"},
    "paired": {"mode": "paired"},
    "mismatch-mild": {"mismatch_ratio": 0.7},
    "mismatch-moderate": {"mismatch_ratio": 0.5},
    "mismatch-hard": {"mismatch_ratio": 0.3},
    "imbalance-5": {"imbalance_rho": 5.0},
    "imbalance-10": {"imbalance_rho": 10.0},
    "imbalance-50": {"imbalance_rho": 50.0},
    "shift-0.3": {"shift_level": 0.3},
    "shift-0.5": {"shift_level": 0.5},
    "shift-0.8": {"shift_level": 0.8},
}


@dataclass
class Batch:
    """One training batch. xs [B, *S], ys [B]; xt [B', *T] or None; yt [B'] or None; xu [B_u, *S]
    or None; it [B'] int64 or None: the teacher items' indices in the teacher modality, set when
    ``xt`` holds those items unchanged (no augmentation or shift), so that their frozen-teacher
    outputs can be served from a table (:class:`ucmkd.engine.teacher_outputs.TeacherOutputs`).
    seed: this batch's augmentation seed (from the run seed, epoch, step and rank; None: drawn
    from the global torch RNG), see :func:`ucmkd.augment.batch_generator`."""

    xs: torch.Tensor
    ys: torch.Tensor
    xt: Optional[torch.Tensor] = None
    yt: Optional[torch.Tensor] = None
    xu: Optional[torch.Tensor] = None
    it: Optional[torch.Tensor] = None
    seed: Optional[int] = None

    def to(self, device) -> "Batch":
        def mv(t):
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(mv(self.xs), mv(self.ys), mv(self.xt), mv(self.yt), mv(self.xu), mv(self.it), self.seed)


@dataclass
class BatchPlan:
    """The items of one batch: student si [B], teacher ti [B'] or None, unlabelled ui [B_u] or
    None (int64 indices into the modalities)."""

    si: np.ndarray
    ti: Optional[np.ndarray] = None
    ui: Optional[np.ndarray] = None


class BatchReader(Dataset):
    """``reader[plan]`` = the inputs and labels of a :class:`BatchPlan`: (xs, ys, xt, yt, xu),
    None where the plan has no such part. Reads ``modality.x[idx]``, so a lazy modality reads only
    the rows of the batch (a DataLoader's workers each read whole batches, the plans reaching
    them through the loader's sampler, :class:`PlanSource`)."""

    def __init__(self, student: ModalityData, teacher: Optional[ModalityData]):
        self.student, self.teacher = student, teacher

    def __getitem__(self, p: BatchPlan) -> tuple:
        s, t = self.student, self.teacher
        xt = yt = xu = None
        if p.ti is not None:
            xt, yt = t.x[p.ti], t.y[p.ti]
        if p.ui is not None:
            xu = s.x[p.ui]
        return s.x[p.si], s.y[p.si], xt, yt, xu


class PlanSource(Sampler):
    """The DataLoader's sampler: yields the current epoch's plans (set before each epoch), so one
    loader with persistent workers serves every epoch."""

    def __init__(self):
        self.plans: list = []

    def __iter__(self):
        return iter(self.plans)

    def __len__(self) -> int:
        return len(self.plans)


def validate_pairing(cfg: PairingConfig) -> None:
    """The field ranges (:func:`ucmkd.config.check_ranges`), the names and their combinations."""
    check_ranges(cfg, "pairing")
    if cfg.mode not in MODES:
        raise ConfigError(f"unknown pairing.mode {cfg.mode!r}; known: {', '.join(MODES)}")
    if cfg.imbalance_side not in SIDES:
        raise ConfigError(f"pairing.imbalance_side must be one of {SIDES}, got {cfg.imbalance_side!r}")
    if cfg.shift_side not in SIDES + ("both",):
        raise ConfigError(f"pairing.shift_side must be teacher, student or both, got {cfg.shift_side!r}")
    if cfg.mode == "paired" and cfg.mismatch_ratio is not None:
        raise ConfigError("pairing.mode 'paired' cannot be combined with pairing.mismatch_ratio "
                          "(disjoint pools have no true pairs)")


def loader_options(data: DataConfig, device) -> dict:
    """The :class:`PairingSampler` options that read batches of lazy modalities:
    ``data.workers``, ``data.prefetch``, pinned memory on CUDA."""
    return {"workers": data.workers, "prefetch": data.prefetch, "pin_memory": str(device).startswith("cuda")}


def imbalance_keep(num_classes: int, rho: float) -> np.ndarray:
    """Fraction kept per class rank c: (1/rho)^(c/(K-1)), [K]."""
    return (1.0 / rho) ** (np.arange(num_classes) / max(num_classes - 1, 1))


#: the file of a run directory that holds its sampler's draw (:meth:`PairingSampler.save_draw`)
DRAW_FILE = "draw.npz"


def read_draw(path) -> Optional[dict]:
    """The draw saved by :meth:`PairingSampler.save_draw` (``labelled``, ``unlabelled``,
    ``teacher_pool`` (None when no teacher items were drawn) as int64 arrays), or None when
    ``path`` does not exist (a run written before runs recorded it)."""
    from pathlib import Path

    if not Path(path).is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        out = {k: z[k] for k in ("labelled", "unlabelled", "teacher_pool")}
        if not int(z["has_teacher"]):
            out["teacher_pool"] = None
    return out


class PairingSampler:
    """Yields :class:`Batch` es for one epoch at a time; every epoch is seeded by (seed, epoch),
    so a resumed run draws the same batches as an uninterrupted one.

    Data parallelism: ``batch_size`` is the GLOBAL batch B. With ``world_size`` N > 1, every
    rank draws the same global batch plans (student, teacher and unlabelled item indices,
    :meth:`plans`) and reads its contiguous shard, rows [r B/N, (r + 1) B/N): only those items
    (the indices are sharded, not the tensors); so N processes train on exactly the batches of
    one process. B must be divisible by N (a ConfigError names both). A domain shift
    (``shift_level``) corrupts its side's global batch before it is sharded (its noise is drawn
    for the whole batch), so that side's whole batch is read on every rank.

    Args:
        student: the student modality (its ``train`` split is the pool).
        teacher: the teacher modality, or None (teacher training / teacher-free methods).
        cfg: pairing config.
        batch_size: B (clamped to the labelled pool size).
        steps_per_epoch: None = ceil(n_labelled / B).
        seed: run seed (chooses the labelled subset, pools and batches).
        unlabelled: also yield unlabelled student batches ``xu``.
        require_unlabelled: with ``unlabelled``, an empty unlabelled pool is an error (else
            batches simply carry ``xu = None``).
        workers, prefetch, pin_memory: when a modality is lazy (``data.storage``) and
            ``workers`` > 0, batches are read by a ``torch.utils.data.DataLoader`` with that many
            worker processes, each reading ``prefetch`` batches ahead, into pinned memory if
            ``pin_memory`` (for CUDA). In-memory modalities are always indexed in-process.
        rank, world_size: this process's shard of every global batch.
    """

    def __init__(self, student: ModalityData, teacher: Optional[ModalityData], cfg: PairingConfig,
                 batch_size: int, steps_per_epoch: Optional[int] = None, seed: int = 0,
                 unlabelled: bool = False, require_unlabelled: bool = True, workers: int = 0,
                 prefetch: int = 2, pin_memory: bool = False, rank: int = 0, world_size: int = 1):
        validate_pairing(cfg)
        if workers < 0 or prefetch < 1:
            raise ConfigError(f"data.workers must be >= 0 and data.prefetch >= 1, got {workers} and {prefetch}")
        self.workers, self.prefetch, self.pin_memory = int(workers), int(prefetch), bool(pin_memory)
        self._loader: Optional[DataLoader] = None
        if teacher is not None:
            check_compatible(student, teacher)
        self.student, self.teacher, self.cfg = student, teacher, cfg
        self.seed = seed
        self.num_classes = student.num_classes
        rng = np.random.default_rng([seed, 1009])
        s_pool = student.splits["train"].numpy()
        t_pool = teacher.splits["train"].numpy() if teacher is not None else None
        if teacher is not None and cfg.mismatch_ratio is not None:
            s_pool, t_pool = self._mismatch(s_pool, t_pool, cfg.mismatch_ratio, rng)
        labelled, unlab = self._budget(s_pool, cfg.label_budget, rng)
        if cfg.imbalance_rho is not None:
            if cfg.imbalance_side == "student":
                labelled = self._imbalance(labelled, student.y, cfg.imbalance_rho, rng)
            elif t_pool is not None:
                t_pool = self._imbalance(t_pool, teacher.y, cfg.imbalance_rho, rng)
        self.labelled = labelled
        self.unlabelled_pool = unlab
        self.teacher_pool = t_pool
        if teacher is not None:
            ty = teacher.y[t_pool].numpy()
            self.teacher_by_class = [t_pool[ty == c] for c in range(self.num_classes)]
            if cfg.mode == "class-matched":
                present = set(student.y[labelled].tolist())
                for c in sorted(present):
                    if len(self.teacher_by_class[c]) == 0:
                        raise DataError(f"teacher pool of {teacher.name!r} has no item of class "
                                        f"{teacher.classes[c]!r} (after the pairing stress options)")
            if cfg.mode == "paired":
                self._pair_map = self._build_pair_map()
        if unlabelled and len(unlab) == 0 and not require_unlabelled:
            unlabelled = False
        self.want_unlabelled = unlabelled
        if unlabelled and len(unlab) == 0:
            raise DataError(f"the method uses unlabelled student data but the student pool of "
                            f"{student.name!r} has none (pairing.label_budget={cfg.label_budget})")
        self.batch_size = int(min(batch_size, len(labelled)))
        self.unlabelled_size = max(1, int(round(cfg.unlabelled_ratio * self.batch_size)))    # B_u = mu B
        self.steps_per_epoch = steps_per_epoch or math.ceil(len(labelled) / self.batch_size)
        if not 0 <= rank < world_size:
            raise ConfigError(f"pairing sampler: rank {rank} outside a world of {world_size} processes")
        if self.batch_size % world_size:
            clamp = (f" (optim.batch_size {batch_size} clamped to the {len(labelled)} labelled items)"
                     if self.batch_size < batch_size else "")
            raise ConfigError(f"optim.batch_size: the global batch of {self.batch_size}{clamp} cannot be split "
                              f"into {world_size} equal shards, one per process; give a multiple of {world_size}")
        if unlabelled and self.unlabelled_size % world_size:
            raise ConfigError(f"pairing.unlabelled_ratio: the unlabelled batch of {self.unlabelled_size} items "
                              f"cannot be split into {world_size} equal shards; choose a ratio giving a multiple "
                              f"of {world_size}")
        self.rank, self.world_size = rank, world_size

    # ------------------------------------------------------------------ pool construction
    def _mismatch(self, s_pool, t_pool, r, rng):
        sy, ty = self.student.y.numpy(), self.teacher.y.numpy()
        s_keep, t_keep = [], []
        both_paired = self.student.pair_id is not None and self.teacher.pair_id is not None
        for c in range(self.num_classes):
            s_c, t_c = s_pool[sy[s_pool] == c], t_pool[ty[t_pool] == c]
            if both_paired:
                sp = self.student.pair_id[s_c].numpy()
                tp = self.teacher.pair_id[t_c].numpy()
                ids = np.union1d(sp, tp)
                rng.shuffle(ids)
                cut = int(round(r * len(ids)))
                s_ids, t_ids = ids[:cut], ids[cut:]
                s_keep.append(s_c[np.isin(sp, s_ids)])
                t_keep.append(t_c[np.isin(tp, t_ids)])
            else:
                s_c, t_c = rng.permutation(s_c), rng.permutation(t_c)
                s_keep.append(s_c[: max(1, int(round(r * len(s_c))))])
                t_keep.append(t_c[len(t_c) - max(1, int(round((1 - r) * len(t_c)))):])
        return np.sort(np.concatenate(s_keep)), np.sort(np.concatenate(t_keep))

    def _budget(self, pool, k, rng):
        """(labelled: k items per class, unlabelled: the rest of ``pool``); a class with fewer
        than k items cannot honour the budget: a ConfigError names it."""
        if k is None:
            return pool, pool[:0]
        y = self.student.y.numpy()
        counts = np.bincount(y[pool], minlength=self.num_classes)
        short = [c for c in range(self.num_classes) if 0 < counts[c] < k]
        if short:
            c = min(short, key=lambda c: counts[c])
            after = " (after pairing.mismatch_ratio)" if self.cfg.mismatch_ratio is not None else ""
            raise ConfigError(f"pairing.label_budget={k} is more than the {counts[c]} training items of class "
                              f"{self.student.classes[c]!r} in {self.student.name!r}{after}; give at most "
                              f"{int(counts[short].min())} per class, or null to label every training item")
        lab = []
        for c in range(self.num_classes):
            members = rng.permutation(pool[y[pool] == c])
            if len(members) == 0:
                continue
            lab.append(members[:k])
        labelled = np.sort(np.concatenate(lab))
        return labelled, np.setdiff1d(pool, labelled)

    def _imbalance(self, pool, labels, rho, rng):
        keep = imbalance_keep(self.num_classes, rho)
        y = labels.numpy()
        out = []
        for c in range(self.num_classes):
            members = rng.permutation(pool[y[pool] == c])
            if len(members):
                out.append(members[: max(1, int(round(keep[c] * len(members))))])
        return np.sort(np.concatenate(out))

    def _build_pair_map(self):
        if self.student.pair_id is None or self.teacher.pair_id is None:
            missing = self.student.name if self.student.pair_id is None else self.teacher.name
            raise DataError(f"pairing.mode 'paired' needs true pairs, but dataset {missing!r} has no "
                            f"pair_id; use 'class-matched' or 'unpaired'")
        t_ids = self.teacher.pair_id[self.teacher_pool].numpy()
        lookup = dict(zip(t_ids.tolist(), self.teacher_pool.tolist()))
        s_ids = self.student.pair_id[self.labelled].numpy()
        missing = [i for i in s_ids.tolist() if i not in lookup]
        if missing:
            raise DataError(f"pairing.mode 'paired': {len(missing)} student items of {self.student.name!r} "
                            f"have no pair in the teacher pool of {self.teacher.name!r} (e.g. pair_id {missing[0]})")
        return lookup

    # ------------------------------------------------------------------ iteration
    def __len__(self) -> int:
        return self.steps_per_epoch

    def save_draw(self, path) -> None:
        """Write what this sampler drew (item indices into the splits' modalities): ``labelled``
        [n_l], ``unlabelled`` [n_u] and ``teacher_pool`` [n_t] (empty when no teacher items are
        drawn), with ``has_teacher`` (0/1), to ``path`` (.npz, atomic). :func:`read_draw` reads it."""
        from ..cache import save_npz

        save_npz(path, labelled=np.asarray(self.labelled, dtype=np.int64),
                 unlabelled=np.asarray(self.unlabelled_pool, dtype=np.int64),
                 teacher_pool=np.asarray([] if self.teacher_pool is None else self.teacher_pool, dtype=np.int64),
                 has_teacher=np.array(int(self.teacher_pool is not None)))

    def summary(self) -> dict:
        return {"labelled": int(len(self.labelled)), "unlabelled": int(len(self.unlabelled_pool)),
                "teacher_pool": None if self.teacher_pool is None else int(len(self.teacher_pool)),
                "batch_size": self.batch_size, "steps_per_epoch": self.steps_per_epoch,
                **({"unlabelled_batch": self.unlabelled_size}
                   if self.want_unlabelled and self.cfg.unlabelled_ratio != 1.0 else {})}

    def plans(self, epoch: int) -> tuple[list[BatchPlan], torch.Generator]:
        """The item indices of every (global) batch of ``epoch`` (drawn first, from the epoch's
        seed; the same on every rank) and the generator of its corruption noise (:meth:`epoch`
        applies it in batch order)."""
        rng = np.random.default_rng([self.seed, epoch, 2029])
        gen = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        n_need = self.steps_per_epoch * self.batch_size
        reps = math.ceil(n_need / len(self.labelled))
        order = np.concatenate([rng.permutation(self.labelled) for _ in range(reps)])[:n_need]
        out = []
        for step in range(self.steps_per_epoch):
            si = order[step * self.batch_size:(step + 1) * self.batch_size]
            ti = ui = None
            if self.teacher is not None:
                ti = self._teacher_indices(si, self.student.y[si].numpy(), rng)
            if self.want_unlabelled:
                ui = rng.choice(self.unlabelled_pool, size=self.unlabelled_size,
                                replace=len(self.unlabelled_pool) < self.unlabelled_size)
            out.append(BatchPlan(si, ti, ui))
        return out, gen

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """This rank's shard of every batch of ``epoch`` (the whole batch in one process): the
        items of :meth:`plans`, read (by DataLoader workers when a modality is lazy and
        ``workers`` > 0), then corrupted in batch order (shift presets)."""
        plans, gen = self.plans(epoch)
        s, t, cfg = self.student, self.teacher, self.cfg
        shift_s = cfg.shift_level > 0 and cfg.shift_side in ("student", "both")
        shift_t = cfg.shift_level > 0 and cfg.shift_side in ("teacher", "both")
        b = self.batch_size // self.world_size
        mine = slice(self.rank * b, (self.rank + 1) * b)
        bu = self.unlabelled_size // self.world_size
        mine_u = slice(self.rank * bu, (self.rank + 1) * bu)
        reads = [self._shard(p, mine, mine_u, shift_s, shift_t) for p in plans]
        for step, (plan, (xs, ys, xt, yt, xu)) in enumerate(zip(plans, self._read(reads))):
            if shift_s:     # read whole: the noise is the whole batch's
                xs, ys = corrupt(xs, s.kind, cfg.shift_level, gen)[mine], ys[mine]
            batch = Batch(xs, ys, seed=self.augment_seed(epoch, step))
            if t is not None:
                batch.xt, batch.yt = xt, yt
                if shift_t:
                    batch.xt, batch.yt = corrupt(batch.xt, t.kind, cfg.shift_level, gen)[mine], yt[mine]
                else:
                    batch.it = torch.as_tensor(plan.ti[mine], dtype=torch.long)
            if xu is not None:
                batch.xu = corrupt(xu, s.kind, cfg.shift_level, gen)[mine_u] if shift_s else xu
            yield batch

    def augment_seed(self, epoch: int, step: int) -> int:
        """The augmentation seed of (``epoch``, ``step``) on this rank: a function of the run seed
        alone, drawn from no generator, so the batches' items are those of a run without
        augmentation and a resumed run repeats its augmentations."""
        ss = np.random.SeedSequence([int(self.seed), int(epoch), int(step), int(self.rank), 7919])
        return int(ss.generate_state(1, np.uint64)[0] >> 1)

    def _shard(self, plan: BatchPlan, mine: slice, mine_u: slice, shift_s: bool, shift_t: bool) -> BatchPlan:
        """The items of a global plan this rank reads: its rows ``mine`` (``mine_u`` of the
        unlabelled items), or a shifted side's whole batch."""
        if self.world_size == 1:
            return plan
        ti = None if plan.ti is None else (plan.ti if shift_t else plan.ti[mine])
        ui = None if plan.ui is None else (plan.ui if shift_s else plan.ui[mine_u])
        return BatchPlan(plan.si if shift_s else plan.si[mine], ti, ui)

    @property
    def reader_workers(self) -> int:
        """DataLoader processes that read the batches: ``workers`` when a modality is lazy, else 0
        (in-memory batches are sliced by the training process)."""
        lazy = self.student.lazy or (self.teacher is not None and self.teacher.lazy)
        return self.workers if lazy else 0

    def _read(self, plans: list) -> Iterator[tuple]:
        if self.reader_workers == 0:
            reader = BatchReader(self.student, self.teacher)
            return (reader[p] for p in plans)
        if self._loader is None:          # started on first use, its workers kept for every epoch
            self._source = PlanSource()
            self._loader = DataLoader(BatchReader(self.student, self.teacher), sampler=self._source, batch_size=None,
                                      num_workers=self.workers, prefetch_factor=self.prefetch,
                                      pin_memory=self.pin_memory, persistent_workers=True)
        self._source.plans = plans
        return iter(self._loader)

    def _teacher_indices(self, si, ys, rng) -> np.ndarray:
        mode = self.cfg.mode
        if mode == "paired":
            ids = self.student.pair_id[si].tolist()
            return np.array([self._pair_map[i] for i in ids])
        if mode == "unpaired":
            return rng.choice(self.teacher_pool, size=len(si), replace=True)
        out = np.empty(len(si), dtype=np.int64)
        for c in np.unique(ys):
            pos = np.nonzero(ys == c)[0]
            out[pos] = rng.choice(self.teacher_by_class[c], size=len(pos), replace=True)
        return out
