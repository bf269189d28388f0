"""Teacher training: cross-entropy on the teacher modality, checkpointed and reused.

Teachers are cached under ``<cache>/teachers/<dataset>-<key>/`` (:func:`ucmkd.cache.entry`):
the key hashes everything that makes two teachers differ: the dataset's content fingerprint
(:attr:`ModalityData.fingerprint`: a changed dataset under the same name gets a new teacher)
and split settings, the teacher architecture, the training schedule and the teacher seed.
``teacher.pt`` is written last and atomically; ``run/`` holds the teacher's own resumable
training run.

A teacher trained elsewhere (``teacher.checkpoint``, :func:`checkpoint_teacher`) is used as is:
its key holds the sha256 of the file's bytes instead of the training schedule, and its entry
holds only ``info.json`` (its validation and test accuracy, measured once).
"""
from __future__ import annotations

import shutil
import time
import zipfile
from dataclasses import asdict
from pathlib import Path

import torch

from ..cache import entry, file_sha256, get_or_build, read_json, write_json
from ..config import RunConfig, config_hash
from ..data.base import ModalityData, cache_dir
from ..errors import ConfigError, DataError
from ..models import Classifier, build_model
from ..models.scripted import scripted_classifier
from ..plugins import user_code
from .checkpoint import apply_threads, load_checkpoint
from .trainer import evaluate

TEACHER_KEY_VERSION = 2    # 2: the dataset's content fingerprint


def teacher_key(cfg: RunConfig, data: ModalityData) -> dict:
    """Everything that makes teachers differ (hashed into the cache path): the data, the
    architecture, and the training schedule, or the sha256 of ``teacher.checkpoint``'s bytes."""
    d = cfg.data
    dataset = {"name": data.name, "split_seed": d.split_seed, "test_frac": d.test_frac, "val_frac": d.val_frac,
               "fingerprint": data.fingerprint}
    m = cfg.model
    train = {k: v for k, v in asdict(cfg.teacher).items() if k != "checkpoint"}
    source = ({"train": train} if cfg.teacher.checkpoint is None else
              {"checkpoint": {"sha256": file_sha256(cfg.teacher.checkpoint, "teacher.checkpoint")}})
    key = {"dataset": dataset, "input_shape": list(data.input_shape), "classes": list(data.classes),
           "backbone": m.teacher_backbone, "width": m.teacher_width, "feat_dim": m.teacher_feat_dim,
           **({"backbone_args": m.teacher_backbone_args} if m.teacher_backbone_args else {}),
           **source, "version": TEACHER_KEY_VERSION}
    code = user_code({k: key[k] for k in ("backbone", "backbone_args") if k in key})   # a plugin's backbone
    return {**key, "user_code": code} if code else key


def build_teacher_model(cfg: RunConfig, data: ModalityData) -> Classifier:
    """An untrained teacher for modality ``data`` (``cfg.model``'s teacher settings)."""
    return build_model(cfg.model, "teacher", data.input_shape, data.kind, data.num_classes, f"teacher[{data.name}]")


def teacher_dir(cfg: RunConfig, data: ModalityData):
    return entry(cache_dir(cfg.data), "teachers", data.name, teacher_key(cfg, data))


def load_teacher(path, cfg: RunConfig, data: ModalityData) -> tuple[Classifier, dict]:
    """Load a trained teacher from ``path`` (a ``teacher.pt``), strictly."""
    st = load_checkpoint(path)
    if "model" not in st or "info" not in st:
        raise DataError(f"{path}: not a ucmkd teacher checkpoint (keys {sorted(st)})")
    model = build_teacher_model(cfg, data)
    load_strict(model, st["model"], path, data, backbone_text(cfg, data))
    model.eval().requires_grad_(False)
    return model, st["info"]


def backbone_text(cfg: RunConfig, data: ModalityData) -> str:
    """The configured teacher backbone, in words (for error messages)."""
    m = cfg.model
    return (f"{m.teacher_backbone} for {data.kind} inputs {list(data.input_shape)}, model.teacher_width="
            f"{m.teacher_width}, model.teacher_feat_dim={m.teacher_feat_dim}"
            + (f", model.teacher_backbone_args={m.teacher_backbone_args}" if m.teacher_backbone_args else ""))


