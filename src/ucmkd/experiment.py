"""``ucmkd run``: a grid of methods x seeds x directions over one base config."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from .config import ExperimentConfig, RunConfig, deep_merge, from_dict, nest, save_config
from .errors import ConfigError
from .grid import Cell, ResultStore, cell_config, run_cells, safe_name, validate_methods
from .report import diagnostics_table, markdown_table, plot, summarise, write_csv


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


def experiment_cells(exp: ExperimentConfig, out: Path) -> list[Cell]:
    cells = []
    for t, s in exp.directions:
        setting = f"{t} -> {s}"
        for m in exp.methods:
            for k in exp.seeds:
                cells.append(Cell(setting, m, k, run_config_for(exp, t, s, m, k),
                                  out / "runs" / safe_name(setting) / m / f"seed{k}"))
    return cells


def run_experiment(exp: ExperimentConfig, out_dir: str | Path | None = None, progress: bool = True,
                   workers: int = 1, log=print, nproc_per_cell: int = 1) -> dict:
    """Run the grid, write ``results.csv``, ``results.jsonl``, ``table.md``, ``plot.png`` and
    ``experiment.yaml`` to ``out_dir``; finished runs found there are reused. ``workers`` cells
    run side by side, each in ``nproc_per_cell`` data-parallel processes.
    Returns {results, rows, table, out_dir}."""
    validate_experiment(exp)
    out = Path(out_dir or exp.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(exp, out / "experiment.yaml")
    t_start = time.time()
    results = run_cells(experiment_cells(exp, out), ResultStore(out / "results.jsonl"), workers=workers,
                        progress=progress, log=log, nproc_per_cell=nproc_per_cell)
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
        f"(results.csv, results.jsonl, table.md, plot.png)")
    return {"results": results, "rows": rows, "table": table, "out_dir": str(out)}
