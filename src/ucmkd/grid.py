"""The grid engine shared by ``ucmkd run`` and ``ucmkd bench``: cells (setting x method x
seed) run once each, optionally in parallel worker processes, with every finished run
appended to a JSONL results store so that an interrupted grid resumes where it stopped.

A cell may also train data-parallel in N processes of its own (``nproc_per_cell``): it is
launched with PyTorch's launcher, ``python -m torch.distributed.run --standalone
--nproc_per_node=N -m ucmkd.cell``, and its result read from the ``result.json`` rank 0
writes. ``workers`` such cells run side by side (``workers x N`` processes in all).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from tqdm.auto import tqdm

from .config import RunConfig, deep_merge, from_dict, nest, to_dict
from .errors import ConfigError, DataError, UcmkdError
from .plugins import loaded_specs
from .provenance import code_version

VARIANT_KEYS = {"method", "params", "overrides"}


@dataclass
class Cell:
    """One run of the grid: ``label`` is a method name or a variant label."""

    setting: str
    label: str
    seed: int
    cfg: RunConfig
    run_dir: Path

    @property
    def store_key(self) -> str:
        from .keys import key_config

        return self.store_key_of(key_config(self.cfg))

    def store_key_of(self, key_cfg: dict) -> str:
        """The store key from the cell's :func:`~ucmkd.keys.key_config` (computed once by a caller
        that needs it too): ``setting|label|run key``."""
        from .config import config_hash

        return f"{self.setting}|{self.label}|{config_hash(key_cfg)}"


def cell_config(base: RunConfig, overrides: dict, label: str, seed: int, variants: dict,
                method_params: dict) -> RunConfig:
    """Resolve the run config of one cell: base <- setting overrides <- variant/method <- seed."""
    data = deep_merge(asdict(base), nest(overrides))
    var = variants.get(label)
    if var is not None:
        data = deep_merge(data, nest(var.get("overrides") or {}))
        method, params = var["method"], dict(var.get("params") or {})
    else:
        method, params = label, dict(method_params.get(label, {}))
    data["method"] = {"name": method, "params": params}
    data["seed"] = seed
    return from_dict(RunConfig, data, f"variant {label}" if var is not None else "base")


def validate_methods(methods: list, variants: dict, method_params: dict) -> None:
    from .methods import METHODS

    for label, var in variants.items():
        if not isinstance(var, dict) or "method" not in var or set(var) - VARIANT_KEYS:
            raise ConfigError(f"variants.{label}: expected a mapping with 'method' and optional "
                              f"'params', 'overrides'; got {var!r}")
        METHODS.get(var["method"]).parse_params(var.get("params") or {})
    for m in methods:
        if m not in variants:
            METHODS.get(m)
    for m, params in method_params.items():   # may name methods outside this grid
        METHODS.get(m).parse_params(params)


def resolved_params(cfg: RunConfig) -> dict:
    """The method params of ``cfg`` with every default spelled out (as results rows record them)."""
    from .methods import METHODS

    return json.loads(json.dumps(asdict(METHODS.get(cfg.method.name).parse_params(cfg.method.params)), default=str))


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name.replace(" -> ", "--"))


# --------------------------------------------------------------------------- results store
class ResultStore:
    """Append-only JSONL file, one row per finished run (with its resolved config and the
    code version). ``done`` holds the store keys of finished cells."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: list = []
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                self.rows.append(json.loads(line))
            except json.JSONDecodeError:
                # a process killed mid-write leaves a partial last line: skip it, keep the rest
                if i != len(lines):
                    raise DataError(f"{self.path}: line {i} is not valid JSON") from None
        self.done = {r["store_key"] for r in self.rows if "store_key" in r}
        self._by_cell: dict = {}
        for r in self.rows:
            self._by_cell.setdefault((r.get("setting"), r.get("method"), r.get("seed")), []).append(r)

    def find(self, cell: Cell, fingerprints: Optional[dict] = None) -> Optional[dict]:
        """The latest stored row of ``cell``: same store key, or (for rows written before a
        config field was added) the same config on every stored field, with the fields the row
        lacks at their defaults. With ``fingerprints`` (the cell's :func:`data_fingerprints`), a
        row recorded on other data content is not a match (rows that predate fingerprints are).
        A row whose method params, with their defaults spelled out, differ from the cell's (a
        default changed since: the config alone cannot tell) is not a match either.
        A config naming files whose content keys its runs (:func:`ucmkd.api.file_digests`, e.g. a
        teacher checkpoint) matches by store key only: its stored config cannot tell the file's
        old content from its new one. A row recorded with other plugin code (``user_code``) is
        never a match; rows without it match only cells that use no plugin code."""
        from .keys import file_digests, key_config

        key_cfg = key_config(cell.cfg)
        key = cell.store_key_of(key_cfg)
        code = key_cfg.get("user_code", {})
        params = resolved_params(cell.cfg)
        cands = [r for r in self._by_cell.get((cell.setting, cell.label, cell.seed), [])
                 if (r.get("user_code") or {}) == code and r.get("params", params) == params]
        if fingerprints:
            cands = [r for r in cands if all((r.get("fingerprints") or {}).get(k, v) == v
                                             for k, v in fingerprints.items())]
        exact = [r for r in cands if r.get("store_key") == key]
        if exact:
            return exact[-1]
        if file_digests(cell.cfg):
            return None
        new = to_dict(cell.cfg)
        compatible = [r for r in cands if "config" in r and _compatible(r["config"], new, _DEFAULTS)]
        return compatible[-1] if compatible else None

    def rows_for(self, cells: list) -> list[dict]:
        """The latest stored row of each of ``cells`` that has finished."""
        return [r for r in (self.find(c) for c in cells) if r is not None]

    def append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)
        self.done.add(row["store_key"])
        self._by_cell.setdefault((row.get("setting"), row.get("method"), row.get("seed")), []).append(row)


