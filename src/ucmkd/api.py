"""The Python API: one call per job. The CLI (:mod:`ucmkd.cli`) is a thin layer over it.

>>> from ucmkd import RunConfig, run
>>> cfg = RunConfig()                      # digits: image teacher -> signal student, ``ce``
>>> result = run(cfg, run_dir="runs/demo")  # doctest: +SKIP

One place builds a run: :func:`prepare` turns a config (plus any data, teacher or student model
the user brings) into a :class:`RunContext`, validating everything before anything trains;
:func:`run` (and the grid behind ``ucmkd run``/``ucmkd bench``) train from it.

Launched by ``torchrun`` (``torchrun --nproc_per_node=N -m ucmkd train ...``, or a script of
yours calling :func:`run`), every process joins the data-parallel job (docs/scaling.md):
``optim.batch_size`` is the global batch, rank 0 builds the caches (data, teacher) while the
others wait, and only rank 0 writes the run directory.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .cache import clean_tmp, content_key, model_signature, read_json, signature_diff, state_digest, write_json
from .config import DataConfig, RunConfig, check_ranges, config_hash, save_config, to_dict
from .data import ModalityData, PairingSampler, check_compatible, load_modality
from .data.base import dataset_reads, family
from .data.pairing import loader_options, validate_pairing
from .data.standardize import NORMALISATION_FILE, normalisation_entry
from .engine import Trainer, apply_threads, distributed, evaluate, get_teacher, seed_everything
from .errors import ConfigError, DataError
from .methods import METHODS
from .models import Classifier, build_classifier
from .plugins import load_plugins, user_code
from .provenance import versions

RUN_KEY_FILE = "key.json"
#: RunConfig fields that never change a result, left out of every key (``plugins``: where code
#: comes from; the code of theirs a run uses enters as ``user_code``, :func:`key_config`)
UNKEYED = ("device", "threads", "logging", "plugins")
#: fields added after runs were published, left out of keys while at these defaults (which
#: reproduce the earlier behaviour), so the keys of earlier runs stay valid
LATER_DEFAULTS = {("pairing", "unlabelled_ratio"): 1.0, ("data", "options"): {}, ("augment",): {"labelled": "none", "policy": None},
                  # auto is items on data without groups; on data with groups it changed the
                  # splits, which reach the keys through the data's content fingerprint
                  ("data", "val_by"): "auto", ("teacher", "checkpoint"): None}


def build_student(cfg: RunConfig, data: ModalityData) -> Classifier:
    m = cfg.model
    return build_classifier(data.input_shape, data.kind, data.num_classes, m.student_backbone,
                            m.student_width, m.student_feat_dim, name=f"student[{data.name}]",
                            backbone_args=m.student_backbone_args)


def build_other_modality(cfg: RunConfig, data: ModalityData, feat_dim: int) -> Classifier:
    """An untrained classifier for the teacher modality ``data`` (the teacher backbone settings)
    with features of ``feat_dim`` (the student's, so a student head fits them), for methods that
    train on both modalities without a teacher (``uses_other_modality``)."""
    m = cfg.model
    return build_classifier(data.input_shape, data.kind, data.num_classes, m.teacher_backbone,
                            m.teacher_width, feat_dim, name=f"other[{data.name}]",
                            backbone_args=m.teacher_backbone_args)


def load_pair(cfg: RunConfig) -> tuple[ModalityData, ModalityData]:
    """(student, teacher) modalities of ``cfg.data``, checked to share one label space (the
    config's ``plugins`` imported first)."""
    load_plugins(cfg.plugins, where="plugins")
    student, teacher = _load_pair(cfg)
    check_compatible(student, teacher)
    return student, teacher


def _load_pair(cfg: RunConfig) -> tuple[ModalityData, ModalityData]:
    return load_modality(cfg.data.student, cfg.data), load_modality(cfg.data.teacher, cfg.data)


def file_digests(cfg: RunConfig) -> dict:
    """The files ``cfg`` names whose content is part of its runs' keys, as {dotted field: sha256
    of the file's bytes}: ``teacher.checkpoint``. A missing file is a DataError naming the field."""
    from .cache import file_sha256

    ck = cfg.teacher.checkpoint
    return {} if ck is None else {"teacher.checkpoint": file_sha256(ck, "teacher.checkpoint")}


def key_config(cfg: RunConfig) -> dict:
    """The config as run keys see it: without the device, the thread count and the fields that
    change only how inputs are read (``DataConfig.IO_FIELDS``: storage, workers; what they read
    enters keys through the data's content fingerprint), and the sections that only a dataset's
    fingerprint carries (``DataConfig.FINGERPRINT_FIELDS``: the folder datasets' options). With
    ``teacher.checkpoint`` the teacher section is that file's content hash alone
    (``{"checkpoint": {"sha256": ...}}``: where the file lies and the unused training schedule do
    not matter). ``user_code``: the content hashes of the code outside ucmkd it names (plugins'
    methods, backbones, ...: :func:`ucmkd.plugins.user_code`), absent when it uses ucmkd's alone
    (so its key is unchanged)."""
    d = to_dict(cfg)
    files = file_digests(cfg)
    if "teacher.checkpoint" in files:
        d["teacher"] = {"checkpoint": {"sha256": files["teacher.checkpoint"]}}
    for k in UNKEYED:
        d.pop(k, None)
    for k in DataConfig.IO_FIELDS + DataConfig.FINGERPRINT_FIELDS:
        d["data"].pop(k, None)
    _unkey_data(d["data"], cfg.data)
    for path, default in LATER_DEFAULTS.items():
        node = d
        for part in path[:-1]:
            node = node[part]
        if node.get(path[-1]) == default:
            node.pop(path[-1])
    code = user_code(d)
    if code:
        d["user_code"] = code
    return d


def _unkey_data(d: dict, data: DataConfig) -> None:
    """Set to their defaults, in the key dict ``d`` of ``data``: the paths (``PATH_FIELDS``: the
    content fingerprints identify the data wherever it lies) and the sections and
    ``data.options`` entries of datasets the run does not use (``register_dataset(reads=...)``),
    so that neither re-keys a run. Defaults, not removal: the keys of runs made before stay."""
    default = to_dict(DataConfig())
    for k in DataConfig.PATH_FIELDS:
        d[k] = default[k]
    reads = [dataset_reads(data.teacher), dataset_reads(data.student)]
    if any(r is None for r in reads):          # an undeclared dataset: everything may matter
        return
    used = set(reads[0]) | set(reads[1])
    for k in DataConfig.SECTIONS:
        if k not in used:
            d[k] = default[k]
    d["options"] = {f: v for f, v in d["options"].items() if f in {family(data.teacher), family(data.student)}}


def run_key(cfg: RunConfig) -> str:
    """Hash of the config fields that make runs differ (:func:`key_config`).
    The grid's results store keys cells by it; a run directory is keyed by the content key of
    :func:`prepare` (which adds the data, the student architecture and the teacher weights)."""
    return config_hash(key_config(cfg))


# --------------------------------------------------------------------------- validation
def check_data(data: Any, role: str) -> None:
    """``data`` is a :class:`ModalityData` with non-empty train/val/test splits."""
    if not isinstance(data, ModalityData):
        raise ConfigError(f"{role}: expected a ucmkd.data.ModalityData (from ucmkd.load_modality or "
                          f"ucmkd.load_pair), got {type(data).__name__}")
    if data.x.shape[0] != data.y.shape[0]:
        raise DataError(f"{role} {data.name!r}: x has {data.x.shape[0]} items but y has {data.y.shape[0]}")
    for split in ("train", "val", "test"):
        if split not in data.splits or len(data.splits[split]) == 0:
            raise DataError(f"{role} {data.name!r}: the {split!r} split is missing or empty")


def check_model(model: Any, data: ModalityData, role: str) -> None:
    """``model`` fits ``data``: a :class:`Classifier` with ``data``'s input shape and classes,
    whose encoder maps a batch to ``[B, feat_dim]`` (checked on two training items, in eval
    mode, without gradient). Errors name the mismatch."""
    if not isinstance(model, Classifier):
        raise ConfigError(f"{role}_model: expected a ucmkd.models.Classifier (encoder + linear head), got "
                          f"{type(model).__name__}; wrap the encoder: Classifier(encoder, feat_dim=D, "
                          f"num_classes={data.num_classes}, input_shape={tuple(data.input_shape)})")
    if tuple(model.input_shape) != tuple(data.input_shape):
        raise DataError(f"{role}_model {model.name!r}: input_shape {list(model.input_shape)}, but {data.name!r} "
                        f"items are {list(data.input_shape)}")
    if model.num_classes != data.num_classes:
        raise DataError(f"{role}_model {model.name!r}: {model.num_classes} classes, but {data.name!r} has "
                        f"{data.num_classes} ({', '.join(map(str, data.classes))})")
    x = data.x[data.splits["train"][:2]]
    param = next(iter(model.parameters()), None)
    if param is not None:
        x = x.to(param.device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            z = model.encoder(x)
    except Exception as e:  # noqa: BLE001 - any failure of the user's encoder is reported the same way
        raise DataError(f"{role}_model {model.name!r}: its encoder fails on a batch {list(x.shape)} of "
                        f"{data.name!r}: {type(e).__name__}: {e}") from None
    finally:
        model.train(was)
    if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != model.feat_dim:
        got = list(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise DataError(f"{role}_model {model.name!r}: its encoder maps {list(x.shape)} to {got}, but "
                        f"feat_dim={model.feat_dim} (the head takes [B, {model.feat_dim}])")


def check_device(device: str) -> None:
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r}, but no CUDA device is available here (use device=cpu)")


# --------------------------------------------------------------------------- one place builds a run
@dataclass
class RunContext:
    """Everything one run is built from, checked (:func:`prepare`).

    teacher: the frozen teacher (None for a teacher-free method without one given); it also
    measures teacher-free methods (alignment diagnostics). key: the content key of the run, a
    hash of ``key_parts``: the config (device and threads excluded), the fingerprints of both
    modalities, the student architecture (:func:`ucmkd.cache.model_signature`) and the
    teacher's weights. The initial weights of a student model you pass in are not part of it.
    dist: this process's data-parallel group (None: one process); ``device`` is this rank's.
    """

    cfg: RunConfig
    method: type
    params: Any
    student_data: ModalityData
    teacher_data: Optional[ModalityData]
    teacher: Optional[Classifier]
    teacher_info: dict
    model: Classifier
    distiller: Any
    sampler: PairingSampler
    device: str
    key: Optional[str]
    key_parts: dict
    dist: Optional[distributed.DataParallel] = None

    @property
    def world_size(self) -> int:
        return 1 if self.dist is None else self.dist.world_size

    def trainer(self, run_dir: Optional[Path] = None, progress: bool = False, logger=None) -> Trainer:
        c = self.cfg
        return Trainer(self.distiller, self.sampler, self.student_data, c.optim, run_dir=run_dir,
                       config_hash=self.key or "", device=self.device, progress=progress,
                       desc=f"{c.method.name} {c.data.teacher}->{c.data.student} s{c.seed}", dist=self.dist,
                       logger=logger)

    @property
    def fingerprints(self) -> dict:
        """Short hashes of the parts of the key that are not the config."""
        p = self.key_parts
        return {k: content_key(p[k]) if isinstance(p[k], dict) else p[k]
                for k in ("student_data", "teacher_data", "student_model", "teacher") if p.get(k) is not None}


def prepare(cfg: RunConfig, student: Optional[ModalityData] = None, teacher_data: Optional[ModalityData] = None,
            teacher: Optional[Classifier] = None, teacher_info: Optional[dict] = None,
            student_model: Optional[Classifier] = None, progress: bool = False,
            train_teacher: bool = True) -> RunContext:
    """Build and check one run: method and params, data (loaded from ``cfg.data`` unless given),
    teacher (trained or loaded from the cache unless given; ``train_teacher=False`` builds an
    untrained one, to check a grid before anything trains; with ``cfg.teacher.checkpoint`` the
    file's teacher, as is, in both cases; a ``teacher`` given wins), student model, distiller, pairing
    sampler and the run's content key. Every mistake found here raises a ConfigError or
    DataError naming the field, dataset or model at fault.

    Under torchrun the process joins its data-parallel group first
    (:func:`ucmkd.engine.distributed.init_from_env`); rank 0 loads the data and trains the
    teacher (building their caches) before the other ranks load them."""
    check_ranges(cfg)                  # a config built in Python never went through from_dict
    load_plugins(cfg.plugins, where="plugins")    # a config built in Python: its plugins not imported yet
    method_cls = METHODS.get(cfg.method.name)
    params = method_cls.parse_params(cfg.method.params)
    check_device(cfg.device)
    apply_threads(cfg.threads)
    if cfg.logging.tensorboard:
        from .engine.tb_logger import require_tensorboard

        require_tensorboard()          # before any teacher trains
    dp = distributed.init_from_env(cfg.device)
    device = distributed.device_for(dp, cfg.device)
    validate_pairing(cfg.pairing)      # before any data is loaded or teacher trained
    if method_cls.needs_pairs and cfg.pairing.mode != "paired":
        raise ConfigError(f"method {cfg.method.name!r} needs pairing.mode: paired, got {cfg.pairing.mode!r}")
    with distributed.rank_zero_first(dp):           # rank 0 builds any data cache first
        if student is None or (teacher_data is None and method_cls.draws_teacher_modality()):
            s, t = _load_pair(cfg)
            student = student if student is not None else s
            teacher_data = teacher_data if teacher_data is not None else t
    distributed.check_same_on_ranks(dp, [student.fingerprint, None if teacher_data is None else teacher_data.fingerprint],
                                    "the data (content fingerprints of the student and teacher modalities)")
    check_data(student, "student")
    if teacher_data is not None:
        check_data(teacher_data, "teacher_data")
        check_compatible(student, teacher_data)
    if teacher is not None:
        if teacher_data is None:
            raise ConfigError("teacher given without its teacher_data")
        check_model(teacher, teacher_data, "teacher")

    def assemble(teacher, model):
        """Student model (checked), distiller and pairing sampler (this rank's shards) around ``teacher``."""
        check_model(model, student, "student")
        distiller = method_cls(model, teacher if method_cls.uses_teacher else None, params)
        if method_cls.uses_other_modality:
            distiller.attach_other_modality(build_other_modality(cfg, teacher_data, model.feat_dim))
        distiller.set_augmentation(student.augment_kind, cfg.augment.labelled, cfg.augment.policy)
        sampler = PairingSampler(student, teacher_data if method_cls.draws_teacher_modality() else None, cfg.pairing,
                                 cfg.optim.batch_size, cfg.optim.steps_per_epoch, seed=cfg.seed,
                                 unlabelled=distiller.uses_unlabelled,
                                 require_unlabelled=distiller.requires_unlabelled,
                                 rank=0 if dp is None else dp.rank, world_size=1 if dp is None else dp.world_size,
                                 **loader_options(cfg.data, device))
        return distiller, sampler

    def student_model_for_run():
        seed_everything(cfg.seed)
        return student_model if student_model is not None else build_student(cfg, student)

    if teacher is None and method_cls.uses_teacher and cfg.teacher.checkpoint is not None:
        from .engine.teacher import checkpoint_teacher

        # a teacher trained elsewhere: loaded as is (nothing to train, no untrained stand-in)
        teacher, teacher_info = (_get_teacher(cfg, teacher_data, progress, dp) if train_teacher
                                 else (checkpoint_teacher(cfg, teacher_data), None))
    elif teacher is None and method_cls.uses_teacher:
        from .engine.teacher import build_teacher_model

        teacher = build_teacher_model(cfg, teacher_data)     # untrained
        if train_teacher:
            # the whole run checked with the untrained teacher first (on a copy of a model you
            # bring): a mistake in the params or the pairing must not wait for a teacher to train
            dry = student_model_for_run()
            assemble(teacher, copy.deepcopy(dry) if student_model is not None else dry)
            teacher, teacher_info = _get_teacher(cfg, teacher_data, progress, dp)
    if teacher is not None and teacher_info is None and train_teacher:
        teacher.eval()
        teacher_info = {"val_acc": evaluate(teacher, *teacher_data.split("val"))[0],
                        "test_acc": evaluate(teacher, *teacher_data.split("test"))[0]}
    model = student_model_for_run()
    distiller, sampler = assemble(teacher, model)
    if method_cls.uses_teacher:
        from .engine.teacher_outputs import TeacherOutputs

        distiller.use_teacher_outputs(TeacherOutputs(teacher, teacher_data, device))
    config = key_config(cfg)
    config["method"]["params"] = asdict(params)       # defaults spelled out: {} == {w: default}
    parts = {"config": config, "student_data": student.fingerprint,
             "teacher_data": teacher_data.fingerprint if teacher_data is not None else None,
             "student_model": model_signature(model),
             "teacher": state_digest(teacher.state_dict()) if teacher is not None and train_teacher else None}
    if distiller.augments:     # the policy it augments with (absent from runs without augmentation)
        parts["augment"] = {"policy": distiller.augment_policy.name, "labelled": distiller.labelled_level}
    parts = json.loads(json.dumps(parts, default=str))   # as key.json stores it (tuples -> lists)
    return RunContext(cfg=cfg, method=method_cls, params=params, student_data=student, teacher_data=teacher_data,
                      teacher=teacher, teacher_info=teacher_info or {}, model=model, distiller=distiller,
                      sampler=sampler, device=device, key=content_key(parts) if train_teacher else None,
                      key_parts=parts, dist=dp)


def _get_teacher(cfg: RunConfig, teacher_data: ModalityData, progress: bool,
                 dp: Optional[distributed.DataParallel]) -> tuple[Classifier, dict]:
    """:func:`ucmkd.engine.get_teacher`; under data parallelism rank 0 alone trains (or loads)
    and caches it, and every other rank receives its weights (the same teacher everywhere,
    whatever the other nodes' caches hold)."""
    if dp is None:
        return get_teacher(cfg, teacher_data, progress=progress)
    if cfg.teacher.checkpoint is not None:      # every rank reads the file: the same bytes everywhere
        from .cache import file_sha256
        from .engine.teacher import checkpoint_teacher

        info = distributed.on_rank_zero(dp, lambda: get_teacher(cfg, teacher_data, progress=progress)[1])
        distributed.check_same_on_ranks(dp, file_sha256(cfg.teacher.checkpoint, "teacher.checkpoint"),
                                        "the teacher checkpoint (sha256 of teacher.checkpoint)")
        return checkpoint_teacher(cfg, teacher_data), info

    def on_rank_zero():
        model, info = get_teacher(cfg, teacher_data, progress=progress)
        return model.state_dict(), info

    state, info = distributed.on_rank_zero(dp, on_rank_zero)
    from .engine.teacher import build_teacher_model

    teacher = build_teacher_model(cfg, teacher_data)
    teacher.load_state_dict(state)
    return teacher.eval().requires_grad_(False), info


# --------------------------------------------------------------------------- running
def run(cfg: RunConfig, run_dir: Optional[str | Path] = None, student: Optional[ModalityData] = None,
        teacher_data: Optional[ModalityData] = None, teacher: Optional[Classifier] = None,
        teacher_info: Optional[dict] = None, progress: bool = False, student_model: Optional[Classifier] = None,
        resume: bool = True) -> dict:
    """Train one student with ``cfg.method`` and return its result dict.

    Data, teacher and student model may be passed in (bring your own); otherwise they are
    built from ``cfg`` (:func:`prepare`). With ``run_dir`` the run is checkpointed there, its
    resolved config saved as ``config.yaml``, its key as ``key.json`` and the standardisation
    of both modalities as ``normalisation.json`` (:meth:`ucmkd.data.Standardizer.load` reads it
    back, to prepare new inputs for the trained student); an interrupted run
    resumes, a finished one is loaded back (the same keys as a fresh run, ``distiller``
    included). A ``run_dir`` written by another run (another config, data, student
    architecture or teacher) raises a DataError naming the directory and what differs.
    ``resume=False`` starts over: what the directory holds is moved aside
    (``<run_dir>.stale-<key>``), never deleted.

    Result keys: method, seed, teacher/student names, test_acc (at best val epoch), val_acc,
    best_epoch, last_test_acc, epochs, teacher_test_acc, seconds, sampler, diag_* (alignment
    diagnostics), params, run_dir, key, fingerprints, versions, user_code (the content hashes of
    the plugin code the run used, :func:`ucmkd.plugins.user_code`; ``{}`` for none); ``selected`` (the candidate returned:
    "student", or e.g. "fallback" when ucmkd's CE shadow validated better) and ``candidates``
    (each candidate's best-validation epoch, val and test accuracy); ``distiller`` (holding the
    returned student; not in result.json).
    """
    ctx = prepare(cfg, student, teacher_data, teacher, teacher_info, student_model, progress=progress)
    return run_context(ctx, run_dir, progress=progress, resume=resume)


def run_context(ctx: RunContext, run_dir: Optional[str | Path] = None, progress: bool = False,
                resume: bool = True, stale: str = "error") -> dict:
    """Train (or resume, or load back) the run ``ctx`` in ``run_dir`` (see :func:`run`).
    ``stale="set_aside"`` moves a directory written by another run aside instead of raising
    (the grid's choice: an edited suite). Under data parallelism rank 0 alone claims and writes
    the directory, computes the diagnostics and writes ``result.json``; every rank returns the
    same result (rank 0's)."""
    cfg, distiller, dp = ctx.cfg, ctx.distiller, ctx.dist
    writer = dp is None or dp.is_main
    run_dir = Path(run_dir) if run_dir is not None else None
    if run_dir is not None:
        def claim() -> Optional[dict]:
            _claim(run_dir, ctx, stale="set_aside" if not resume else stale, fresh=not resume)
            return read_json(run_dir / "result.json", "run result")

        done = distributed.on_rank_zero(dp, claim)
        if done is not None and done.get("key") == ctx.key:
            ctx.trainer(run_dir).restore_best()
            return {**done, "distiller": distiller}
        if writer:
            run_dir.mkdir(parents=True, exist_ok=True)
            clean_tmp(run_dir)            # what a killed process left behind
            if not (run_dir / RUN_KEY_FILE).is_file():
                write_json(run_dir / RUN_KEY_FILE, {"key": ctx.key, "parts": ctx.key_parts})
            save_config(cfg, run_dir / "config.yaml")
            write_json(run_dir / NORMALISATION_FILE, {"student": normalisation_entry(ctx.student_data),
                                                      "teacher": normalisation_entry(ctx.teacher_data)})
    logger = None
    if cfg.logging.tensorboard and writer:
        from .engine.tb_logger import TensorBoardLogger

        logger = TensorBoardLogger.for_run(cfg.logging, run_dir)
    result = None
    try:
        trainer = ctx.trainer(run_dir, progress, logger=logger)
        t0 = time.time()
        fit = trainer.fit()
        trainer.restore_best()
        if writer:
            result = _result(ctx, fit, run_dir, t0)
            if logger is not None:
                diag = {k[len("diag_"):]: v for k, v in result.items() if k.startswith("diag_")}
                logger.final(trainer.step_count, diag, fit.selected)
            if run_dir is not None:
                write_json(run_dir / "result.json", result)
    finally:
        if logger is not None:
            logger.close()
    result = distributed.broadcast_object(dp, result)
    result["distiller"] = distiller   # holds the returned (best-validation) student; not in result.json
    return result


def _result(ctx: RunContext, fit, run_dir: Optional[Path], t0: float) -> dict:
    """The run's result dict (result.json): the fit, the alignment diagnostics, the keys;
    ``seconds`` since ``t0`` (training and diagnostics)."""
    cfg, distiller = ctx.cfg, ctx.distiller
    diag = {}
    if ctx.teacher is not None and ctx.teacher_data is not None:
        from .diagnostics import alignment_diagnostics

        diag = alignment_diagnostics(ctx.model, ctx.teacher, ctx.student_data, ctx.teacher_data,
                                     projector=distiller.feature_map(),
                                     seed=cfg.seed, device=ctx.device)
    return {
        "method": cfg.method.name, "seed": cfg.seed, "teacher": cfg.data.teacher, "student": cfg.data.student,
        "test_acc": fit.test_acc, "val_acc": fit.val_acc, "best_epoch": fit.best_epoch,
        "last_test_acc": fit.last_test_acc, "epochs": fit.epochs,
        "selected": fit.selected, "candidates": fit.candidates,
        "teacher_test_acc": ctx.teacher_info.get("test_acc", float("nan")),
        "seconds": time.time() - t0, "world_size": ctx.world_size, "sampler": ctx.sampler.summary(),
        **{f"diag_{k}": v for k, v in diag.items()},
        "params": asdict(ctx.params), "run_dir": str(run_dir) if run_dir else None, "key": ctx.key,
        "fingerprints": ctx.fingerprints, "versions": versions(),
        "user_code": ctx.key_parts["config"].get("user_code", {}), "runtime": fit.runtime,
    }


# --------------------------------------------------------------------------- run directories
def run_key_parts(run_dir: str | Path) -> dict:
    """The ``parts`` of a run directory's key (config, data fingerprints, student architecture,
    teacher digest) from its ``key.json``; ``{}`` when it has none."""
    return (read_json(Path(run_dir) / RUN_KEY_FILE, "run key") or {}).get("parts") or {}


def stored_key(run_dir: Path) -> Optional[str]:
    """The key of the run ``run_dir`` holds (key.json, else result.json, else latest.pt), or None."""
    ident = read_json(run_dir / RUN_KEY_FILE, "run key")
    if ident is not None:
        return ident.get("key")
    done = read_json(run_dir / "result.json", "run result")
    if done is not None:
        return done.get("key")
    if (run_dir / "latest.pt").is_file():
        from .engine.checkpoint import load_checkpoint

        return load_checkpoint(run_dir / "latest.pt").get("config_hash")
    return None


def _claim(run_dir: Path, ctx: RunContext, stale: str, fresh: bool) -> None:
    """Make ``run_dir`` this run's: keep it if it holds this run (unless ``fresh``); else raise a
    DataError saying what differs, or (``stale="set_aside"``) rename it ``<dir>.stale-<key>``."""
    old = stored_key(run_dir) if run_dir.is_dir() else None
    if old is None or (old == ctx.key and not fresh):
        return
    if old != ctx.key and stale != "set_aside":
        ident = read_json(run_dir / RUN_KEY_FILE, "run key")
        what = (what_differs(ident.get("parts", {}), ctx.key_parts) if ident is not None
                else "its files carry another key (another config, or written by an older ucmkd)")
        raise DataError(f"run_dir {run_dir} holds another run (key {old}; this run's key is {ctx.key}): "
                        f"{what}. Give another run_dir, or move this one away to start over")
    target, i = run_dir.with_name(f"{run_dir.name}.stale-{old}"), 1
    while target.exists():
        i += 1
        target = run_dir.with_name(f"{run_dir.name}.stale-{old}-{i}")
    run_dir.rename(target)


def _flatten(d: Any, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def what_differs(old: dict, new: dict, limit: int = 4) -> str:
    """Two runs' key parts (:attr:`RunContext.key_parts`) compared, in words."""
    out = []
    a, b = _flatten(old.get("config", {})), _flatten(new.get("config", {}))
    diff = [f"{k}: {a.get(k, 'absent')!r} -> {b.get(k, 'absent')!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]
    if diff:
        out.append("config " + "; ".join(diff[:limit]) + (f" (and {len(diff) - limit} more)" if len(diff) > limit else ""))
    for k, what in (("student_data", "student data"), ("teacher_data", "teacher data")):
        fa, fb = old.get(k) or {}, new.get(k) or {}
        if fa != fb:
            fields = [f for f in sorted(set(fa) | set(fb)) if fa.get(f) != fb.get(f)]
            out.append(f"{what} {fb.get('name', fa.get('name'))!r}: " + "; ".join(
                f"{f} {fa.get(f, 'absent')} -> {fb.get(f, 'absent')}" for f in fields))
    sig = signature_diff(old.get("student_model") or {}, new.get("student_model") or {})
    if sig:
        out.append(f"student model: {sig}")
    if old.get("teacher") != new.get("teacher"):
        out.append(f"teacher weights: digest {old.get('teacher')} -> {new.get('teacher')}")
    return ", ".join(out) or "the key's format (written by another ucmkd version)"


__all__ = ["RunContext", "prepare", "run", "run_context", "build_student", "load_pair", "run_key", "file_digests",
           "check_model", "check_data", "what_differs", "stored_key"]
