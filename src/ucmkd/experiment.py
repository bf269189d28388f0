"""``ucmkd run``: a grid of methods x seeds x directions over one base config."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from .api import load_pair, run
from .config import ExperimentConfig, RunConfig, deep_merge, from_dict, nest, save_config
from .engine import get_teacher
from .errors import ConfigError
from .methods import METHODS
from .report import diagnostics_table, markdown_table, plot, summarise, write_csv


def apply_quick(exp: ExperimentConfig) -> ExperimentConfig:
    """Apply the experiment's ``quick`` dotted overrides (a ~1-minute smoke version)."""
    if not exp.quick:
        return exp
    data = deep_merge(asdict(exp), nest(exp.quick))
    data["quick"] = {}
    return from_dict(ExperimentConfig, data, "experiment")


VARIANT_KEYS = {"method", "params", "overrides"}


def run_config_for(exp: ExperimentConfig, teacher: str, student: str, label: str, seed: int) -> RunConfig:
    """The run config of grid cell (direction, method or variant ``label``, seed)."""
    base = asdict(exp.base)
    var = exp.variants.get(label)
    if var is not None:
        overrides = var.get("overrides") or {}
        base = deep_merge(base, nest(overrides))
        method, params = var["method"], dict(var.get("params") or {})
    else:
        method, params = label, dict(exp.method_params.get(label, {}))
    base["data"].update(teacher=teacher, student=student)
    base["method"] = {"name": method, "params": params}
    base["seed"] = seed
    return from_dict(RunConfig, base, f"variant {label}" if var is not None else "base")


def validate_experiment(exp: ExperimentConfig) -> None:
    for label, var in exp.variants.items():
        if not isinstance(var, dict) or "method" not in var or set(var) - VARIANT_KEYS:
            raise ConfigError(f"variants.{label}: expected a mapping with 'method' and optional "
                              f"'params', 'overrides'; got {var!r}")
        METHODS.get(var["method"]).parse_params(var.get("params") or {})
    for m in exp.methods:
        if m not in exp.variants:
            METHODS.get(m)
    for m, params in exp.method_params.items():   # may name methods outside this grid (e.g. after methods=...)
        METHODS.get(m).parse_params(params)
    for d in exp.directions:
        if not (isinstance(d, (list, tuple)) and len(d) == 2):
            raise ConfigError(f"directions: each entry must be [teacher, student], got {d!r}")
    if not exp.seeds:
        raise ConfigError("seeds: give at least one seed")


def run_experiment(exp: ExperimentConfig, out_dir: str | Path | None = None, progress: bool = True,
                   log=print) -> dict:
    """Run the grid, write ``results.csv``, ``table.md``, ``plot.png`` and ``experiment.yaml``
    to ``out_dir``; finished runs found there are reused. Returns {results, rows, table}."""
    validate_experiment(exp)
    out = Path(out_dir or exp.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(exp, out / "experiment.yaml")
    results = []
    t_start = time.time()
    cells = [(t, s, m, k) for t, s in exp.directions for m in exp.methods for k in exp.seeds]
    bar = tqdm(cells, desc=exp.name, disable=not progress)
    teachers: dict = {}
    for t, s, m, k in bar:
        cfg = run_config_for(exp, t, s, m, k)
        if (t, s) not in teachers:
            student_data, teacher_data = load_pair(cfg)
            bar.set_description(f"{exp.name}: teacher {t}")
            teacher, info = get_teacher(cfg, teacher_data, progress=False)
            log(f"teacher {t}: test acc {100 * info['test_acc']:.1f}% (val {100 * info['val_acc']:.1f}%), "
                f"cached at {info['path']}")
            teachers[(t, s)] = (student_data, teacher_data, teacher, info)
        student_data, teacher_data, teacher, info = teachers[(t, s)]
        bar.set_description(f"{exp.name}: {m} {t}->{s} seed {k}")
        run_dir = out / "runs" / f"{_safe(t)}--{_safe(s)}" / m / f"seed{k}"
        res = run(cfg, run_dir=run_dir, student=student_data, teacher_data=teacher_data, teacher=teacher,
                  teacher_info=info)
        res.pop("distiller", None)
        res["method"] = m
        res["teacher_test_acc"] = info["test_acc"]
        results.append(res)
    bar.close()
    rows = summarise(results)
    table = markdown_table(rows, exp.methods)
    diag = diagnostics_table(results, exp.methods)
    if diag:
        table += ("\n\nAlignment diagnostics (validation split, best-validation student; "
                  "see ucmkd.diagnostics):\n\n" + diag)
    write_csv(results, out / "results.csv")
    (out / "table.md").write_text(table + "\n")
    plot(rows, out / "plot.png", exp.methods, title=exp.name)
    log(table)
    log(f"\n{len(results)} runs in {time.time() - t_start:.0f} s; results in {out}/ "
        f"(results.csv, table.md, plot.png)")
    return {"results": results, "rows": rows, "table": table, "out_dir": str(out)}


def _safe(name: str) -> str:
    return name.replace("/", "-").replace(":", "-")
