"""The sections of one run (:class:`RunConfig`): pairing, models, optimisation, teacher,
method, augmentation, logging."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from ..errors import ConfigError
from .data import DataConfig
from .fields import ranged


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

#: the plain supervised method (cross-entropy on the labelled items): teachers train with it (their
#: own run, :func:`ucmkd.assembly.teacher_run_config`), so do the diagnose probe and the feature
#: plot's comparison run; experiments take it as their baseline
SUPERVISED = "ce"


@dataclass
class MethodConfig:
    name: str = SUPERVISED
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
