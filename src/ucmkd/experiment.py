"""``ucmkd run``: a grid of methods x seeds x directions over one base config."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from .config import SUPERVISED, ExperimentConfig, RunConfig, SuiteConfig, deep_merge, from_dict, nest, save_config
from .errors import ConfigError
from .grid import cell_config, validate_methods


def apply_quick(exp: ExperimentConfig) -> ExperimentConfig:
    """Apply the experiment's ``quick`` dotted overrides (a ~1-minute smoke version)."""
    if not exp.quick:
        return exp
    data = deep_merge(asdict(exp), nest(exp.quick))
    data["quick"] = {}
    return from_dict(ExperimentConfig, data, "experiment")


def run_config_for(exp: ExperimentConfig, teacher: str, student: str, label: str, seed: int) -> RunConfig:
    """The run config of grid cell (direction, method or variant ``label``, seed)."""
    return cell_config(exp.base, {"data.teacher": teacher, "data.student": student}, label, seed,
                       exp.variants, exp.method_params)


def validate_experiment(exp: ExperimentConfig) -> None:
    validate_methods(exp.methods, exp.variants, exp.method_params)
    for d in exp.directions:
        if not (isinstance(d, (list, tuple)) and len(d) == 2):
            raise ConfigError(f"directions: each entry must be [teacher, student], got {d!r}")
    if not exp.seeds:
        raise ConfigError("seeds: give at least one seed")


def experiment_suite(exp: ExperimentConfig) -> SuiteConfig:
    """The suite an experiment is: one setting per direction (named ``"teacher -> student"``,
    overriding ``data.teacher`` and ``data.student``), its methods, params, variants, seeds and
    plugins, baseline ``ce`` (or its first method)."""
    validate_experiment(exp)
    settings = {f"{t} -> {s}": {"overrides": {"data.teacher": t, "data.student": s}} for t, s in exp.directions}
    return SuiteConfig(name=exp.name, out_dir=exp.out_dir, base=exp.base, methods=list(exp.methods),
                       method_params=dict(exp.method_params), variants=dict(exp.variants), seeds=list(exp.seeds),
                       settings=settings, baseline=SUPERVISED if SUPERVISED in exp.methods else exp.methods[0],
                       plugins=list(exp.plugins))


def run_experiment(exp: ExperimentConfig, out_dir: str | Path | None = None, progress: bool = True,
                   workers: int = 1, log=print, nproc_per_cell: int = 1) -> dict:
    """Run the experiment as the suite it is (:func:`experiment_suite`: one grid front end, one
    report, :func:`ucmkd.bench.run_suite`); finished runs found in ``out_dir`` are reused. Writes
    ``experiment.yaml`` and the suite's reports, among them ``table.md`` and ``plot.png`` (the
    compact view) and ``results.csv``. ``workers`` cells run side by side, each in
    ``nproc_per_cell`` data-parallel processes. Returns {results, rows, table, out_dir}."""
    from .bench import run_suite

    suite = experiment_suite(exp)
    out = Path(out_dir or exp.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(exp, out / "experiment.yaml")
    t_start = time.time()
    res = run_suite(suite, out, workers=workers, progress=progress, log=log, nproc_per_cell=nproc_per_cell,
                    print_report=False)
    table = (out / "table.md").read_text().rstrip("\n") if (out / "table.md").is_file() else ""
    log(table)
    log(f"\n{len(res['results'])} runs in {time.time() - t_start:.0f} s; results in {out}/ "
        f"(table.md, plot.png, tables.md, results.csv, results.jsonl)")
    return {"results": res["results"], "rows": res["rows"], "table": table, "out_dir": str(out)}
