"""The distiller interface: one small class per method.

A distiller receives a student batch and a teacher-modality batch (:class:`~ucmkd.data.Batch`,
two modalities, not one paired batch) and returns the student logits and a dict of named,
already-weighted losses; the trained objective is their sum. How to step (plain or bilevel)
is the trainer's business (:mod:`ucmkd.engine.strategies`), chosen by ``strategy``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..config import check_ranges, from_dict
from ..data.pairing import Batch
from ..errors import ConfigError, DataError
from ..models import Classifier, make_projector
from ..registry import Registry

METHODS: Registry[type] = Registry("method")


def register_method(name: str):
    """Class decorator: register a :class:`Distiller` subclass under ``name``."""

    def deco(cls):
        cls.name = name
        return METHODS.register(name)(cls)

    return deco


@dataclass
class NoParams:
    pass


@dataclass
class DistillOutput:
    """logits: student logits on ``batch.xs`` [B, K]; losses: name -> weighted scalar (summed
    into the objective); metrics: name -> float logged alongside (not optimised). A metric
    whose name has a ``/`` (e.g. ``ot/fa/iterations``) is a per-step diagnostic
    (:func:`ucmkd.engine.strategies.is_diagnostic`): logged to TensorBoard under that tag, not
    averaged into the epoch's metrics rows; a method returns them only with
    :attr:`Distiller.step_diagnostics`."""

    logits: torch.Tensor
    losses: dict
    metrics: dict = dataclasses.field(default_factory=dict)

    @property
    def total(self) -> torch.Tensor:
        return sum(self.losses.values())


class Distiller(nn.Module):
    """Owns the student (trainable), the frozen teacher (always in eval mode) and any extra
    trainable modules (``self.extra``, e.g. a projector).

    Class attributes a method sets:
        Params: dataclass of its hyperparameters (validated from ``method.params``).
        uses_teacher: needs a teacher batch and a trained teacher.
        uses_other_modality: needs the labelled teacher-modality batch (``batch.xt``, ``batch.yt``)
            but no teacher model; :func:`~ucmkd.api.prepare` then hands it an untrained model
            of that modality (:meth:`attach_other_modality`). Implied by ``uses_teacher``.
        uses_unlabelled: consumes ``batch.xu`` (unlabelled student items).
        requires_unlabelled: with ``uses_unlabelled``, an empty unlabelled pool is an error
            (False: the method then trains without ``xu``).
        needs_pairs: only meaningful with ``pairing.mode: paired``.
        projects_features: compares student features with teacher features, so a learned
            projector ``extra["projector"]`` (d_s -> d_t) is added when the dims differ.
        strategy: ``"standard"`` or ``"bilevel"`` (:data:`ucmkd.engine.strategies.STRATEGIES`).
        labelled_augment: ``"none"``, ``"weak"`` or ``"strong"``: the augmentation of the labelled
            items the method asks for (``ce-aug``, ``fixmatch``: weak); the trainer applies the
            stronger of it and ``augment.labelled`` (:meth:`augment_labelled`).
        uses_augmentation: the method augments items itself (:meth:`augment`), so its runs need
            an augmentation policy.

    Set where the run is assembled (:meth:`set_augmentation`): ``input_kind``, the student
    modality's augmentation kind (image, signal, spectrogram, vector, or a plugin's), and
    ``augment_policy`` (:class:`ucmkd.augment.Policy`).

    Set by a per-step logger (TensorBoard): ``step_diagnostics``, whether the method also returns
    its per-step diagnostics (e.g. its OT solve's iterations and plan entropy) in
    :attr:`DistillOutput.metrics` (off by default: some cost a pass over a [B, M] plan).
    """

    name = "base"
    Params: type = NoParams
    uses_teacher = True
    uses_other_modality = False
    uses_unlabelled = False
    requires_unlabelled = True
    needs_pairs = False
    projects_features = False
    strategy = "standard"
    labelled_augment = "none"
    uses_augmentation = False
    step_diagnostics = False

    def __init__(self, student: Classifier, teacher: Optional[Classifier] = None, params=None):
        super().__init__()
        if self.uses_teacher and teacher is None:
            raise ConfigError(f"method {self.name!r} needs a teacher")
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self.params = params if params is not None else self.Params()
        check_ranges(self.params, "method.params")    # Params built in Python skip from_dict's checks
        self.progress = 0.0   # fraction of training done, in [0, 1); set by the trainer each epoch
        self.extra = nn.ModuleDict()
        self.teacher_outputs = None   # see use_teacher_outputs
        self.input_kind: Optional[str] = None       # see set_augmentation
        self.augment_policy = None
        self.labelled_level = self.labelled_augment
        if getattr(student, "input_kind", None) is not None:   # built by build_classifier: its kind
            self.set_augmentation(student.input_kind)           # (prepare sets the data's declared one)
        if self.projects_features and teacher is not None and student.feat_dim != teacher.feat_dim:
            self.extra["projector"] = make_projector(student.feat_dim, teacher.feat_dim)

    @classmethod
    def parse_params(cls, params: dict):
        return from_dict(cls.Params, params or {}, "method.params")

    @classmethod
    def draws_teacher_modality(cls) -> bool:
        """Whether the sampler must draw teacher-modality batches (``xt``, ``yt``) for it."""
        return bool(cls.uses_teacher or cls.uses_other_modality)

    @classmethod
    def teacher_free(cls, params) -> bool:
        """Whether a run with ``params`` (a parsed :attr:`Params`) learns nothing from a teacher
        model: ``not uses_teacher``; a method whose teacher terms can all be switched off says
        so for those params (reports use it to name the teacher-free field)."""
        return not cls.uses_teacher

    def attach_other_modality(self, model: Classifier) -> None:
        """Called by :func:`~ucmkd.api.prepare` (before the optimiser is built) when
        ``uses_other_modality``: an untrained classifier for the teacher modality (the library's
        builder, the teacher backbone settings, the student's feature dim). Default: unused."""

    # -- augmentation -------------------------------------------------------------------
    def set_augmentation(self, input_kind: str, labelled: str = "none", policy=None) -> None:
        """The student's augmentation kind ``input_kind``, the run's labelled-item level ``labelled``
        (``augment.labelled``; the method's own ``labelled_augment`` wins when stronger) and the
        policy: a :class:`ucmkd.augment.Policy`, a registered name (``augment.policy``) or None
        (the one registered under ``input_kind``). A run that augments nothing needs no policy."""
        from ..augment import LEVELS, Policy, resolve_policy

        if labelled not in LEVELS:
            raise ConfigError(f"augment.labelled: unknown value {labelled!r}; choose one of {', '.join(LEVELS)}")
        self.input_kind = input_kind
        self.labelled_level = max(labelled, self.labelled_augment, key=LEVELS.index)
        if isinstance(policy, Policy):
            self.augment_policy = policy
        elif self.augments or policy is not None:
            self.augment_policy = resolve_policy(input_kind, policy)

    @property
    def augments(self) -> bool:
        """Whether this run augments anything (labelled items or the method's own views)."""
        return self.uses_augmentation or self.labelled_level != "none"

    def augment_generator(self, batch: Batch, stream: int, device=None) -> torch.Generator:
        """A generator for ``stream`` (0: the labelled items; a method's own from 1) of ``batch``,
        on ``device`` (default: ``batch.xs``'s): seeded from ``batch.seed``, else from the global
        torch RNG (saved in checkpoints, so either way a resumed run repeats it)."""
        from ..augment import batch_generator

        seed = batch.seed if batch.seed is not None else int(torch.randint(0, 2 ** 62, (1,)))
        return batch_generator(seed, stream, batch.xs.device if device is None else device)

    def augment(self, x: torch.Tensor, level: str, gen: torch.Generator) -> torch.Tensor:
        """``x`` [B, ...] under the policy's ``level`` (none | weak | strong), no gradient."""
        if self.augment_policy is None:
            raise ConfigError(f"method {self.name!r} augments its inputs but has no augmentation policy; "
                              f"call set_augmentation(input_kind) (ucmkd.prepare does)")
        with torch.no_grad():
            return self.augment_policy.apply(level, x, gen)

    def augment_labelled(self, batch: Batch) -> Batch:
        """``batch`` with its labelled items ``xs`` augmented at ``labelled_level`` (the one place
        every method's labelled items are augmented; the trainer calls it before each step)."""
        if self.labelled_level == "none":
            return batch
        xs = self.augment(batch.xs, self.labelled_level, self.augment_generator(batch, 0))
        return dataclasses.replace(batch, xs=xs)

    # -- helpers shared by methods ------------------------------------------------------
    def project(self, z: torch.Tensor) -> torch.Tensor:
        """Student features [B, d_s] -> teacher feature space [B, d_t]."""
        return self.extra["projector"](z) if "projector" in self.extra else z

    def feature_map(self) -> Optional[nn.Module]:
        """The module this run learned that maps student features [B, d_s] into the teacher's
        feature space [B, d_t] (the projector), or None (features compared as they are). The
        alignment diagnostics, the feature plot and export read it; a method with another map
        overrides this."""
        return self.extra["projector"] if "projector" in self.extra else None

    def use_teacher_outputs(self, outputs) -> None:
        """Serve the frozen teacher's outputs from ``outputs`` (a
        :class:`~ucmkd.engine.teacher_outputs.TeacherOutputs` of the teacher modality the
        sampler draws from) for batches that carry teacher item indices (``batch.it``)."""
        self.teacher_outputs = outputs

    @torch.no_grad()
    def teacher_forward(self, batch: Batch, match: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher features [B', d_t] and logits [B', K] of ``batch.xt`` (no gradient). They come
        from the precomputed table when one is attached and the batch carries the items' indices
        (unchanged teacher items), else from a live forward (augmented or shifted teacher items).
        With ``match`` = B, the method uses the teacher items item for item, so B' must equal B."""
        xt = batch.xt
        if xt is None:
            raise ConfigError(f"method {self.name!r} needs a teacher batch; the sampler gave none")
        if match is not None and xt.shape[0] != match:
            raise DataError(f"{self.name}: teacher batch of {xt.shape[0]} items must match the student "
                            f"batch of {match} item for item")
        if self.teacher_outputs is not None and batch.it is not None:
            self.teacher.check_input(xt)
            return self.teacher_outputs.get(batch.it)
        return self.teacher(xt, return_features=True)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.student.parameters()) + list(self.extra.parameters())

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """Parameter groups whose gradient norms are clipped separately (default: one). The
        trainer's components (e.g. the CE shadow, :mod:`ucmkd.engine.shadow`) are split off into
        groups of their own by the strategy."""
        return [self.trainable_parameters()]

    # -- hooks the trainer calls ---------------------------------------------------------
    def candidates(self) -> dict[str, nn.Module]:
        """Models the trainer validates after every epoch, by name. ``"student"`` (the distilled
        student, ``self.student``) always comes first; a method may add others (e.g. a plain-CE
        shadow), each a model of the student's architecture (its best weights are loaded into
        the student when it is selected). A candidate may be left out of later epochs (e.g. once
        its training stops): its best record and weights so far are kept."""
        return {"student": self.student}

    def select_candidate(self, records: dict[str, dict]) -> str:
        """The candidate the run returns, from each candidate's best-validation record
        ``{epoch, val_acc, val_loss, test_acc}``; default ``"student"``."""
        return "student"

    def calibrate(self, x_val: torch.Tensor, y_val: torch.Tensor) -> dict:
        """Tune a data-dependent setting on the labelled validation split (x [N, ...], y [N], on the
        CPU: a method that uses it moves batches to its device; never the test split). Called by
        :meth:`end_epoch`. Returns metrics to log (default: none)."""
        return {}

    def end_epoch(self, x_val: torch.Tensor, y_val: torch.Tensor, row: dict) -> dict:
        """Called by the trainer after each epoch's validation with the labelled validation split
        and the epoch's metrics row so far (``val_acc``, ``{candidate}_val_acc``, ... of the
        candidates validated this epoch). Default: :meth:`calibrate`. Returns metrics to log."""
        return self.calibrate(x_val, y_val)

    def trainable_state_dict(self) -> dict:
        return {"student": self.student.state_dict(), "extra": self.extra.state_dict()}

    def load_trainable_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.extra.load_state_dict(state["extra"])

    def forward(self, batch: Batch) -> DistillOutput:  # pragma: no cover - abstract
        raise NotImplementedError


def build_distiller(name: str, student: Classifier, teacher: Optional[Classifier], params: dict | None = None):
    """Instantiate registered method ``name`` with validated ``params``."""
    cls = METHODS.get(name)
    return cls(student, teacher, cls.parse_params(params or {}))


def params_dict(params) -> dict:
    return dataclasses.asdict(params)
