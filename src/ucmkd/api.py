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

import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from .assembly import (RunContext, build_other_modality, build_student,  # noqa: F401
                       load_pair, prepare)
from .cache import clean_tmp, read_json, write_json
from .data.pairing import DRAW_FILE
from .checks import check_data, check_device, check_model  # noqa: F401  (the API's names, kept)
from .config import RunConfig, save_config
from .data import ModalityData
from .data.standardize import NORMALISATION_FILE, normalisation_entry
from .engine import distributed
from .errors import DataError
from .keys import (LATER_DEFAULTS, RUN_KEY_FILE, UNKEYED, file_digests, key_config, run_key,  # noqa: F401
                   run_key_parts, stored_key, what_differs)
from .models import Classifier
from .provenance import versions


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
            ctx.sampler.save_draw(run_dir / DRAW_FILE)   # what the run drew: plot and diagnose read it
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


__all__ = ["run", "run_context", "prepare", "RunContext", "load_pair", "build_student", "build_other_modality",
           "key_config", "run_key", "run_key_parts", "stored_key", "what_differs", "file_digests", "check_data",
           "check_model", "check_device", "RUN_KEY_FILE", "UNKEYED", "LATER_DEFAULTS"]
