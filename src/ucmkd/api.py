"""The Python API: one call per job. The CLI (:mod:`ucmkd.cli`) is a thin layer over it.

>>> from ucmkd import RunConfig, run
>>> cfg = RunConfig()                      # digits: image teacher -> signal student, ``ce``
>>> result = run(cfg, run_dir="runs/demo")  # doctest: +SKIP
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from .config import RunConfig, config_hash, save_config, to_dict
from .data import ModalityData, PairingSampler, check_compatible, load_modality
from .engine import Trainer, get_teacher, seed_everything
from .errors import ConfigError
from .methods import METHODS
from .models import Classifier, build_classifier


def build_student(cfg: RunConfig, data: ModalityData) -> Classifier:
    m = cfg.model
    return build_classifier(data.input_shape, data.kind, data.num_classes, m.student_backbone,
                            m.student_width, m.student_feat_dim, name=f"student[{data.name}]",
                            backbone_args=m.student_backbone_args)


def load_pair(cfg: RunConfig) -> tuple[ModalityData, ModalityData]:
    """(student, teacher) modalities of ``cfg.data``, checked to share one label space."""
    student = load_modality(cfg.data.student, cfg.data)
    teacher = load_modality(cfg.data.teacher, cfg.data)
    check_compatible(student, teacher)
    return student, teacher


def run_key(cfg: RunConfig) -> str:
    """Hash of everything that makes runs differ (the device and thread count excluded)."""
    d = to_dict(cfg)
    d.pop("device", None)
    d.pop("threads", None)
    return config_hash(d)


def run(cfg: RunConfig, run_dir: Optional[str | Path] = None, student: Optional[ModalityData] = None,
        teacher_data: Optional[ModalityData] = None, teacher: Optional[Classifier] = None,
        teacher_info: Optional[dict] = None, progress: bool = False, student_model: Optional[Classifier] = None,
        resume: bool = True) -> dict:
    """Train one student with ``cfg.method`` and return its result dict.

    Data, teacher and student model may be passed in (bring your own); otherwise they are
    built from ``cfg``. With ``run_dir`` the run is checkpointed there, its resolved config
    saved as ``config.yaml``, and a finished run (``result.json`` with the same key) is reused.

    Result keys: method, seed, teacher/student names, test_acc (at best val epoch), val_acc,
    best_epoch, last_test_acc, teacher_test_acc, seconds, run_dir, key; ``selected``
    ("student", or "fallback" when a validation-gated method fell back) and ``candidates``
    (each candidate's best-validation epoch, val and test accuracy).
    """
    method_cls = METHODS.get(cfg.method.name)
    params = method_cls.parse_params(cfg.method.params)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    key = run_key(cfg)
    run_dir = Path(run_dir) if run_dir is not None else None
    if run_dir is not None and resume and (run_dir / "result.json").is_file():
        res = json.loads((run_dir / "result.json").read_text())
        if res.get("key") == key:
            return res
    if student is None or (teacher_data is None and method_cls.uses_teacher):
        s, t = load_pair(cfg)
        student = student or s
        teacher_data = teacher_data or t
    if teacher_data is not None:
        check_compatible(student, teacher_data)
    if method_cls.needs_pairs and cfg.pairing.mode != "paired":
        raise ConfigError(f"method {cfg.method.name!r} needs pairing.mode: paired, got {cfg.pairing.mode!r}")
    if method_cls.uses_teacher and teacher is None:
        teacher, teacher_info = get_teacher(cfg, teacher_data, progress=progress)
    diag_teacher = teacher if teacher_data is not None else None   # also measures teacher-free methods
    if not method_cls.uses_teacher:
        teacher = None
    seed_everything(cfg.seed)
    model = student_model if student_model is not None else build_student(cfg, student)
    distiller = method_cls(model, teacher, params)
    if teacher is not None:
        from .engine.teacher_outputs import TeacherOutputs

        distiller.use_teacher_outputs(TeacherOutputs(teacher, teacher_data, cfg.device))
    sampler = PairingSampler(student, teacher_data if method_cls.uses_teacher else None, cfg.pairing,
                             cfg.optim.batch_size, cfg.optim.steps_per_epoch, seed=cfg.seed,
                             unlabelled=distiller.uses_unlabelled,
                             require_unlabelled=distiller.requires_unlabelled)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    desc = f"{cfg.method.name} {cfg.data.teacher}->{cfg.data.student} s{cfg.seed}"
    trainer = Trainer(distiller, sampler, student, cfg.optim, run_dir=run_dir, config_hash=key,
                      device=cfg.device, progress=progress, desc=desc)
    t0 = time.time()
    fit = trainer.fit()
    trainer.restore_best()
    diag = {}
    if diag_teacher is not None:
        from .diagnostics import alignment_diagnostics

        proj = distiller.extra["projector"] if "projector" in distiller.extra else None
        diag = alignment_diagnostics(model, diag_teacher, student, teacher_data, projector=proj,
                                     seed=cfg.seed, device=cfg.device)
    result = {
        "method": cfg.method.name, "seed": cfg.seed, "teacher": cfg.data.teacher, "student": cfg.data.student,
        "test_acc": fit.test_acc, "val_acc": fit.val_acc, "best_epoch": fit.best_epoch,
        "last_test_acc": fit.last_test_acc, "epochs": fit.epochs,
        "selected": fit.selected, "candidates": fit.candidates,
        "teacher_test_acc": (teacher_info or {}).get("test_acc", float("nan")),
        "seconds": time.time() - t0, "sampler": sampler.summary(),
        **{f"diag_{k}": v for k, v in diag.items()},
        "params": asdict(params), "run_dir": str(run_dir) if run_dir else None, "key": key,
    }
    if run_dir is not None:
        (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    result["distiller"] = distiller   # holds the best-validation student; not in result.json
    return result
