"""Take a trained student away: :func:`load_student` and :func:`export_student`.

A finished run directory (``ucmkd.run(cfg, run_dir=...)``, ``ucmkd train --run-dir``) holds the
run's config, key, standardisation and ``latest.pt`` with every candidate's best-validation
weights. :func:`load_student` rebuilds the student :class:`~ucmkd.models.Classifier` with the
weights of the candidate the run selected (the distilled student, or e.g. ``ucmkd``'s CE shadow
when it validated better), in eval mode, without the distiller (no teacher, projector or
shadow). :func:`export_student` writes a file that plain PyTorch loads:

- ``state_dict``: ``torch.load(path, weights_only=True)`` gives a dict of plain types:
  ``state_dict`` (the classifier's tensors), ``architecture`` (how to rebuild it:
  :func:`ucmkd.models.build_classifier`'s arguments; :func:`load_exported` does it), ``classes``,
  ``input_shape``, ``standardization`` (mode, mean, std) and ``format``.
- ``torchscript``: ``torch.jit.load(path)`` gives a module whose ``forward(x)`` maps standardised
  inputs ``[B, *input_shape]`` to logits ``[B, K]`` exactly as the loaded student does;
  ``standardize(x)`` applies the run's standardisation to raw inputs and ``predict_raw(x)`` does
  both; ``classes`` and ``input_shape`` are attributes. The model is compiled with
  ``torch.jit.script``; an encoder that cannot be scripted is traced (``torch.jit.trace``) on
  validation items of the run, which is exact for encoders without data-dependent control flow.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from .keys import RUN_KEY_FILE, run_key_parts
from .cache import atomic_path, read_json
from .config import RunConfig, load_config
from .data.standardize import NORMALISATION_FILE, Standardizer
from .errors import ConfigError, DataError
from .models import Classifier, build_classifier, build_model

FORMATS = ("state_dict", "torchscript")
STATE_DICT_FORMAT = "ucmkd-student/1"


@dataclass
class LoadedStudent:
    """A trained student taken out of its run.

    model: the student classifier (eval mode, no gradient needed): ``model(x)`` maps standardised
    inputs ``[B, *input_shape]`` to logits ``[B, K]``. config: the run's :class:`RunConfig`.
    standardizer: the run's standardisation of student inputs (apply it to raw inputs first;
    :meth:`predict_raw` does both). classes: the K class names. selected: the candidate whose
    weights these are (``"student"`` or e.g. ``"fallback"``). result: the run's ``result.json``.
    """

    model: Classifier
    config: RunConfig
    standardizer: Standardizer
    classes: list
    selected: str
    run_dir: Path
    result: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple:
        return tuple(self.model.input_shape)

    @torch.no_grad()
    def predict_raw(self, x) -> torch.Tensor:
        """Logits [B, K] of raw (unstandardised) inputs ``x`` [B, *input_shape]."""
        return self.model(self.standardizer(x))


def _run_files(run_dir: Path) -> tuple[dict, dict, RunConfig]:
    if not run_dir.is_dir():
        raise DataError(f"run directory not found: {run_dir}")
    result = read_json(run_dir / "result.json", "run result")
    if result is None:
        raise DataError(f"{run_dir}: no result.json, so the run has not finished (resume it with the same "
                        f"command, e.g. ucmkd train --run-dir {run_dir} ...)")
    parts = run_key_parts(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise DataError(f"{cfg_path}: not found (every ucmkd run directory has one)")
    return result, parts, load_config(RunConfig, cfg_path)


def _student_fingerprint(parts: dict, run_dir: Path) -> dict:
    fp = parts.get("student_data")
    if not fp:
        raise DataError(f"{run_dir / RUN_KEY_FILE}: no student data fingerprint (written by an older ucmkd?)")
    return fp


def _build_default(cfg: RunConfig, fp: dict, num_classes: int) -> Classifier:
    return build_model(cfg.model, "student", fp["shape"][1:], fp["kind"], num_classes, f"student[{fp['name']}]")


def _selected_weights(run_dir: Path, result: dict) -> tuple[str, dict]:
    """(selected candidate, its best-validation state dict of the student architecture), read from
    the run's commit point ``latest.pt``."""
    from .engine.checkpoint import load_checkpoint

    st = load_checkpoint(run_dir / "latest.pt")
    if result.get("key") and st.get("config_hash") != result["key"]:
        raise DataError(f"{run_dir / 'latest.pt'}: written by another run (key {st.get('config_hash')}, "
                        f"result.json has {result['key']})")
    selected = result.get("selected", "student")
    states = st.get("best_states") or {}
    if selected not in states:
        raise DataError(f"{run_dir / 'latest.pt'}: no best weights of the selected candidate {selected!r} "
                        f"(it holds {sorted(states)})")
    state = states[selected]
    return selected, (state["student"] if selected == "student" else state)