def load_strict(model: Classifier, state: dict, source, data: ModalityData, arch: str = "") -> None:
    """Load ``state`` into ``model`` (the configured teacher backbone) strictly. A
    :class:`DataError` names ``source`` (the file) and what does not fit: the number of classes
    (against ``data``'s), the feature dim (against ``model.teacher_feat_dim``), or a parameter
    that is missing, unexpected or of another shape (the checkpoint's and the backbone's; ``arch``
    describes the backbone, :func:`backbone_text`)."""
    expected = model.state_dict()
    head = state.get("head.weight")
    if isinstance(head, torch.Tensor) and head.ndim == 2 and tuple(head.shape) != tuple(expected["head.weight"].shape):
        if head.shape[0] != data.num_classes:
            raise DataError(f"{source}: the checkpoint's head has {head.shape[0]} classes (head.weight "
                            f"{list(head.shape)}), but {data.name!r} has {data.num_classes} "
                            f"({', '.join(map(str, data.classes))})")
        raise DataError(f"{source}: the checkpoint's features have dimension {head.shape[1]} (head.weight "
                        f"{list(head.shape)}), but model.teacher_feat_dim is {model.feat_dim}; set "
                        f"model.teacher_feat_dim={head.shape[1]}")
    fit = f"{source}: the weights do not fit the configured teacher backbone ({arch or model.name}): parameter"
    for k, v in expected.items():
        if k not in state:
            raise DataError(f"{fit} {k!r} (shape {list(v.shape)} in the backbone) is missing from the checkpoint "
                            f"(its {len(state)} entries include {', '.join(list(state)[:3])})")
        if tuple(state[k].shape) != tuple(v.shape):
            raise DataError(f"{fit} {k!r} has shape {list(state[k].shape)} in the checkpoint but {list(v.shape)} "
                            f"in the backbone")
    extra = [k for k in state if k not in expected]
    if extra:
        raise DataError(f"{fit} {extra[0]!r} (shape {list(state[extra[0]].shape)} in the checkpoint) is not in the "
                        f"backbone" + (f" (nor are {len(extra) - 1} more)" if len(extra) > 1 else ""))
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- a teacher trained elsewhere
CHECKPOINT_ENTRIES = ("state_dict", "model")   # a dict holding the state dict under one of these


def checkpoint_format(path) -> str:
    """``"torchscript"`` (a ``torch.jit.save`` archive) or ``"state_dict"`` (``torch.save``)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return "state_dict"            # torch.save's legacy (non-zip) format
    return "torchscript" if any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in names) else "state_dict"


def read_state_dict(path) -> dict:
    """The state dict in ``path`` (``torch.load``, weights only): the file's dict itself, or its
    ``state_dict`` or ``model`` entry (``ucmkd export`` and ``teacher.pt`` files)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: cannot read the teacher checkpoint with torch.load(weights_only=True) "
                        f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    if isinstance(obj, dict):
        for k in CHECKPOINT_ENTRIES:
            if isinstance(obj.get(k), dict):
                obj = obj[k]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = (f"a dict with keys {', '.join(map(str, list(obj)[:5]))}" if isinstance(obj, dict)
                else type(obj).__name__)
        raise DataError(f"{path}: not a state dict (parameter name -> tensor), nor a dict holding one under "
                        f"{' or '.join(map(repr, CHECKPOINT_ENTRIES))}: it holds {what}")
    return obj


def checkpoint_teacher(cfg: RunConfig, data: ModalityData) -> Classifier:
    """The teacher in ``cfg.teacher.checkpoint``, as is (frozen, eval mode), checked against
    ``data`` (classes, input) and ``cfg.model`` (teacher backbone, feature dim): a state dict of
    the configured teacher backbone (loaded strictly, :func:`load_strict`), or a TorchScript
    module with ``features(x) -> [B, d]`` and ``head(z) -> [B, K]``
    (:func:`ucmkd.models.scripted.scripted_classifier`)."""
    path = Path(cfg.teacher.checkpoint).expanduser()
    file_sha256(path, "teacher.checkpoint")          # a missing file: an error naming the field
    name = f"teacher[{data.name}]"
    if checkpoint_format(path) == "torchscript":
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: cannot load the TorchScript teacher ({type(e).__name__}: {e})") from None
        x = data.x[data.splits["train"][:2]]
        model = scripted_classifier(module, torch.as_tensor(x), data.num_classes, cfg.model.teacher_feat_dim,
                                    str(path), name=name,
                                    data=f"{data.name!r} ({', '.join(map(str, data.classes))})")
    else:
        model = build_teacher_model(cfg, data)
        load_strict(model, read_state_dict(path), path, data, backbone_text(cfg, data))
    model.input_kind = data.kind
    return model.eval().requires_grad_(False)


