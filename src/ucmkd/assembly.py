"""One place builds a run: :func:`prepare` turns a config (plus any data, teacher or student
model the user brings) into a :class:`RunContext`, validating everything before anything trains.
The models (:func:`ucmkd.models.build_model`), the pairing sampler (:func:`sampler_for`) and the
trainer (:meth:`RunContext.trainer`) of every run are built here,
teacher training and the diagnose probe included (ordinary runs of derived configs).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

from .cache import content_key, model_signature, state_digest
from .checks import check_data, check_device, check_model
from .config import SUPERVISED, OptimConfig, RunConfig, check_ranges, from_dict, to_dict
from .data import ModalityData, PairingSampler, check_compatible, load_modality
from .data.pairing import loader_options, validate_pairing
from .engine import Trainer, apply_threads, distributed, evaluate, get_teacher, seed_everything
from .engine.checkpoint import rng_state, set_rng_state
from .engine.teacher import register_teacher_training
from .errors import ConfigError
from .keys import key_config
from .methods import METHODS
from .models import Classifier, build_model
from .plugins import load_plugins


def build_student(cfg: RunConfig, data: ModalityData) -> Classifier:
    """An untrained student for modality ``data`` (``cfg.model``'s student settings)."""
    return build_model(cfg.model, "student", data.input_shape, data.kind, data.num_classes, f"student[{data.name}]")


def build_other_modality(cfg: RunConfig, data: ModalityData, feat_dim: int) -> Classifier:
    """An untrained classifier for the teacher modality ``data`` (the teacher backbone settings)
    with features of ``feat_dim`` (the student's, so a student head fits them), for methods that
    train on both modalities without a teacher (``uses_other_modality``)."""
    return build_model(cfg.model, "teacher", data.input_shape, data.kind, data.num_classes, f"other[{data.name}]",
                       feat_dim=feat_dim)


def load_pair(cfg: RunConfig) -> tuple[ModalityData, ModalityData]:
    """(student, teacher) modalities of ``cfg.data``, checked to share one label space (the
    config's ``plugins`` imported first)."""
    load_plugins(cfg.plugins, where="plugins")
    student, teacher = _load_pair(cfg)
    check_compatible(student, teacher)
    return student, teacher


def _load_pair(cfg: RunConfig) -> tuple[ModalityData, ModalityData]:
    return load_modality(cfg.data.student, cfg.data), load_modality(cfg.data.teacher, cfg.data)


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

    def trainer(self, run_dir: Optional[Path] = None, progress: bool = False, logger=None,
                config_hash: Optional[str] = None, desc: Optional[str] = None) -> Trainer:
        """The run's trainer (the one place a :class:`~ucmkd.engine.Trainer` is built);
        ``config_hash``: what a resumed ``latest.pt`` must carry (default: the run's key)."""
        c = self.cfg
        return Trainer(self.distiller, self.sampler, self.student_data, c.optim, run_dir=run_dir,
                       config_hash=self.key or "" if config_hash is None else config_hash, device=self.device,
                       progress=progress, desc=desc or f"{c.method.name} {c.data.teacher}->{c.data.student} s{c.seed}",
                       dist=self.dist, logger=logger)

    @property
    def fingerprints(self) -> dict:
        """Short hashes of the parts of the key that are not the config."""
        p = self.key_parts
        return {k: content_key(p[k]) if isinstance(p[k], dict) else p[k]
                for k in ("student_data", "teacher_data", "student_model", "teacher") if p.get(k) is not None}


def sampler_for(cfg: RunConfig, student: ModalityData, teacher_data: Optional[ModalityData], unlabelled: bool,
                require_unlabelled: bool, dp: Optional[distributed.DataParallel] = None,
                device: Optional[str] = None) -> PairingSampler:
    """The pairing sampler of a run of ``cfg`` (the one place one is built): its labelled draw,
    pools and batches follow ``cfg.pairing``, ``cfg.optim`` and ``cfg.seed`` (this rank's shards
    under ``dp``); ``teacher_data`` None for a method that draws no teacher items."""
    return PairingSampler(student, teacher_data, cfg.pairing, cfg.optim.batch_size, cfg.optim.steps_per_epoch,
                          seed=cfg.seed, unlabelled=unlabelled, require_unlabelled=require_unlabelled,
                          rank=0 if dp is None else dp.rank, world_size=1 if dp is None else dp.world_size,
                          **loader_options(cfg.data, device or cfg.device))


def teacher_run_config(cfg: RunConfig) -> RunConfig:
    """The teacher's own training as an ordinary run: plain cross-entropy (``SUPERVISED``) on the teacher
    modality with every training item labelled, the teacher's architecture, schedule
    (``cfg.teacher``) and seed; no augmentation, no logging."""
    d = to_dict(cfg)
    optim = {f.name for f in fields(OptimConfig)}
    d.update(method={"name": SUPERVISED, "params": {}}, pairing={"label_budget": None}, augment={}, logging={},
             optim={k: v for k, v in d["teacher"].items() if k in optim}, seed=cfg.teacher.seed, recipe=None)
    d["data"]["student"] = cfg.data.teacher
    for f in ("backbone", "width", "feat_dim", "backbone_args"):
        d["model"][f"student_{f}"] = d["model"][f"teacher_{f}"]
    return from_dict(RunConfig, d)


def train_teacher_run(cfg: RunConfig, data: ModalityData, run_dir: Path, config_hash: str,
                      progress: bool = False) -> tuple[Classifier, Optional[int]]:
    """Train the teacher of ``cfg`` on ``data`` (:func:`teacher_run_config`) in this process,
    resumable in ``run_dir`` (whose checkpoint must carry ``config_hash``): (model at its best
    validation epoch, that epoch). :func:`ucmkd.engine.get_teacher` calls it and caches the result."""
    ctx = prepare(teacher_run_config(cfg), student=data, single_process=True)
    trainer = ctx.trainer(run_dir, progress=progress, config_hash=config_hash, desc=f"teacher {data.name}")
    fit = trainer.fit()
    trainer.restore_best()
    ctx.model.name = f"teacher[{data.name}]"
    return ctx.model, fit.best_epoch


register_teacher_training(train_teacher_run)     # the engine's teacher cache trains through the one assembly


def prepare(cfg: RunConfig, student: Optional[ModalityData] = None, teacher_data: Optional[ModalityData] = None,
            teacher: Optional[Classifier] = None, teacher_info: Optional[dict] = None,
            student_model: Optional[Classifier] = None, progress: bool = False,
            train_teacher: bool = True, single_process: bool = False) -> RunContext:
    """Build and check one run: method and params, data (loaded from ``cfg.data`` unless given),
    teacher (trained or loaded from the cache unless given; ``train_teacher=False`` builds an
    untrained one, to check a grid before anything trains; with ``cfg.teacher.checkpoint`` the
    file's teacher, as is, in both cases; a ``teacher`` given wins), student model, distiller, pairing
    sampler and the run's content key. Every mistake found here raises a ConfigError or
    DataError naming the field, dataset or model at fault.

    Under torchrun the process joins its data-parallel group first
    (:func:`ucmkd.engine.distributed.init_from_env`); rank 0 loads the data and trains the
    teacher (building their caches) before the other ranks load them. ``single_process``: a run
    of this process alone, even under torchrun (a teacher that rank 0 trains for the others)."""
    check_ranges(cfg)                  # a config built in Python never went through from_dict
    load_plugins(cfg.plugins, where="plugins")    # a config built in Python: its plugins not imported yet
    method_cls = METHODS.get(cfg.method.name)
    params = method_cls.parse_params(cfg.method.params)
    check_device(cfg.device)
    apply_threads(cfg.threads)
    if cfg.logging.tensorboard:
        from .engine.tb_logger import require_tensorboard

        require_tensorboard()          # before any teacher trains
    dp = None if single_process else distributed.init_from_env(cfg.device)
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
        sampler = sampler_for(cfg, student, teacher_data if method_cls.draws_teacher_modality() else None,
                              distiller.uses_unlabelled, distiller.requires_unlabelled, dp, device)
        return distiller, sampler

    def student_model_for_run():
        seed_everything(cfg.seed)
        return student_model if student_model is not None else build_student(cfg, student)

    if teacher is None and method_cls.uses_teacher and cfg.teacher.checkpoint is not None:
        from .engine.teacher import checkpoint_teacher

        # a teacher trained elsewhere: loaded as is (nothing to train, no untrained stand-in)
        teacher, teacher_info = (_get_teacher(cfg, teacher_data, progress, dp) if train_teacher
                                 else (checkpoint_teacher(cfg, teacher_data), None))
    trains_teacher = False
    if teacher is None and method_cls.uses_teacher and cfg.teacher.checkpoint is None:
        from .engine.teacher import build_teacher_model

        teacher = build_teacher_model(cfg, teacher_data)     # untrained: the run is assembled around it
        trains_teacher = train_teacher
    model = student_model_for_run()
    distiller, sampler = assemble(teacher, model)
    if trains_teacher:
        # the whole run was checked with the untrained teacher (a mistake in the params or the
        # pairing must not wait for a teacher to train); the trained weights now take its place,
        # and the random state is as the assembly left it (training may draw from it)
        state = rng_state()
        trained, teacher_info = _get_teacher(cfg, teacher_data, progress, dp)
        teacher.load_state_dict(trained.state_dict())
        set_rng_state(state)
    if teacher is not None and teacher_info is None and train_teacher:
        teacher.eval()
        teacher_info = {"val_acc": evaluate(teacher, *teacher_data.split("val"))[0],
                        "test_acc": evaluate(teacher, *teacher_data.split("test"))[0]}
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
