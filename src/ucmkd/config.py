"""Typed configuration: dataclasses with defaults, merged from YAML and ``key=value`` overrides.

Every field error names its dotted path (``optim.lr``) so a typo never passes silently. Numeric
fields carry their valid range (:func:`ranged`), checked when a config is read (:func:`from_dict`)
and, for configs built in Python, by :func:`check_ranges` before a run is prepared.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import yaml

from .errors import ConfigError


# --------------------------------------------------------------------------- valid ranges
def ranged(default: Any, lo: Any = None, hi: Any = None, *, lo_open: bool = False, hi_open: bool = False):
    """A dataclass field whose value must lie in [lo, hi] (``lo_open``/``hi_open``: exclusive
    bounds; None: unbounded). ``None`` values of Optional fields are always valid."""
    return field(default=default, metadata={"range": (lo, hi, lo_open, hi_open)})


def range_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"{'<' if hi_open else '<='} {hi}"


def _check_range(f, value: Any, path: str) -> None:
    rng = f.metadata.get("range")
    if rng is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    lo, hi, lo_open, hi_open = rng
    ok = ((lo is None or (value > lo if lo_open else value >= lo)) and
          (hi is None or (value < hi if hi_open else value <= hi)))
    if not ok:
        raise ConfigError(f"{path}: expected a value {range_text(*rng)}, got {value!r}")


def choices_of(cls: type) -> dict:
    """``CHOICES`` of a dataclass and of its bases (field -> allowed string values)."""
    out: dict = {}
    for base in reversed(cls.__mro__):
        out.update(base.__dict__.get("CHOICES", {}))
    return out


def _check_choice(allowed: dict, name: str, value: Any, path: str) -> None:
    if name in allowed and value not in allowed[name]:
        raise ConfigError(f"{path}: unknown value {value!r}; choose one of {', '.join(map(str, allowed[name]))}")


def check_ranges(cfg: Any, path: str = "") -> None:
    """Check every ranged field and every ``CHOICES`` field of the dataclass ``cfg``
    (recursively): the validation :func:`from_dict` does, for an object built in Python (e.g. a
    method's ``Params(...)``). Errors name the dotted field."""
    allowed = choices_of(type(cfg))
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        where = _join(path, f.name)
        if is_dataclass(v):
            check_ranges(v, where)
        else:
            _check_range(f, v, where)
            _check_choice(allowed, f.name, v, where)


# --------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class SyntheticConfig:
    """Two views of one latent class structure (see :mod:`ucmkd.data.synthetic`)."""

    n_items: int = ranged(3000, 2)          # items per view (item i of view A and of view B share a latent)
    num_classes: int = ranged(10, 2)
    latent_dim: int = ranged(8, 1)
    class_sep: float = ranged(2.0, 0.0)       # distance scale between class means in latent space
    dim_a: int = ranged(16, 1)              # view A: near-linear map of the latent
    dim_b: int = ranged(32, 1)              # view B: nonlinear map + distractors
    noise: float = ranged(0.5, 0.0)           # view-B observation noise (std, in units of the latent scale)
    nonlinearity: float = ranged(1.0, 0.0)    # 0 = linear view B, larger = more tanh/sin warping
    distractors: int = ranged(16, 0)        # pure-noise dimensions appended to view B
    noise_a: float = ranged(0.1, 0.0)         # view-A observation noise
    seed: int = 0                # generation seed (fixed data, independent of run seeds)


@dataclass(frozen=True)
class TabularConfig:
    """Two tabular views of one latent class structure (see :mod:`ucmkd.data.tabular`)."""

    n_items: int = ranged(4000, 2)          # items per view (item i of both views share a latent)
    num_classes: int = ranged(6, 2)
    latent_dim: int = ranged(8, 2)          # informative latent dimensions
    clusters_per_class: int = ranged(2, 1)  # Gaussian clusters per class in the latent space
    class_sep: float = ranged(1.5, 0.0)     # make_classification's hypercube side / 2
    flip_y: float = ranged(0.01, 0.0, 1.0)  # fraction of labels re-drawn at random
    features_a: int = ranged(24, 4)         # view A (teacher-like): linear mixtures, redundant, ordinal, noise
    features_b: int = ranged(40, 4)         # view B (student-like): nonlinear, binary indicators, noise
    noise: float = ranged(0.5, 0.0)         # observation noise of view B (latent units)
    unscaled: bool = False                  # every column rescaled by 10^U(-3, 3) and shifted (raw units)
    seed: int = 0


@dataclass(frozen=True)
class SpokenDigitsConfig:
    """Recipe of the offline spoken-digits set (eSpeak NG synthesis, see ucmkd.data.spoken)."""

    voices: tuple = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan")
    variants: tuple = ("m1", "m3", "f1", "f3", "klatt")
    rates: tuple = (130, 160, 190)          # words per minute
    pitches: tuple = (35, 50, 65)           # eSpeak pitch, 0..99
    snr_db: Optional[float] = 20.0          # background noise SNR (dB); null = clean
    sample_rate: int = 22050                # Hz
    duration: float = 0.8                   # seconds per clip (padded / trimmed)
    n_mels: int = 32
    hop_length: int = 441                   # 20 ms at 22,050 Hz
    n_fft: int = 1024
    seed: int = 0


@dataclass(frozen=True)
class AVConfig:
    """Options of the audio-visual dataset adapters (RAVDESS, CREMA-D, AVE, VGGSound)."""

    image_size: int = ranged(64, 1)          # face/scene frames are resized to image_size x image_size
    frames: int = ranged(1, 1)               # frames per clip (evenly spaced), stacked as channels
    grayscale: bool = False
    audio_length: int = ranged(0, 0)         # time steps of audio features (crop/pad); 0 = the dataset's own
    audio_size: int = ranged(0, 0)           # >0: resize audio features to audio_size x audio_size (bilinear, e.g. 224 for a ViT)


@dataclass(frozen=True)
class FolderConfig:
    """Options of ``folder:PATH`` datasets: a folder of sound files, images or ``.npy`` arrays
    (:mod:`ucmkd.data.folder`, docs/data.md "Folder datasets"). One dataset overrides them in
    its name: ``folder:PATH?key=value&key=value``."""

    # layout: PATH/<class>/<file> (class subfolders, at any depth below), or a file-name pattern;
    # optional PATH/train, PATH/val, PATH/test folders hold the dataset's own split
    pattern: Optional[str] = None       # file names, e.g. "{label}_{group}_{*}.wav": {label} the class, {group} the speaker/subject/session, {*} anything; None: the class is the subfolder
    group_from: str = "auto"            # auto: the pattern's {group} if it has one, else none | pattern | parent: the folder holding each file (PATH/<class>/<group>/<file>) | none
    split_folders: Optional[bool] = None   # top folders train/val/test are the dataset's split; null: when the top folders are train and test (and val)
    classes: Optional[tuple] = None     # class names in label order (each must have files); null: the names found, sorted
    extensions: Optional[tuple] = None  # file suffixes read (case-insensitive); null: every suffix a reader knows; other files are skipped
    unmatched: str = "error"            # error | skip: a file name the pattern does not match
    # sound files (.wav .flac .ogg .mp3 .aiff): log-mel x [N, C, n_mels, T], kind image, augmented as spectrogram
    sample_rate: Optional[int] = ranged(None, 1)   # Hz of the clips; null: the files' own (all must have one rate)
    resample: bool = True               # resample files of another rate (scipy resample_poly); false: such a file is an error
    mono: bool = True                   # mix the channels down to one (their mean); false: keep C channels (all files must have C)
    trim_db: Optional[float] = ranged(None, 0.0, lo_open=True)   # cut leading/trailing 5 ms frames more than trim_db below the loudest; null: keep
    duration: Optional[float] = ranged(None, 0.0, lo_open=True)  # seconds per clip (cut / zero-padded); null: the longest file
    crop: str = "centre"                # centre: keep a longer clip's middle, pad a shorter one on both sides | start: keep the beginning, pad at the end
    peak_normalize: bool = True         # scale each clip to peak 1 (after the crop)
    n_mels: int = ranged(32, 1)
    hop_length: Optional[int] = ranged(None, 1)   # samples; null: 20 ms (441 at 22,050 Hz)
    n_fft: Optional[int] = ranged(None, 1)        # samples; null: the smallest power of two >= 2 hop_length (1024 at 22,050 Hz)
    # images (.png .jpg .jpeg .bmp .gif .tif .tiff .webp): x [N, C, H, W] in [0, 1]
    image_mode: str = "auto"            # L (C=1) | RGB (C=3) | auto: L when every image is grayscale, else RGB
    image_size: Optional[int] = ranged(None, 1)   # resize to image_size x image_size; null: keep (all images must have one size)
    image_resample: str = "bilinear"    # Pillow's resampling filter: nearest | bilinear | bicubic | lanczos
    # .npy files: one item each, [D] vector, [C, L] signal or [C, H, W] image (all of one shape)

    CHOICES: ClassVar[dict] = {"group_from": ("auto", "pattern", "parent", "none"), "unmatched": ("error", "skip"),
                               "crop": ("centre", "start"), "image_mode": ("auto", "L", "RGB"),
                               "image_resample": ("nearest", "bilinear", "bicubic", "lanczos")}


@dataclass
class DataConfig:
    teacher: str = "digits/image"     # modality dataset name (registry ``ucmkd.data.DATASETS``)
    student: str = "digits/signal"
    split_seed: int = 0               # fixed splits: the same for every run seed
    test_frac: float = ranged(0.25, 0.0, 1.0, lo_open=True, hi_open=True)
    val_frac: float = ranged(0.2, 0.0, 1.0, lo_open=True, hi_open=True)             # carved from the training part
    val_by: str = "auto"              # validation of datasets with groups (speakers...): groups (whole ones held out) | items | auto: groups when there are enough (docs/data.md)
    cache_dir: Optional[str] = None   # default: $UCMKD_CACHE or ~/.cache/ucmkd
    mnist1d_samples: int = ranged(4000, 10)       # size of the generated digits/signal set
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    tabular: TabularConfig = field(default_factory=TabularConfig)
    spoken: SpokenDigitsConfig = field(default_factory=SpokenDigitsConfig)
    roots: dict = field(default_factory=dict)   # dataset family -> directory, e.g. {ravdess: /data/ravdess}
    options: dict = field(default_factory=dict)  # dataset family -> its typed options (a user dataset's ``register_dataset(options=...)``)
    av: AVConfig = field(default_factory=AVConfig)
    folder: FolderConfig = field(default_factory=FolderConfig)   # folder:PATH datasets (docs/data.md)
    standardize: str = "auto"         # auto (per_feature for vectors, global otherwise) | per_feature | global | none (docs/data.md)
    storage: str = "auto"             # memory | mmap (read lazily from a memory-mapped file) | auto: mmap for files above mmap_above_mb
    mmap_above_mb: float = ranged(2048.0, 0.0)   # storage=auto: a file-backed modality larger than this (MiB of float32) is read lazily
    workers: int = ranged(0, 0)       # DataLoader processes reading the batches of lazy modalities (0: the training process reads them)
    prefetch: int = ranged(2, 1)      # batches each worker reads ahead

    CHOICES: ClassVar[dict] = {"standardize": ("auto", "per_feature", "global", "none"),
                               "storage": ("auto", "memory", "mmap"), "val_by": ("auto", "items", "groups")}
    #: fields that change how the inputs are read, never their values (left out of run keys: the
    #: data's content fingerprint is in the key)
    IO_FIELDS: ClassVar[tuple] = ("storage", "mmap_above_mb", "workers", "prefetch")
    #: where files are, never what they hold (left out of run keys: the content fingerprints are in)
    PATH_FIELDS: ClassVar[tuple] = ("cache_dir", "roots")
    #: the sections one dataset family reads (``register_dataset(reads=...)``): a run's key holds
    #: those of its two datasets only (the others at their defaults)
    SECTIONS: ClassVar[tuple] = ("mnist1d_samples", "synthetic", "tabular", "spoken", "av")
    #: sections whose effect reaches run keys only through the data's fingerprint (they are part
    #: of a folder dataset's fingerprint; left out of run keys, so they key only runs that use one)
    FINGERPRINT_FIELDS: ClassVar[tuple] = ("folder",)


@dataclass
class PairingConfig:
    """How distillation batches join student items with teacher-modality items."""

    mode: str = "class-matched"           # class-matched | unpaired | paired
    label_budget: Optional[int] = ranged(10, 1)      # labelled student items per class (None = all)
    mismatch_ratio: Optional[float] = ranged(None, 0.0, 1.0, lo_open=True, hi_open=True)  # marginal mismatch: student share r of each class pool
    imbalance_rho: Optional[float] = ranged(None, 1.0)   # long-tail factor rho (keep (1/rho)^(rank/(K-1)))
    imbalance_side: str = "teacher"       # teacher | student
    shift_level: float = ranged(0.0, 0.0, 1.0)              # domain-shift corruption level (0 = none)
    shift_side: str = "student"           # teacher | student | both
    unlabelled_ratio: float = ranged(1.0, 0.0, lo_open=True)   # mu: unlabelled items per labelled item in a batch (FixMatch's 7; B_u = round(mu B))


@dataclass
class ModelConfig:
    teacher_backbone: str = "auto"   # auto picks by input kind: mlp | cnn1d | cnn2d
    student_backbone: str = "auto"
    teacher_width: int = ranged(64, 1)
    student_width: int = ranged(16, 1)
    teacher_feat_dim: int = ranged(64, 1)
    student_feat_dim: int = ranged(64, 1)       # != teacher_feat_dim adds a learned projector
    teacher_backbone_args: dict = field(default_factory=dict)   # extra builder kwargs, e.g. {model_name: vit_small_patch16_224}
    student_backbone_args: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    epochs: int = ranged(60, 1)
    batch_size: int = ranged(64, 1)
    lr: float = ranged(3e-3, 0.0, lo_open=True)
    weight_decay: float = ranged(0.05, 0.0)
    warmup_epochs: int = ranged(3, 0)
    min_lr: float = ranged(1e-6, 0.0)
    clip_norm: float = ranged(5.0, 0.0)                  # 0: no clipping
    steps_per_epoch: Optional[int] = ranged(8, 1)       # None: one pass over the labelled student pool
    optimizer: str = "adamw"             # adamw (torch.optim.AdamW) | sgd (torch.optim.SGD, nesterov off)
    momentum: float = ranged(0.9, 0.0)   # sgd only (AdamW keeps betas (0.9, 0.999), eps 1e-8)
    schedule_unit: str = "step"          # step: the lr changes every step | epoch: once per epoch, epoch 0 at min_lr (the authors')
    lr_decay: str = "cosine"             # after the warm-up: cosine to min_lr | poly: min_lr + (lr - min_lr) (1 - t)^0.9
    precision: str = "fp32"              # fp32 | bf16 | fp16 (CUDA only): autocast around the forwards; OT stays fp32

    CHOICES: ClassVar[dict] = {"optimizer": ("adamw", "sgd"), "schedule_unit": ("step", "epoch"),
                               "lr_decay": ("cosine", "poly"), "precision": ("fp32", "bf16", "fp16")}


@dataclass
class TeacherConfig(OptimConfig):
    """Teacher training schedule (an :class:`OptimConfig` with its own defaults) and seed, or the
    ``checkpoint`` of a teacher trained elsewhere."""

    epochs: int = ranged(30, 1)
    batch_size: int = ranged(128, 1)
    warmup_epochs: int = ranged(2, 0)
    steps_per_epoch: Optional[int] = ranged(None, 1)   # None: one pass over the teacher's training split
    seed: int = ranged(0, 0)     # one teacher per (data, model, schedule, seed), shared by student seeds
    # your own trained teacher, used as is instead of training one (docs/workflow.md): a state dict
    # of the configured teacher backbone, or a TorchScript module with features(x) and head(z);
    # its content (sha256 of the file) keys teachers and runs, the schedule fields above are unused
    checkpoint: Optional[str] = None


@dataclass
class MethodConfig:
    name: str = "ce"
    params: dict = field(default_factory=dict)   # validated by the method's own ``Params``


@dataclass
class AugmentConfig:
    """Augmentation (:mod:`ucmkd.augment`) shared by every method."""

    labelled: str = "none"            # none | weak | strong: applied to every method's labelled student items (a method may ask for more, e.g. ce-aug: weak)
    policy: Optional[str] = None      # a registered policy name; None: the student modality's augmentation kind

    CHOICES: ClassVar[dict] = {"labelled": ("none", "weak", "strong")}


@dataclass
class LoggingConfig:
    """Where training is logged besides ``metrics.jsonl``/``metrics.csv`` (always written). Not
    part of a run's key: logging never changes a result."""

    tensorboard: bool = False                # TensorBoard event files (pip install ucmkd[tensorboard])
    tensorboard_dir: Optional[str] = None    # default: <run_dir>/tb
    every_steps: int = ranged(1, 1)          # per-step values every this many steps


@dataclass
class RunConfig:
    """Everything that defines one student training run."""

    data: DataConfig = field(default_factory=DataConfig)
    pairing: PairingConfig = field(default_factory=PairingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = ranged(0, 0)
    device: str = "cpu"
    threads: Optional[int] = ranged(None, 1)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # a named recipe (``ucmkd list``; ucmkd/recipes/*.yaml): dotted overrides filled in between the
    # defaults and the mapping's own values when this config is built from a mapping (YAML file,
    # key=value overrides, ``from_dict``); see docs/reproduction.md
    recipe: Optional[str] = None
    # plugins imported before this config is read and wherever it runs (ucmkd.plugins): module
    # names or paths (relative ones read against the YAML file's directory); not part of run keys,
    # the code of theirs a run uses is (docs/plugins.md)
    plugins: list = field(default_factory=list)

    #: the recipe layer (:mod:`ucmkd.recipes`, which registers itself here: recipes sit above the
    #: config and the methods they validate): ``check(name)`` and ``expand(data, path)``
    RECIPES: ClassVar[dict] = {}

    def __post_init__(self):
        if self.recipe is not None:
            self._recipes()["check"](self.recipe)   # unknown names are an error listing the known ones

    @classmethod
    def expand(cls, data: dict, path: str) -> dict:
        """Fill in ``data``'s recipe (if it names one) under its own values."""
        if not isinstance(data, dict) or data.get("recipe") is None:
            return data
        return cls._recipes()["expand"](data, path)

    @classmethod
    def _recipes(cls) -> dict:
        if not cls.RECIPES:     # importing any ucmkd module imports the package, which loads the recipes
            raise ConfigError("recipes are not loaded yet (a config with a recipe built while ucmkd is imported)")
        return cls.RECIPES


@dataclass
class ExperimentConfig:
    """A grid: methods x seeds x directions over one base run config (``ucmkd run``)."""

    name: str = "digits"
    base: RunConfig = field(default_factory=RunConfig)
    methods: list = field(default_factory=lambda: ["ce", "ce-ls", "kd", "ucmkd-joint", "ucmkd-bilevel"])
    method_params: dict = field(default_factory=dict)   # method name -> params override
    # label -> {method: NAME, params: {...}, overrides: {dotted.key: value}}; a label may be
    # listed in ``methods`` like a method name (e.g. a paired-data oracle: kd with pairing.mode=paired)
    variants: dict = field(default_factory=dict)
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    directions: list = field(default_factory=lambda: [["digits/image", "digits/signal"],
                                                      ["digits/signal", "digits/image"]])
    out_dir: str = "outputs/digits"
    quick: dict = field(default_factory=dict)    # dotted overrides applied by --quick
    plugins: list = field(default_factory=list)  # imported before the grid is read (docs/plugins.md)


@dataclass
class SettingConfig:
    """One setting of a benchmark suite: dotted overrides of the suite's base config."""

    overrides: dict = field(default_factory=dict)
    extra_methods: list = field(default_factory=list)   # run only here (e.g. paired-kd where pairs exist)
    exclude_methods: list = field(default_factory=list)  # suite methods that cannot run here (e.g. reviewkd on MLPs)
    description: str = ""


@dataclass
class HeadlineConfig:
    """A suite's headline method, reported on its own in ``<method>.md`` (:func:`ucmkd.report.headline_report`)."""

    method: Optional[str] = None     # None: no headline report
    compare: list = field(default_factory=list)   # methods shown in their own columns (e.g. the paper's)
    control: Optional[str] = None    # a teacher-free control, in its own column
    ablation_prefix: Optional[str] = None   # variants named <prefix><ingredient> are its ablations
    ungated: Optional[str] = None    # label of the rows made of its runs' "student" candidate (no selection)
    aug_baseline: Optional[str] = None   # the augmented supervised baseline (ce-aug): method minus it, paired by seed, in its own column


@dataclass
class SuiteConfig:
    """``ucmkd bench``: settings x methods x seeds, with paired statistics against ``baseline``."""

    name: str = "suite"
    out_dir: str = "outputs/bench"
    base: RunConfig = field(default_factory=RunConfig)
    methods: list = field(default_factory=lambda: ["ce"])
    method_params: dict = field(default_factory=dict)
    variants: dict = field(default_factory=dict)
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    settings: dict = field(default_factory=dict)        # name -> SettingConfig fields
    baseline: str = "ce"
    workers: int = ranged(1, 1)              # cells run side by side
    nproc_per_cell: int = ranged(1, 1)       # > 1: each cell trains data-parallel in this many processes (torchrun)
    headline: HeadlineConfig = field(default_factory=HeadlineConfig)
    plugins: list = field(default_factory=list)  # imported before the suite is read (docs/plugins.md)


# --------------------------------------------------------------------------- (de)serialisation
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; errors name ``path``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is Any:
        return value
    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return tuple(value)
    if tp in (list, dict) or origin in (list, dict):
        base = origin or tp
        if not isinstance(value, base):
            raise ConfigError(f"{path}: expected a {base.__name__}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):   # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported field type {_type_name(tp)}")


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a (possibly partial) nested dict; unknown keys are errors."""
    if data is None:
        data = {}
    if is_dataclass(data):
        data = asdict(data)
    where = path or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    if hasattr(cls, "expand"):   # a class may fill in a mapping before validation (RunConfig: its recipe)
        data = cls.expand(data, path)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown field {_join(path, unknown[0])!r}; known fields of "
                          f"{where}: {', '.join(sorted(known))}")
    if "plugins" in known and data.get("plugins"):
        # imported before any field is read: a plugin's dataset or method names validate
        specs = _coerce(data["plugins"], list, _join(path, "plugins"))
        data = {**data, "plugins": [resolve_spec(s) for s in specs]}
        _plugin_loader()(data["plugins"], where=_join(path, "plugins"))
    kwargs = {}
    for f in fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], _join(path, f.name))
            _check_range(f, kwargs[f.name], _join(path, f.name))
    allowed = choices_of(cls)   # string fields with a fixed set of values
    for name, value in kwargs.items():
        _check_choice(allowed, name, value, _join(path, name))
    return cls(**kwargs)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def to_dict(cfg: Any) -> dict:
    return asdict(cfg)


def nest(dotted) -> dict:
    """Dotted keys -> nested dict: ``{"optim.lr": 1e-3}`` -> ``{"optim": {"lr": 1e-3}}``.

    ``dotted`` is a dict or a list of (key, value) pairs (later pairs win); a key that is both
    a leaf and a section (``a=1`` with ``a.b=2``) is a :class:`ConfigError`.
    """
    out: dict = {}
    for key, value in (dotted.items() if isinstance(dotted, dict) else dotted):
        parts = str(key).strip().split(".")
        if not all(parts):
            raise ConfigError(f"override key {key!r} has an empty part")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with an earlier override of {p!r}")
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(f"override {key!r} conflicts with an earlier override of {key + '.*'!r}")
        node[parts[-1]] = value
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """``["optim.lr=1e-3", "method.params.w_fa=0.5"]`` -> nested dict (values parsed as YAML)."""
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            pairs.append((key, yaml.safe_load(raw) if raw != "" else ""))
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse value: {e}") from None
    return nest(pairs)


def deep_merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; ``update`` wins. Returns a new dict."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Any:
    """Defaults <- ``base`` dict <- YAML file <- ``key=value`` overrides, validated into ``cls``."""
    data = dict(base or {})
    if path is not None:
        data = deep_merge(data, resolve_plugin_paths(cls, load_yaml(path), Path(str(path)).parent))
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def is_path(spec: str) -> bool:
    """Whether plugin ``spec`` names a file or directory (``.py`` suffix or a path separator)
    rather than a module."""
    return spec.endswith(".py") or "/" in spec or os.sep in spec or spec.startswith(("~", "."))


def resolve_spec(spec: str, base_dir: Optional[str | Path] = None) -> str:
    """Plugin ``spec`` as loaded: a path made absolute (a relative one against ``base_dir``,
    default the working directory); a module name as given."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"plugin spec: expected a module name or a path, got {spec!r}")
    spec = spec.strip()
    if not is_path(spec):
        return spec
    p = Path(spec).expanduser()
    if not p.is_absolute():
        p = Path(base_dir if base_dir is not None else os.getcwd()) / p
    return str(p.resolve())


_PLUGIN_LOADER: list = []


def register_plugin_loader(fn) -> None:
    """Set the function that imports a config's ``plugins`` (:func:`ucmkd.plugins.load_plugins`,
    which registers itself: the plugin layer sits above the config)."""
    _PLUGIN_LOADER[:] = [fn]


def _plugin_loader():
    if not _PLUGIN_LOADER:     # importing any ucmkd module imports the package, which loads the plugin layer
        raise ConfigError("plugins: the plugin loader is not set (ucmkd.plugins not imported)")
    return _PLUGIN_LOADER[0]


def resolve_plugin_paths(cls: type, data: dict, base_dir: Path) -> dict:
    """``data`` (a YAML mapping read into ``cls``) with the relative paths of its ``plugins``
    lists (``cls``'s and those of its dataclass sections, e.g. a suite's ``base``) read against
    ``base_dir``."""
    if not is_dataclass(cls) or not isinstance(data, dict):
        return data
    hints, out = typing.get_type_hints(cls), dict(data)
    for f in fields(cls):
        v = out.get(f.name)
        if f.name == "plugins" and isinstance(v, list):
            out[f.name] = [resolve_spec(s, base_dir) if isinstance(s, str) and s.strip() else s for s in v]
        elif is_dataclass(hints[f.name]) and isinstance(v, dict):
            out[f.name] = resolve_plugin_paths(hints[f.name], v, base_dir)
    return out


def builtin_yaml(package: str) -> list[str]:
    """Names of the YAML files shipped in ``package`` (e.g. ``ucmkd.configs``), without suffix."""
    from importlib import resources

    return sorted(p.name[:-5] for p in resources.files(package).iterdir() if p.name.endswith(".yaml"))


def resolve_yaml(package: str, name: str, what: str):
    """A built-in name from ``package`` or a path to a ``.yaml``/``.yml`` file."""
    from importlib import resources

    if name in builtin_yaml(package):
        return resources.files(package) / f"{name}.yaml"
    if Path(name).suffix in (".yaml", ".yml"):
        return Path(name)
    raise ConfigError(f"unknown {what} {name!r}: give a built-in one ({', '.join(builtin_yaml(package))}) "
                      f"or a path to a .yaml file")


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML to ``path``, atomically."""
    from .cache import write_text

    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_hash(obj: Any, n: int = 10) -> str:
    """Stable short hash of a dataclass or dict (key order independent)."""
    d = to_dict(obj) if is_dataclass(obj) else obj
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def replace(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)
