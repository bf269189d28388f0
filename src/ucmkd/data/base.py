"""Modality datasets: an item is an input tensor and a class label.

Datasets differ only in how items are produced (:data:`DATASETS` builders); splitting,
normalisation, caching and pairing are shared.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from ..cache import array_digest, entry, get_or_build, get_or_write, is_file_backed, open_npz_member, write_npz_rows
from ..config import DataConfig
from ..errors import ConfigError, DataError
from ..registry import Registry
from .lazy import LazyArray, read_whole
from .standardize import Standardizer, chunk_rows, fit, global_in_memory, resolve_mode

KINDS = ("vector", "signal", "image")


@dataclass
class RawModality:
    """What a dataset builder returns before splitting.

    x: float array [N, *input_shape]; y: int array [N] in 0..K-1; classes: K names;
    pair_id: optional int array [N]; items of two modalities with equal pair_id are true pairs.
    split: optional str array [N] of "train"/"val"/"test": the dataset's own split (e.g. its
        train/test lists); validation is carved from "train" when no item is "val".
    groups: optional array [N] of group ids, ints or strings (e.g. speaker/voice): without
        ``split``, whole groups are held out for the test split (group-independent evaluation);
        validation is carved from the rest by ``data.val_by`` (whole groups too by default;
        :func:`make_splits`).
    fingerprint: optional JSON-able dict of what determines the items besides the arrays'
        content (generation recipe, files and options). It joins the content hash in
        :attr:`ModalityData.fingerprint`, which keys cached teachers and runs.
    augment: the augmentation kind (a policy of :data:`ucmkd.augment.AUGMENTATIONS`, e.g.
        ``spectrogram`` for spectrograms stored as ``image``); None: the layout ``kind``.
    """

    x: np.ndarray
    y: np.ndarray
    classes: list
    kind: str
    pair_id: Optional[np.ndarray] = None
    source: str = ""
    split: Optional[np.ndarray] = None
    groups: Optional[np.ndarray] = None
    fingerprint: dict = field(default_factory=dict)
    augment: Optional[str] = None


@dataclass
class ModalityData:
    """One modality with fixed train/val/test index splits.

    Attributes:
        name: registry name, e.g. ``"digits/image"``.
        kind: ``vector`` ([N, D]), ``signal`` ([N, C, L]) or ``image`` ([N, C, H, W]).
        x: float32 tensor [N, *input_shape], or a :class:`~ucmkd.data.lazy.LazyArray` (read
            lazily from a memory-mapped file, ``data.storage``) that ``x[idx]`` reads into the
            same tensor; standardised with training statistics
            (:attr:`standardizer`; ``meta`` holds ``standardize`` (the mode), ``norm_mean``
            and ``norm_std``: floats, or lists [F] for ``per_feature``).
        y: int64 tensor [N].
        classes: class names, index = label.
        splits: ``{"train", "val", "test"}`` -> int64 index tensors into x/y (``meta["val_by"]``:
            how validation was made, ``split``, ``groups`` or ``items``; :func:`make_splits`).
        pair_id: int64 [N] or None.
        fingerprint: what identifies the content (:func:`data_fingerprint`; computed on first
            use, so an in-place edit of ``x`` after that is not seen).
        augment: the augmentation kind the dataset declares (None: ``kind``); read it as
            :attr:`augment_kind`. Not part of the fingerprint (it never changes the items); runs
            that augment put it in their key.
    """

    name: str
    kind: str
    x: "torch.Tensor | LazyArray"
    y: torch.Tensor
    classes: list
    splits: dict
    pair_id: Optional[torch.Tensor] = None
    source: str = ""
    meta: dict = field(default_factory=dict)
    augment: Optional[str] = None
    _fingerprint: Optional[dict] = field(default=None, init=False, repr=False, compare=False)

    @property
    def fingerprint(self) -> dict:
        if self._fingerprint is None:
            self._fingerprint = data_fingerprint(self)
        return self._fingerprint

    @property
    def augment_kind(self) -> str:
        """The input kind augmentation policies are chosen by: ``augment`` if declared, else
        ``kind`` (image, signal, spectrogram, vector or a registered plugin policy)."""
        return self.augment or self.kind

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x.shape[1:])

    @property
    def standardizer(self) -> Standardizer:
        """How ``x`` was standardised (from ``meta``; ``none`` for data built without it)."""
        m = self.meta
        if "standardize" not in m:
            return Standardizer.identity()
        return Standardizer.from_dict({"mode": m["standardize"], "mean": m["norm_mean"], "std": m["norm_std"]},
                                      self.input_shape, where=f"{self.name} meta")

    @property
    def lazy(self) -> bool:
        """Whether ``x`` is read lazily from a file (:class:`~ucmkd.data.lazy.LazyArray`)."""
        return isinstance(self.x, LazyArray)

    def split(self, name: str) -> tuple:
        """Inputs [n, *input_shape] and labels [n] of split ``name``: the inputs are a tensor, or
        for a lazy modality a LazyArray over the split's items (read as they are indexed)."""
        idx = self.splits[name]
        return (self.x.subset(idx) if self.lazy else self.x[idx]), self.y[idx]

    def describe(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        return f"{self.name} ({self.kind}, input {list(self.input_shape)}, {self.num_classes} classes, {sizes})"


def data_fingerprint(data: ModalityData) -> dict:
    """What identifies a modality's content: name, kind, shape, dtype, classes, the builder's own
    fingerprint (``meta["fingerprint"]``: recipe, files) if any, and ``content``, a hash of the
    arrays as the runs see them (inputs, labels, splits, pair ids;
    :func:`ucmkd.cache.array_digest`): every byte up to 64 MiB, 256 evenly spaced chunks of
    256 KiB above (a bounded ~0.1 s). So a dataset registered without a fingerprint, then
    changed, gets another one; for arrays above 64 MiB, give the builder a ``fingerprint`` that
    changes with the data (e.g. file sizes and mtimes) to be safe from changes between chunks."""
    from ..cache import content_key

    out = {"name": data.name, "kind": data.kind, "shape": list(data.x.shape), "dtype": str(data.x.dtype),
           "classes": [str(c) for c in data.classes]}
    if data.meta.get("fingerprint"):
        out["recipe"] = data.meta["fingerprint"]
    out["content"] = content_key({"x": data.x, "y": data.y, "pair_id": data.pair_id,
                                  "splits": {k: data.splits[k] for k in sorted(data.splits)}}, n=16)
    return out


DatasetBuilder = Callable[[DataConfig], RawModality]
DATASETS: Registry[DatasetBuilder] = Registry("dataset", code_in_keys=False)   # keyed by their content
#: dataset name -> the sections of :class:`DataConfig` its builder reads (``DataConfig.SECTIONS``,
#: e.g. ``("spoken",)``); None: not declared, so every section keys its runs
DATASET_READS: dict = {}
#: dataset family (the name before "/") -> the dataclass of its typed options (``data.options.<family>``)
DATASET_OPTIONS: dict = {}


def family(name: str) -> str:
    """``"fsdd/audio"`` -> ``"fsdd"``; a file spec (``npz:PATH``) is its own family."""
    return name.split(":", 1)[0] if ":" in name else name.split("/", 1)[0]


def register_dataset(name: str, reads: Optional[tuple] = None, options: Optional[type] = None):
    """Decorator: register ``builder(cfg: DataConfig) -> RawModality`` under ``name``.

    reads: the :class:`DataConfig` sections the builder reads besides the shared split and
        standardisation fields (``("spoken",)``; ``()``: none), so that the sections of datasets
        a run does not use stay out of its key. Undeclared (None, and no ``options``): every
        section and every ``data.options`` entry keys the runs that use it.
    options: a dataclass of the family's own typed options, given as ``data.options.<family>``
        (validated like every config section, errors naming ``data.options.<family>.<field>``)
        and read by the builder with :func:`dataset_options`.
    """
    def deco(builder: DatasetBuilder) -> DatasetBuilder:
        DATASETS.register(name)(builder)
        DATASET_READS[name] = tuple(reads or ()) if (reads is not None or options is not None) else None
        if options is not None:
            DATASET_OPTIONS[family(name)] = options
        return builder

    return deco


def dataset_options(cfg: DataConfig, name: str):
    """The typed options of dataset ``name`` (its family's ``options`` dataclass, registered with
    :func:`register_dataset`) from ``cfg.options[<family>]``, validated."""
    from ..config import from_dict

    fam = family(name)
    if fam not in DATASET_OPTIONS:
        raise ConfigError(f"data.options.{fam}: dataset {name!r} declares no options")
    return from_dict(DATASET_OPTIONS[fam], cfg.options.get(fam) or {}, f"data.options.{fam}")


#: file-spec schemes (``npz:PATH``): scheme -> (loader(path, cfg) -> RawModality, the sections it reads)
SCHEMES: dict = {}


def register_scheme(scheme: str, reads: tuple = ()):
    """Decorator: datasets named ``<scheme>:PATH`` are built by ``loader(path: str, cfg:
    DataConfig) -> RawModality``; ``reads``: as for :func:`register_dataset`."""
    def deco(loader: Callable[[str, DataConfig], RawModality]):
        if scheme in SCHEMES:
            raise ConfigError(f"dataset scheme {scheme!r} is registered twice")
        SCHEMES[scheme] = (loader, tuple(reads))
        return loader

    return deco


def _scheme(name: str) -> Optional[tuple]:
    scheme, sep, _ = name.partition(":")
    return SCHEMES.get(scheme) if sep else None


def dataset_reads(name: str) -> Optional[tuple]:
    """The :class:`DataConfig` sections dataset ``name`` reads (see :func:`register_dataset`);
    None when unknown (an undeclared or unregistered dataset)."""
    spec = _scheme(name)
    return spec[1] if spec is not None else DATASET_READS.get(name)


def cache_dir(cfg: DataConfig | None = None) -> Path:
    """The on-disk cache: ``cfg.cache_dir``, else ``$UCMKD_CACHE``, else ``~/.cache/ucmkd``."""
    d = (cfg.cache_dir if cfg is not None and cfg.cache_dir else None) or os.environ.get("UCMKD_CACHE")
    if not d:
        d = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ucmkd")
    p = Path(d)
    p.mkdir(parents=True, exist_ok=True)
    return p


SPLIT_NAMES = ("train", "val", "test")
#: how validation is carved from the training part (``data.val_by``; :func:`make_splits`)
VAL_BY = DataConfig.CHOICES["val_by"]


def split_names(split, where: str) -> np.ndarray:
    """``split`` as a str array [N], every value one of :data:`SPLIT_NAMES` (else a DataError
    naming ``where`` and the first unknown value)."""
    split = np.asarray(split).astype(str)
    bad = sorted(set(split.tolist()) - set(SPLIT_NAMES))
    if bad:
        raise DataError(f"{where}: unknown split name {bad[0]!r}; expected train, val or test")
    return split


def make_splits(y: np.ndarray, test_frac: float, val_frac: float, seed: int,
                split: Optional[np.ndarray] = None, groups: Optional[np.ndarray] = None,
                where: str = "dataset", val_by: str = "auto") -> dict:
    """Seeded train/val/test index split ``{"train", "val", "test"}`` -> sorted int64 tensors.

    Test:
    - ``split`` given: the dataset's own train/test (and val, if any) assignment is kept;
    - ``groups`` given: a seeded ~``test_frac`` share of the groups is held out as test;
    - otherwise: a stratified random split.

    Validation: the dataset's own "val" items if ``split`` has any; otherwise carved from the
    training part, by ``val_by`` (:data:`VAL_BY`): ``groups`` holds out a seeded ~``val_frac``
    share of the training part's groups whole (at least one, leaving at least one; with ``split``
    and ``groups``, from the split's "train" items), ``items`` a seeded share of its items
    (stratified when every class can appear in both parts), ``auto`` groups when there are group
    ids and enough of them (3, or 2 in a ``split``'s train part), else items.
    """
    return _make_splits(y, test_frac, val_frac, seed, split, groups, where, val_by)[0]


def _make_splits(y, test_frac, val_frac, seed, split, groups, where, val_by) -> tuple[dict, str]:
    """:func:`make_splits`, and how validation was made: ``split``, ``groups`` or ``items``."""
    for name, v in (("data.test_frac", test_frac), ("data.val_frac", val_frac)):
        if not 0.0 < v < 1.0:
            raise DataError(f"{name} must be in (0, 1), got {v}")
    if val_by not in VAL_BY:
        raise ConfigError(f"data.val_by: unknown value {val_by!r}; choose one of {', '.join(VAL_BY)}")
    idx = np.arange(len(y))
    if split is not None:
        split = split_names(split, where)
        if (split == "val").any():             # the dataset's own validation split wins
            return _as_splits(idx[split == "train"], idx[split == "val"], idx[split == "test"]), "split"
    by_groups = _val_by_groups(val_by, groups, split, where)
    if split is not None:
        trval, test = idx[split != "test"], idx[split == "test"]
    elif groups is not None:
        # val by groups keeps two groups out of the test (one for validation, one for training)
        is_test = np.isin(groups, _held_out_groups(groups, test_frac, seed, keep=2 if by_groups else 1, where=where))
        trval, test = idx[~is_test], idx[is_test]
    else:
        trval, test = train_test_split(idx, test_size=test_frac, random_state=seed, stratify=y)
    if len(trval) < 2 or len(test) == 0:
        raise DataError(f"{where}: the split leaves {len(trval)} training and {len(test)} test items")
    if by_groups:
        is_val = np.isin(groups[trval], _held_out_groups(groups[trval], val_frac, seed + 1, keep=1, where=where))
        return _as_splits(trval[~is_val], trval[is_val], test), "groups"
    counts = np.bincount(y[trval])
    n_val = int(np.ceil(val_frac * len(trval)))
    # stratify when every class can appear in both parts; tiny sets fall back to random
    strat = y[trval] if counts[counts > 0].min() >= 2 and n_val >= (counts > 0).sum() else None
    train, val = train_test_split(trval, test_size=val_frac, random_state=seed + 1, stratify=strat)
    return _as_splits(train, val, test), "items"


def _val_by_groups(val_by: str, groups, split, where: str) -> bool:
    """Whether validation is made of whole groups (``val_by`` resolved; see :func:`make_splits`):
    groups need one for validation and one for training, plus one for the test unless ``split``
    names the test items."""
    if val_by == "items":
        return False
    if groups is None:
        if val_by == "groups":
            raise DataError(f"{where}: data.val_by=groups needs group ids (the dataset's 'groups'), but it has none; "
                            f"use data.val_by=items or auto")
        return False
    pool = groups if split is None else groups[split == "train"]
    n, need = len(np.unique(pool)), (3 if split is None else 2)
    if n >= need:
        return True
    if val_by == "groups":
        part = "test, validation and training" if split is None else "validation and training (in its 'train' split)"
        raise DataError(f"{where}: data.val_by=groups needs at least {need} groups, one each for {part}, "
                        f"got {n}; use data.val_by=items or auto")
    return False


def _held_out_groups(groups: np.ndarray, frac: float, seed: int, keep: int, where: str) -> np.ndarray:
    """A seeded ~``frac`` share of the distinct ``groups`` (at least one, leaving ``keep``)."""
    ids = np.unique(groups)
    if len(ids) < 1 + keep:
        raise DataError(f"{where}: group-held-out splits need at least {1 + keep} groups, got {len(ids)}")
    n = min(len(ids) - keep, max(1, int(round(frac * len(ids)))))
    return np.random.default_rng(seed).choice(ids, size=n, replace=False)


def _as_splits(train, val, test) -> dict:
    return {k: torch.as_tensor(np.sort(v), dtype=torch.long) for k, v in (("train", train), ("val", val), ("test", test))}


def validate_raw(raw: RawModality, name: str, check_values: bool = True) -> None:
    """Kinds, shapes, labels; with ``check_values`` also that every input is finite (a lazily
    read modality is checked by its streaming statistics pass instead)."""
    where = raw.source or name
    if raw.kind not in KINDS:
        raise DataError(f"{where}: unknown input kind {raw.kind!r}; expected one of {KINDS}")
    want_ndim = {"vector": 2, "signal": 3, "image": 4}[raw.kind]
    if raw.x.ndim != want_ndim:
        raise DataError(f"{where}: {raw.kind} inputs must have shape "
                        f"{['[N, D]', '[N, C, L]', '[N, C, H, W]'][want_ndim - 2]}, got {list(raw.x.shape)}")
    if raw.augment is not None and not isinstance(raw.augment, str):
        raise DataError(f"{where}: augment must be the name of an augmentation policy, got {raw.augment!r}")
    if raw.y.ndim != 1 or len(raw.y) != len(raw.x):
        raise DataError(f"{where}: labels must have shape [N]={[len(raw.x)]}, got {list(raw.y.shape)}")
    if len(raw.classes) < 2:
        raise DataError(f"{where}: need at least 2 classes, got {raw.classes}")
    if raw.y.min() < 0 or raw.y.max() >= len(raw.classes):
        raise DataError(f"{where}: labels must lie in 0..{len(raw.classes) - 1}, "
                        f"found {int(raw.y.min())}..{int(raw.y.max())}")
    if check_values and not np.isfinite(raw.x).all():
        raise DataError(f"{where}: inputs contain NaN or inf")
    for field_name in ("pair_id", "split", "groups"):
        v = getattr(raw, field_name)
        if v is not None and np.shape(v) != raw.y.shape:
            raise DataError(f"{where}: {field_name} must have shape {list(raw.y.shape)}, got {list(np.shape(v))}")


def reads_lazily(x, cfg: DataConfig) -> bool:
    """Whether a modality whose builder returned inputs ``x`` is read lazily
    (``cfg.storage``): ``memory`` never, ``mmap`` always, ``auto`` when ``x`` is a file-backed
    memory map larger than ``cfg.mmap_above_mb`` MiB as float32."""
    if cfg.storage not in ("auto", "memory", "mmap"):
        raise ConfigError(f"data.storage: unknown value {cfg.storage!r}; choose one of auto, memory, mmap")
    if cfg.storage != "auto":
        return cfg.storage == "mmap"
    return is_file_backed(x) and 4 * math.prod(x.shape) > cfg.mmap_above_mb * 2 ** 20


def finalize(raw: RawModality, name: str, cfg: DataConfig) -> ModalityData:
    """Validate, split (seeded, stratified; :func:`make_splits`, ``meta["val_by"]``: how the
    validation split was made, ``split``, ``groups`` or ``items``), and standardise with train-split statistics
    (``cfg.standardize``, :mod:`ucmkd.data.standardize`); in memory, or read lazily from a
    memory-mapped file (``cfg.storage``, :func:`reads_lazily`)."""
    where = raw.source or name
    # class names as plain values (a NumPy string array's items print as np.str_('a') in messages;
    # equal as str, so fingerprints and keys are unchanged)
    raw = dataclasses.replace(raw, classes=[str(c) if isinstance(c, str) else c for c in raw.classes])
    mode = resolve_mode(cfg.standardize, raw.kind)
    lazy = reads_lazily(raw.x, cfg)
    owned = not lazy and isinstance(raw.x, np.memmap)
    if owned:
        raw = dataclasses.replace(raw, x=read_whole(raw.x))          # a file read whole into memory
    validate_raw(raw, name, check_values=not lazy)
    splits, val_by = _make_splits(raw.y, cfg.test_frac, cfg.val_frac, cfg.split_seed, raw.split, raw.groups,
                                  where, cfg.val_by)
    if lazy:
        src = raw.x if is_file_backed(raw.x) else _array_file(raw, name, cfg)
        st = _lazy_standardizer(src, splits["train"].numpy(), mode, name, cfg, where)
        x = LazyArray(src, st)
    else:
        # the builder's array is never edited (builders may return memoised arrays, synthetic's
        # lru_cache): the standardised tensor is a new one, unless the array is this load's own
        # (read from a file, or converted to float32), which is then standardised in place
        x = torch.as_tensor(raw.x, dtype=torch.float32)
        owned = owned or raw.x.dtype != np.float32
        if mode == "global":
            st = global_in_memory(x, splits["train"])
        else:
            st = fit(x, splits["train"].numpy(), mode, tuple(x.shape[1:]), where=where)
        x = st(x, inplace=owned)
    pid = None if raw.pair_id is None else torch.tensor(raw.pair_id, dtype=torch.long)
    return ModalityData(name=name, kind=raw.kind, x=x, y=torch.tensor(raw.y, dtype=torch.long),
                        classes=list(raw.classes), splits=splits, pair_id=pid, source=raw.source,
                        meta={**_norm_meta(st), "fingerprint": dict(raw.fingerprint), "val_by": val_by},
                        augment=raw.augment)


def _norm_meta(st: Standardizer) -> dict:
    mean, std = st.values()
    return {"standardize": st.mode, "norm_mean": mean, "norm_std": std}


STATS_VERSION = 1


def _npz_entry(cfg: DataConfig, kind: str, name: str, key: dict) -> Path:
    e = entry(cache_dir(cfg), kind, name, key)
    return e.with_name(e.name + ".npz")


def _array_file(raw: RawModality, name: str, cfg: DataConfig) -> np.memmap:
    """``raw.x`` (held in memory by its builder) written once as float32 to the cache
    (``<cache>/arrays/<name>-<key>.npz``, keyed by a hash of every byte) and memory-mapped."""
    key = {"name": name, "x": array_digest(raw.x, full=True), "recipe": raw.fingerprint}
    path = _npz_entry(cfg, "arrays", name, key)
    step = chunk_rows(raw.x.shape)
    blocks = (raw.x[a:a + step] for a in range(0, len(raw.x), step))
    return get_or_write(path, lambda tmp: write_npz_rows(tmp, "x", raw.x.shape, np.float32, blocks),
                        lambda p: _mapped(p, "x"), "array cache")


def _mapped(path: Path, member: str) -> np.memmap:
    m = open_npz_member(path, member)
    if m is None:
        raise DataError(f"{path}: array {member!r} cannot be memory-mapped (compressed?); delete it to rebuild")
    return m


def _lazy_standardizer(src: np.memmap, train: np.ndarray, mode: str, name: str, cfg: DataConfig,
                       where: str) -> Standardizer:
    """The standardisation statistics of a memory-mapped modality: one streaming pass over the
    file (which also checks every item for NaN/inf), cached in ``<cache>/stats/`` under the
    file's name, size, modification time, offset and shape, the training rows and the mode."""
    st = os.stat(src.filename)
    key = {"file": str(src.filename), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "offset": int(src.offset),
           "shape": list(src.shape), "dtype": src.dtype.str, "train": array_digest(train, full=True), "mode": mode,
           "v": STATS_VERSION}
    path = _npz_entry(cfg, "stats", name, key)

    def save(s: Standardizer, tmp: Path) -> None:
        np.savez(tmp, mode=np.array(s.mode), mean=s.mean.numpy(), std=s.std.numpy())

    def load(p: Path) -> Standardizer:
        with np.load(p, allow_pickle=False) as z:
            return Standardizer(str(z["mode"]), torch.from_numpy(z["mean"]), torch.from_numpy(z["std"]))

    return get_or_build(path, lambda: fit(src, train, mode, tuple(src.shape[1:]), check_finite=True, where=where),
                        save, load, "standardisation statistics")


def load_modality(name: str, cfg: DataConfig | None = None) -> ModalityData:
    """Build modality ``name`` (a registered name, or a file spec such as ``npz:PATH``,
    :func:`register_scheme`) with fixed splits."""
    cfg = cfg or DataConfig()
    for fam in cfg.options:
        if fam not in DATASET_OPTIONS:
            raise ConfigError(f"data.options.{fam}: no registered dataset family {fam!r} declares options "
                              f"(families with options: {', '.join(sorted(DATASET_OPTIONS)) or 'none'})")
    spec = _scheme(name)
    raw = spec[0](name.partition(":")[2], cfg) if spec is not None else DATASETS.get(name)(cfg)
    return finalize(raw, name, cfg)


def check_compatible(student: ModalityData, teacher: ModalityData) -> None:
    """The two modalities must share one label space (same class names in the same order)."""
    if list(student.classes) != list(teacher.classes):
        s, t = set(map(str, student.classes)), set(map(str, teacher.classes))
        if s != t:
            detail = "; ".join(f"only in the {role}: {sorted(extra)}" for role, extra in
                               (("student", s - t), ("teacher", t - s)) if extra)
        else:
            detail = f"same classes in a different order: {student.classes} vs {teacher.classes}"
        raise DataError(f"label sets differ between student {student.name!r} ({len(s)} classes) and teacher "
                        f"{teacher.name!r} ({len(t)} classes): {detail}. Both must name the same classes in "
                        f"the same order (a folder dataset: its 'classes' option sets them)")