_DEFAULTS = to_dict(RunConfig())


def _compatible(old, new, default) -> bool:
    """``old`` (a stored config) equals ``new`` on every field it has, and every field only
    ``new`` has is at its default (a field added later must default to the old behaviour)."""
    if isinstance(old, dict) and isinstance(new, dict):
        if set(old) - set(new):
            return False
        for k, v in new.items():
            d = default.get(k) if isinstance(default, dict) else None
            if k in old:
                if not _compatible(old[k], v, d):
                    return False
            elif v != d:
                return False
        return True
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return list(old) == list(new)
    return old == new


# --------------------------------------------------------------------------- execution
_DATA_CACHE: dict = {}


def _load(cfg: RunConfig):
    """(student, teacher) modalities, memoised by the data config for one grid invocation
    (unchecked: :func:`ucmkd.api.prepare` checks them, once per run)."""
    from .assembly import _load_pair

    key = json.dumps([asdict(cfg.data)], sort_keys=True, default=str)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = _load_pair(cfg)
    return _DATA_CACHE[key]


def cell_context(cfg: RunConfig, train_teacher: bool = True):
    """The :class:`~ucmkd.api.RunContext` of a cell. Its teacher is trained (or loaded from the
    cache) for every method, so that teacher-free methods get their alignment diagnostics too;
    ``train_teacher=False``: an untrained one (preflight)."""
    from .assembly import _get_teacher, prepare
    from .engine import distributed

    dp = distributed.init_from_env(cfg.device)       # a cell under torchrun (ucmkd.cell)
    with distributed.rank_zero_first(dp):
        student, teacher_data = _load(cfg)
    teacher, info = _get_teacher(cfg, teacher_data, False, dp) if train_teacher else (None, None)
    return prepare(cfg, student=student, teacher_data=teacher_data, teacher=teacher, teacher_info=info,
                   train_teacher=train_teacher)


def data_fingerprints(cfg: RunConfig) -> dict:
    """Short hashes of the content of a cell's two modalities (as recorded in its results row)."""
    from .cache import content_key

    student, teacher_data = _load(cfg)
    return {"student_data": content_key(student.fingerprint), "teacher_data": content_key(teacher_data.fingerprint)}


def _run_cell(cfg_dict: dict, run_dir: str, threads: Optional[int], plugins: Optional[list] = None) -> dict:
    """Worker entry point (also called in-process): train one cell, return its result row.
    ``plugins``: the specs of the plugins the grid's process loaded, imported first. A cell
    directory left by another config of the same cell (a suite edited after an interrupted
    run) is renamed ``<dir>.stale-<old key>``: kept, never resumed, never deleted."""
    import torch

    from .api import run_context
    from .plugins import load_plugins

    load_plugins(plugins)
    if threads:
        torch.set_num_threads(threads)
    cfg = from_dict(RunConfig, cfg_dict)
    res = run_context(cell_context(cfg), run_dir, stale="set_aside")
    res.pop("distiller", None)
    return res