def _checkpoint_info(cfg: RunConfig, data: ModalityData, model: Classifier, retrain: bool) -> dict:
    """The info of a checkpoint teacher: its validation and test accuracy, measured once and
    cached in its entry's ``info.json`` (``retrain``: measured again), and where the file is."""
    path = Path(cfg.teacher.checkpoint).expanduser()

    def measure() -> dict:
        t0 = time.time()
        val_acc, _ = evaluate(model, *data.split("val"))
        test_acc, _ = evaluate(model, *data.split("test"))
        return {"val_acc": val_acc, "test_acc": test_acc, "best_epoch": None, "seconds": time.time() - t0,
                "path": str(path), "key": teacher_key(cfg, data),
                "checkpoint": {"path": str(path), "sha256": file_sha256(path), "format": checkpoint_format(path)}}

    info = get_or_build(teacher_dir(cfg, data) / "info.json", measure, lambda v, tmp: write_json(tmp, v),
                        lambda p: read_json(p, "teacher info"), "teacher info", rebuild=retrain)
    # the entry is keyed by the file's content: a copy elsewhere shares it, and is named where it is now
    return {**info, "path": str(path), "checkpoint": {**info["checkpoint"], "path": str(path)}}


#: how a teacher trains: ``fn(cfg, data, run_dir, config_hash, progress) -> (model, best epoch)``;
#: :mod:`ucmkd.assembly` registers its ordinary run of a derived config (that layer builds every
#: run; the engine below it does not import it)
_TRAINING: list = []


def register_teacher_training(fn) -> None:
    _TRAINING[:] = [fn]


def get_teacher(cfg: RunConfig, data: ModalityData, progress: bool = False,
                retrain: bool = False) -> tuple[Classifier, dict]:
    """Return (frozen teacher, info) for ``data``, training and caching it if needed
    (``retrain``: train again from scratch; the cached teacher is replaced once the new one is
    complete).

    info: ``{"val_acc", "test_acc", "best_epoch", "seconds", "path", "key"}``. With
    ``teacher.checkpoint`` the teacher is that file's (:func:`checkpoint_teacher`, nothing
    trains; ``retrain`` measures its accuracy again); its info has ``best_epoch`` None, ``path``
    the file and ``checkpoint`` {path, sha256, format}.
    """
    apply_threads(cfg.threads)
    if cfg.teacher.checkpoint is not None:
        model = checkpoint_teacher(cfg, data)
        return model, _checkpoint_info(cfg, data, model, retrain)
    tdir = teacher_dir(cfg, data)
    path = tdir / "teacher.pt"

    def train() -> tuple[Classifier, dict]:
        if retrain:
            shutil.rmtree(tdir / "run", ignore_errors=True)     # else the finished run would resume
        if not _TRAINING:
            raise ConfigError("no teacher training registered (ucmkd.assembly registers it when ucmkd is imported)")
        key = teacher_key(cfg, data)
        t0 = time.time()
        model, best_epoch = _TRAINING[0](cfg, data, tdir / "run", config_hash(key), progress)
        model.cpu().eval().requires_grad_(False)
        val_acc, _ = evaluate(model, *data.split("val"))
        test_acc, _ = evaluate(model, *data.split("test"))
        return model, {"val_acc": val_acc, "test_acc": test_acc, "best_epoch": best_epoch,
                       "seconds": time.time() - t0, "path": str(path), "key": key}

    def save(value, tmp) -> None:
        torch.save({"model": value[0].state_dict(), "info": value[1]}, tmp)

    model, info = get_or_build(path, train, save, lambda p: load_teacher(p, cfg, data), "teacher checkpoint",
                               rebuild=retrain)
    if not (tdir / "info.json").is_file() or retrain:
        write_json(tdir / "info.json", info)
    return model, info


__all__ = ["get_teacher", "load_teacher", "teacher_key", "teacher_dir", "build_teacher_model", "checkpoint_teacher",
           "load_strict", "read_state_dict", "checkpoint_format"]
