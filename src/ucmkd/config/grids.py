"""Grids of runs: an experiment (``ucmkd run``) and a benchmark suite (``ucmkd bench``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .fields import ranged
from .run import RunConfig


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