def _run_cell_torchrun(cfg_dict: dict, run_dir: str, nproc: int, plugins: Optional[list] = None) -> dict:
    """Train one cell in ``nproc`` data-parallel processes (``torch.distributed.run`` in a
    subprocess running :mod:`ucmkd.cell`, which imports ``plugins`` first) and return the result
    rank 0 wrote. A failure raises a UcmkdError with the processes' own error message."""
    from .cache import read_json

    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "cell.json"
        spec.write_text(json.dumps({"config": cfg_dict, "plugins": list(plugins or [])}, default=str))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "ucmkd.cell", str(spec), str(run_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    res = read_json(Path(run_dir) / "result.json", "run result") if proc.returncode == 0 else None
    if res is None:
        said = [line for line in proc.stderr.splitlines() if line.startswith("ucmkd: error: ")]
        why = said[-1][len("ucmkd: error: "):] if said else "\n".join(proc.stderr.splitlines()[-15:])
        raise UcmkdError(f"the run in {nproc} processes ({' '.join(cmd[2:7])}) failed with exit code "
                         f"{proc.returncode}: {why}")
    return res


def preflight(cells: list[Cell]) -> None:
    """Prepare every (setting, method) with an untrained teacher before any training
    (:func:`ucmkd.api.prepare`: data, models, distiller, pairing sampler, ``needs_pairs``), so
    that a cell that cannot run fails in seconds, not after hours of grid."""
    seen = set()
    for c in cells:
        if (c.setting, c.label) in seen:
            continue
        seen.add((c.setting, c.label))
        try:
            cell_context(c.cfg, train_teacher=False)
        except UcmkdError as e:
            raise type(e)(f"setting {c.setting!r}, method {c.label!r}: {e}") from None


def run_cells(cells: list[Cell], store: ResultStore, workers: int = 1, progress: bool = True,
              log: Callable = print, nproc_per_cell: int = 1) -> list[dict]:
    """Run every cell not yet in ``store`` and return the store rows of all ``cells``.

    Teachers are trained (or loaded from the cache) first, in this process; then the cells
    run, in ``workers`` spawned processes of one thread each when ``workers > 1``. With
    ``nproc_per_cell`` N > 1 every cell trains data-parallel in N processes of its own
    (torchrun; the global batch is the config's ``optim.batch_size``), ``workers`` cells side by side.
    """
    if nproc_per_cell < 1:
        raise ConfigError(f"nproc_per_cell: expected a value >= 1, got {nproc_per_cell}")
    _DATA_CACHE.clear()        # one load per grid invocation: data changed since the last one is seen
    todo = [c for c in cells if store.find(c, data_fingerprints(c.cfg)) is None]
    preflight(todo)
    if len(todo) < len(cells):
        log(f"{len(cells) - len(todo)} of {len(cells)} runs already in {store.path}; running {len(todo)}")
    seen = set()
    for c in todo:
        from .engine import get_teacher
        from .engine.teacher import teacher_dir

        _, teacher_data = _load(c.cfg)
        tdir = teacher_dir(c.cfg, teacher_data)
        if tdir not in seen:
            seen.add(tdir)
            _, info = get_teacher(c.cfg, teacher_data)
            log(f"teacher {c.cfg.data.teacher}: test acc {100 * info['test_acc']:.1f}% "
                f"(val {100 * info['val_acc']:.1f}%), {info['path']}")
    version = code_version()
    plugins = loaded_specs()       # every process that runs a cell imports them first
    bar = tqdm(total=len(todo), desc="runs", disable=not progress)

    def record(cell: Cell, res: dict) -> None:
        row = {"setting": cell.setting, "method": cell.label, "seed": cell.seed, "store_key": cell.store_key,
               "code_version": version, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
               **{k: v for k, v in res.items() if k not in ("method", "seed")},
               "config": to_dict(cell.cfg)}
        store.append(row)
        bar.update(1)
        bar.set_postfix_str(f"{cell.setting} {cell.label} s{cell.seed}: {100 * res['test_acc']:.1f}%")

    if nproc_per_cell > 1:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:    # each thread waits on one torchrun
            futures = {pool.submit(_run_cell_torchrun, to_dict(c.cfg), str(c.run_dir), nproc_per_cell, plugins): c
                       for c in todo}
            try:
                for fut in as_completed(futures):
                    cell = futures[fut]
                    try:
                        res = fut.result()
                    except UcmkdError as e:
                        raise type(e)(f"setting {cell.setting!r}, method {cell.label!r}, seed {cell.seed}: "
                                      f"{e}") from None
                    record(cell, res)
            finally:
                for fut in futures:
                    fut.cancel()
    elif workers <= 1 or len(todo) <= 1:
        for c in todo:
            record(c, _run_cell(to_dict(c.cfg), str(c.run_dir), None, plugins))
    else:
        import multiprocessing as mp

        pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
        try:
            futures = {pool.submit(_run_cell, to_dict(c.cfg), str(c.run_dir), 1, plugins): c for c in todo}
            for fut in as_completed(futures):
                cell = futures[fut]
                try:
                    res = fut.result()
                except UcmkdError as e:
                    raise type(e)(f"setting {cell.setting!r}, method {cell.label!r}, seed {cell.seed}: {e}") from None
                record(cell, res)
        finally:   # on an error, stop at once: finished runs are in the store, the rest is not started
            pool.shutdown(wait=True, cancel_futures=True)
    bar.close()
    return store.rows_for(cells)


__all__ = ["Cell", "ResultStore", "run_cells", "cell_config", "validate_methods", "code_version", "safe_name"]
