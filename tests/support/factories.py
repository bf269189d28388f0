"""Small configurations the tests share: a RunConfig from a data choice, layers and dotted fields
(:func:`run_config`), the small synthetic run most engine tests train (:func:`small_config`) and
the tiny bench suite (:data:`TINY_BASE`, :func:`tiny_suite`). (A DataConfig is built directly:
``DataConfig(cache_dir=..., ...)`` is already the factory.)

Fields are set by plain assignment on ``RunConfig()``, as a test writes them (no YAML parsing,
no range check: a test that wants those builds its config with ``load_config``/``from_dict``);
a dotted name that is no field is an error, so a typo never builds another config silently.
"""
from __future__ import annotations

from ucmkd.config import RunConfig, SuiteConfig, SyntheticConfig, from_dict

#: the synthetic problem: views a -> b of 400 items in 4 classes
SYNTHETIC = {"data.teacher": "synthetic/a", "data.student": "synthetic/b",
             "data.synthetic": SyntheticConfig(n_items=400, num_classes=4)}      # frozen: shared safely
#: a small teacher trained briefly: 16 wide, 8-d features, 5 epochs of batches of 32
SMALL_TEACHER = {"teacher.epochs": 5, "teacher.batch_size": 32, "model.teacher_width": 16, "model.teacher_feat_dim": 8}
#: a small student: 16 wide, 8-d features
SMALL_STUDENT = {"model.student_width": 16, "model.student_feat_dim": 8}
#: short epochs: 3 steps of 16 items, one warm-up epoch
SMALL_STEPS = {"optim.steps_per_epoch": 3, "optim.batch_size": 16, "optim.warmup_epochs": 1}


def set_fields(cfg, fields: dict):
    """Set each dotted field (``"optim.epochs"``, ``"seed"``) of ``cfg`` to its value; returns ``cfg``."""
    for dotted, value in fields.items():
        *path, leaf = dotted.split(".")
        node = cfg
        for p in path:
            node = getattr(node, p)
        if not hasattr(node, leaf):
            raise AttributeError(f"{dotted!r} is no field of {type(cfg).__name__}")
        setattr(node, leaf, value)
    return cfg


def run_config(method: str | None = None, epochs: int | None = None, cache_dir=None, *,
               data: str | tuple[str, str] | None = None, layers: tuple[dict, ...] = (), **fields) -> RunConfig:
    """``RunConfig()`` with, in order: the data (``"synthetic"``: :data:`SYNTHETIC`; a pair: the
    teacher's and the student's dataset names), each layer of ``layers``, ``method.name``,
    ``optim.epochs``, ``data.cache_dir`` (those three where given), then the dotted ``fields``
    (``**{"optim.steps_per_epoch": 2}``, ``seed=1``)."""
    cfg = RunConfig()
    if data == "synthetic":
        set_fields(cfg, SYNTHETIC)
    elif data is not None:
        cfg.data.teacher, cfg.data.student = data
    for layer in layers:
        set_fields(cfg, layer)
    if method is not None:
        cfg.method.name = method
    if epochs is not None:
        cfg.optim.epochs = epochs
    if cache_dir is not None:
        cfg.data.cache_dir = str(cache_dir)
    return set_fields(cfg, fields)


def small_config(method: str = "ucmkd-joint", epochs: int = 4, cache_dir=None, **fields) -> RunConfig:
    """The small synthetic run: :data:`SYNTHETIC` with :data:`SMALL_TEACHER`, :data:`SMALL_STUDENT`
    and :data:`SMALL_STEPS`; a ucmkd-family method at 10 Sinkhorn iterations (enough here);
    then the dotted ``fields``."""
    ucmkd = {"method.params": {"n_iter": 10}} if method.startswith("ucmkd") else {}
    return run_config(method, epochs, cache_dir, data="synthetic",
                      layers=(SMALL_TEACHER, SMALL_STUDENT, SMALL_STEPS, ucmkd), **fields)


#: the tiny bench base: 300 synthetic items in 3 classes, 5 labels a class, 8-wide models, 2 epochs
#: of 2 steps, a teacher of 2 epochs (a mapping: ``from_dict``, suites and YAML read it)
TINY_BASE = {
    "data": {"teacher": "synthetic/a", "student": "synthetic/b", "synthetic": {"n_items": 300, "num_classes": 3}},
    "pairing": {"label_budget": 5},
    "model": {"teacher_width": 8, "student_width": 8, "teacher_feat_dim": 8, "student_feat_dim": 8},
    "optim": {"epochs": 2, "steps_per_epoch": 2, "batch_size": 16},
    "teacher": {"epochs": 2, "batch_size": 32},
}


def tiny_suite(**kw) -> SuiteConfig:
    """Suite ``tiny``: ce and kd, seeds 0-2, on :data:`TINY_BASE` in two settings (``mild``; ``noisy``:
    view b noisier); ``kw`` replaces top-level entries."""
    d = {"name": "tiny", "methods": ["ce", "kd"], "seeds": [0, 1, 2], "base": TINY_BASE,
         "settings": {"mild": {"overrides": {}},
                      "noisy": {"overrides": {"data.synthetic.noise": 1.5}, "description": "noisier view B"}}}
    d.update(kw)
    return from_dict(SuiteConfig, d)