def load_student(run_dir: str | Path, model: Optional[Classifier] = None) -> LoadedStudent:
    """The trained student of the finished run in ``run_dir`` (see :class:`LoadedStudent`).

    The architecture is rebuilt from the run's config and data description; a run trained with a
    student model you built yourself (``run(..., student_model=...)``) needs it again: pass a
    freshly built ``model`` of the same architecture and its weights are loaded into it. Errors
    (a DataError naming the file) for an unfinished run, missing files or an architecture that
    does not match the stored weights."""
    run_dir = Path(run_dir)
    result, parts, cfg = _run_files(run_dir)
    fp = _student_fingerprint(parts, run_dir)
    selected, state = _selected_weights(run_dir, result)
    if "head.weight" not in state:
        raise DataError(f"{run_dir / 'latest.pt'}: the student weights have no 'head.weight' (not a "
                        f"ucmkd Classifier)")
    num_classes = int(state["head.weight"].shape[0])
    if model is None:
        model = _build_default(cfg, fp, num_classes)
        from .cache import model_signature, signature_diff

        stored = parts.get("student_model")
        if stored and stored != model_signature(model):
            raise DataError(f"{run_dir}: the run's student is not the one its config builds "
                            f"({signature_diff(stored, model_signature(model))}): it was built by you; pass "
                            f"it again, freshly built: ucmkd.load_student({str(run_dir)!r}, model=...)")
    elif not isinstance(model, Classifier):
        raise ConfigError(f"model: expected a ucmkd.models.Classifier, got {type(model).__name__}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DataError(f"{run_dir / 'latest.pt'}: the stored student weights do not fit the model: {e}") from None
    model.eval().requires_grad_(False)
    std = (Standardizer.load(run_dir, "student") if (run_dir / NORMALISATION_FILE).is_file()
           else Standardizer.identity())
    return LoadedStudent(model=model, config=cfg, standardizer=std, classes=list(fp.get("classes", [])),
                         selected=selected, run_dir=run_dir, result=result)


# --------------------------------------------------------------------------- export
class ExportedStudent(nn.Module):
    """What the TorchScript file holds: the student's encoder and head, the run's standardisation
    (buffers ``mean``, ``std``) and its metadata. ``forward(x)``: standardised inputs
    ``[B, *input_shape]`` -> logits ``[B, K]``."""

    def __init__(self, student: Classifier, standardizer: Standardizer, classes: list):
        super().__init__()
        self.encoder = student.encoder
        self.head = student.head
        self.register_buffer("mean", standardizer.mean.detach().clone().to(torch.float32))
        self.register_buffer("std", standardizer.std.detach().clone().to(torch.float32))
        self.input_shape: List[int] = [int(s) for s in student.input_shape]
        self.classes: List[str] = [str(c) for c in classes]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if list(x.shape[1:]) != self.input_shape:
            raise ValueError("input shape does not match the student's input_shape")
        return self.head(self.encoder(x))

    @torch.jit.export
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Student features [B, d] of standardised inputs."""
        return self.encoder(x)

    @torch.jit.export
    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """The run's standardisation of raw inputs [B, *input_shape] (float32)."""
        return (x.to(torch.float32) - self.mean) / self.std

    @torch.jit.export
    def predict_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, K] of raw inputs."""
        return self.forward(self.standardize(x))


def architecture(loaded: LoadedStudent) -> dict:
    """How to rebuild the student (the arguments of :func:`ucmkd.models.build_classifier`), plain types."""
    m, fp = loaded.config.model, _student_fingerprint(run_key_parts(loaded.run_dir), loaded.run_dir)
    return {"builder": "ucmkd.models.build_classifier", "input_shape": [int(s) for s in loaded.input_shape],
            "kind": fp["kind"], "num_classes": int(loaded.model.num_classes), "backbone": m.student_backbone,
            "width": int(m.student_width), "feat_dim": int(m.student_feat_dim),
            "backbone_args": dict(m.student_backbone_args), "name": loaded.model.name}


def _scripted(loaded: LoadedStudent) -> tuple[torch.jit.ScriptModule, str]:
    """(TorchScript module, "script" or "trace"): the wrapper scripted; when the encoder cannot be
    scripted, the same wrapper around the encoder traced on validation items of the run."""
    try:
        return torch.jit.script(ExportedStudent(loaded.model, loaded.standardizer, loaded.classes).eval()), "script"
    except Exception as script_error:  # noqa: BLE001 - any scripting failure falls back to tracing
        example = _example_inputs(loaded)
        try:
            with torch.no_grad():
                encoder = torch.jit.trace(loaded.model.encoder, example)
            wrapper = ExportedStudent(loaded.model, loaded.standardizer, loaded.classes)
            wrapper.encoder = encoder
            return torch.jit.script(wrapper.eval()), "trace"
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{loaded.run_dir}: the student's encoder can be neither scripted "
                            f"({type(script_error).__name__}: {script_error}) nor traced "
                            f"({type(e).__name__}: {e}); use --format state_dict") from None


def _example_inputs(loaded: LoadedStudent) -> torch.Tensor:
    """A few validation items of the run (standardised), to trace with."""
    from .data import load_modality

    data = load_modality(loaded.config.data.student, loaded.config.data)
    return data.split("val")[0][:8]


def export_student(run_dir: str | Path, fmt: str = "state_dict", out: str | Path | None = None,
                   model: Optional[Classifier] = None) -> dict:
    """Write the run's trained student to ``out`` (default ``<run_dir>/student.pt`` for
    ``state_dict``, ``<run_dir>/student.torchscript.pt`` for ``torchscript``), atomically.
    Returns ``{path, format, how}`` (``how``: ``script`` or ``trace`` for TorchScript)."""
    if fmt not in FORMATS:
        raise ConfigError(f"format: unknown value {fmt!r}; choose one of {', '.join(FORMATS)}")
    loaded = load_student(run_dir, model=model)
    default = "student.pt" if fmt == "state_dict" else "student.torchscript.pt"
    path = Path(out) if out is not None else Path(run_dir) / default
    how = "state_dict"
    with atomic_path(path) as tmp:
        if fmt == "state_dict":
            if model is not None:
                arch = {"builder": None, "class": type(model.encoder).__qualname__,
                        "input_shape": [int(s) for s in loaded.input_shape],
                        "num_classes": int(model.num_classes), "feat_dim": int(model.feat_dim)}
            else:
                arch = architecture(loaded)
            mean, std = loaded.standardizer.values()
            torch.save({"format": STATE_DICT_FORMAT, "state_dict": dict(loaded.model.state_dict()),
                        "architecture": arch, "classes": [str(c) for c in loaded.classes],
                        "input_shape": [int(s) for s in loaded.input_shape],
                        "standardization": {"mode": loaded.standardizer.mode, "mean": mean, "std": std},
                        "selected": loaded.selected, "method": loaded.config.method.name}, tmp)
        else:
            module, how = _scripted(loaded)
            module.save(str(tmp))
    return {"path": str(path), "format": fmt, "how": how}


def load_exported(path: str | Path) -> tuple[Classifier, Standardizer, list]:
    """Rebuild (classifier in eval mode, standardizer, classes) from a ``state_dict`` export."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: not a readable state_dict export ({type(e).__name__}: {e})") from None
    if not isinstance(blob, dict) or blob.get("format") != STATE_DICT_FORMAT:
        raise DataError(f"{path}: not a ucmkd student export (format {blob.get('format') if isinstance(blob, dict) else None!r})")
    a = blob["architecture"]
    if a.get("builder") is None:
        raise DataError(f"{path}: the student was built by you ({a.get('class')}); build it again and "
                        f"load blob['state_dict'] into it")
    model = build_classifier(tuple(a["input_shape"]), a["kind"], a["num_classes"], a["backbone"], a["width"],
                             a["feat_dim"], name=a.get("name", "student"), backbone_args=a["backbone_args"])
    model.load_state_dict(blob["state_dict"], strict=True)
    model.eval().requires_grad_(False)
    s = blob["standardization"]
    std = Standardizer.from_dict(s, tuple(blob["input_shape"]), where=str(path))
    return model, std, list(blob["classes"])


__all__ = ["LoadedStudent", "load_student", "export_student", "load_exported", "ExportedStudent", "FORMATS"]
