"""Teacher training: cross-entropy on the teacher modality, checkpointed and reused.

Teachers are cached under ``<cache>/teachers/<dataset>-<key>/`` (:func:`ucmkd.cache.entry`):
the key hashes everything that makes two teachers differ: the dataset's content fingerprint
(:attr:`ModalityData.fingerprint`: a changed dataset under the same name gets a new teacher)
and split settings, the teacher architecture, the training schedule and the teacher seed.
``teacher.pt`` is written last and atomically; ``run/`` holds the teacher's own resumable
training run.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict

import torch

from ..cache import entry, get_or_build, write_json
from ..config import PairingConfig, RunConfig, config_hash
from ..data.base import ModalityData, cache_dir
from ..data.pairing import PairingSampler, loader_options
from ..errors import DataError
from ..models import Classifier, build_classifier
from ..plugins import user_code
from .checkpoint import apply_threads, load_checkpoint, seed_everything
from .trainer import Trainer, evaluate

TEACHER_KEY_VERSION = 2    # 2: the dataset's content fingerprint


def teacher_key(cfg: RunConfig, data: ModalityData) -> dict:
    """Everything that makes teachers differ (hashed into the cache path)."""
    d = cfg.data
    dataset = {"name": data.name, "split_seed": d.split_seed, "test_frac": d.test_frac, "val_frac": d.val_frac,
               "fingerprint": data.fingerprint}
    m = cfg.model
    key = {"dataset": dataset, "input_shape": list(data.input_shape), "classes": list(data.classes),
           "backbone": m.teacher_backbone, "width": m.teacher_width, "feat_dim": m.teacher_feat_dim,
           **({"backbone_args": m.teacher_backbone_args} if m.teacher_backbone_args else {}),
           "train": asdict(cfg.teacher), "version": TEACHER_KEY_VERSION}
    code = user_code({k: key[k] for k in ("backbone", "backbone_args") if k in key})   # a plugin's backbone
    return {**key, "user_code": code} if code else key


def build_teacher_model(cfg: RunConfig, data: ModalityData) -> Classifier:
    m = cfg.model
    return build_classifier(data.input_shape, data.kind, data.num_classes, m.teacher_backbone,
                            m.teacher_width, m.teacher_feat_dim, name=f"teacher[{data.name}]",
                            backbone_args=m.teacher_backbone_args)


def teacher_dir(cfg: RunConfig, data: ModalityData):
    return entry(cache_dir(cfg.data), "teachers", data.name, teacher_key(cfg, data))


def load_teacher(path, cfg: RunConfig, data: ModalityData) -> tuple[Classifier, dict]:
    """Load a trained teacher from ``path`` (a ``teacher.pt``), strictly."""
    st = load_checkpoint(path)
    if "model" not in st or "info" not in st:
        raise DataError(f"{path}: not a ucmkd teacher checkpoint (keys {sorted(st)})")
    model = build_teacher_model(cfg, data)
    try:
        model.load_state_dict(st["model"], strict=True)
    except RuntimeError as e:
        raise DataError(f"{path}: teacher weights do not fit the configured teacher model: {e}") from None
    model.eval().requires_grad_(False)
    return model, st["info"]


def get_teacher(cfg: RunConfig, data: ModalityData, progress: bool = False,
                retrain: bool = False) -> tuple[Classifier, dict]:
    """Return (frozen teacher, info) for ``data``, training and caching it if needed
    (``retrain``: train again from scratch; the cached teacher is replaced once the new one is
    complete).

    info: ``{"val_acc", "test_acc", "best_epoch", "seconds", "path", "key"}``.
    """
    apply_threads(cfg.threads)
    tdir = teacher_dir(cfg, data)
    path = tdir / "teacher.pt"

    def train() -> tuple[Classifier, dict]:
        if retrain:
            shutil.rmtree(tdir / "run", ignore_errors=True)     # else the finished run would resume
        t = cfg.teacher
        seed_everything(t.seed)
        model = build_teacher_model(cfg, data)
        from ..methods import build_distiller

        distiller = build_distiller("ce", model, None)
        sampler = PairingSampler(data, None, PairingConfig(label_budget=None), t.batch_size, t.steps_per_epoch,
                                 seed=t.seed, **loader_options(cfg.data, cfg.device))
        key = teacher_key(cfg, data)
        trainer = Trainer(distiller, sampler, data, t, run_dir=tdir / "run", config_hash=config_hash(key),
                          device=cfg.device, progress=progress, desc=f"teacher {data.name}")
        t0 = time.time()
        res = trainer.fit()
        trainer.restore_best()
        model.cpu().eval().requires_grad_(False)
        val_acc, _ = evaluate(model, *data.split("val"))
        test_acc, _ = evaluate(model, *data.split("test"))
        return model, {"val_acc": val_acc, "test_acc": test_acc, "best_epoch": res.best_epoch,
                       "seconds": time.time() - t0, "path": str(path), "key": key}

    def save(value, tmp) -> None:
        torch.save({"model": value[0].state_dict(), "info": value[1]}, tmp)

    model, info = get_or_build(path, train, save, lambda p: load_teacher(p, cfg, data), "teacher checkpoint",
                               rebuild=retrain)
    if not (tdir / "info.json").is_file() or retrain:
        write_json(tdir / "info.json", info)
    return model, info


__all__ = ["get_teacher", "load_teacher", "teacher_key", "teacher_dir", "build_teacher_model"]
