"""Run keys: what makes two runs differ, as the results store, run directories and caches see it.

A run is keyed by :func:`key_config` (the config without what never changes a result) plus the
content fingerprints of its data, its student architecture and its teacher weights
(:func:`ucmkd.assembly.prepare`); ``key.json`` in a run directory records the parts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .cache import read_json, signature_diff
from .config import DataConfig, RunConfig, config_hash, to_dict
from .data.base import dataset_reads, family
from .plugins import user_code


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
