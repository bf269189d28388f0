"""``ucmkd bench``: a benchmark suite (settings x methods x seeds) with paired statistics.

For each setting: student test accuracy at the best validation epoch (mean, std), the delta
against the baseline (``ce``) paired by seed with a 95 % Student-t confidence interval and a
two-sided Wilcoxon signed-rank p-value, teacher accuracy and wall time per run. Every finished
run is appended to ``results.jsonl`` (with its resolved config and the code version), so an
interrupted suite resumes where it stopped and never re-runs a finished cell; ``--only``
runs a part, and so do ``methods=[...]``/``seeds=[...]`` on the command line
(:data:`NARROWING`), while the outputs always cover every cell of the suite finished so far
(the suite's own methods and seeds, and those of the command line); ``--report`` only
rewrites them from the store.
"""
from __future__ import annotations

import fnmatch
import math
import time
from pathlib import Path

import numpy as np

from .config import SettingConfig, SuiteConfig, builtin_yaml, from_dict, load_config, replace, resolve_yaml, save_config
from .errors import ConfigError, UcmkdError
from .methods import METHODS
from .grid import Cell, ResultStore, cell_config, data_fingerprints, run_cells, safe_name, validate_methods
from .cache import write_text
from .report import (_fmt_delta, _named, ci_excludes_zero, diagnostics_table, fmt_ci, headline_report,
                     markdown_table, plot, share_summary, summarise, teacher_field, write_csv)


def builtin_suites() -> list[str]:
    return builtin_yaml("ucmkd.suites")


def suite_path(name: str):
    """A built-in suite name (``quick``, ``full``) or a YAML path."""
    return resolve_yaml("ucmkd.suites", name, "suite")


#: suite fields that a command line narrows to run a part now (``methods=[ce,kd]``, ``seeds=[0]``):
#: the reports keep covering the suite's own methods and seeds as well
NARROWING = ("methods", "seeds")


def load_suite(name: str, overrides: list[str] | None = None) -> tuple[SuiteConfig, SuiteConfig]:
    """(the suite to run now, the suite the reports cover) of a built-in name or YAML path with
    ``key=value`` overrides: the first with every override, the second with the methods and
    seeds of the suite's file (with the other overrides) followed by those of the command line
    (:data:`NARROWING`)."""
    path = suite_path(name)
    suite = load_config(SuiteConfig, path, overrides)
    defined = load_config(SuiteConfig, path, [o for o in overrides or [] if o.split("=", 1)[0].strip() not in NARROWING])
    return suite, widen(suite, defined)


def widen(suite: SuiteConfig, defined: SuiteConfig) -> SuiteConfig:
    """``suite`` with the methods and seeds of ``defined`` first, then its own (no repeats)."""
    return replace(suite, methods=list(dict.fromkeys(defined.methods + suite.methods)),
                   seeds=list(dict.fromkeys(defined.seeds + suite.seeds)))


def settings_of(suite: SuiteConfig) -> dict[str, SettingConfig]:
    if not suite.settings:
        raise ConfigError("settings: a suite needs at least one setting")
    return {name: from_dict(SettingConfig, s, f"settings.{name}") for name, s in suite.settings.items()}


def select(names: list[str], only: str | None) -> list[str]:
    """Setting names matching the comma-separated glob patterns ``only`` (all if None)."""
    if not only:
        return names
    pats = [p.strip() for p in only.split(",") if p.strip()]
    picked = [n for n in names if any(fnmatch.fnmatch(n, p) for p in pats)]
    unmatched = [p for p in pats if not any(fnmatch.fnmatch(n, p) for n in names)]
    if unmatched:
        raise ConfigError(f"--only {unmatched[0]!r} matches no setting; settings: {', '.join(names)}")
    return picked


def suite_cells(suite: SuiteConfig, out: Path, only: str | None = None,
                full: SuiteConfig | None = None) -> tuple[list[Cell], list[Cell]]:
    """(cells to run now: ``suite``'s in the settings matching ``only``; every cell the reports
    cover: those of ``full``, default ``suite``, and the cells to run now)."""
    full = suite if full is None else full
    settings = settings_of(suite)
    chosen = set(select(list(settings), only))
    for s in (suite, full):
        validate_methods(s.methods, s.variants, s.method_params)
    for name, st in settings.items():
        if name not in chosen:        # settings left out by --only are not checked against this run
            continue
        validate_methods(st.extra_methods, suite.variants, {})
        # an exclusion may name a method that a narrowed list (methods=[...]) no longer has
        unknown = [m for m in st.exclude_methods if m not in suite.variants and m not in METHODS]
        if unknown:
            raise ConfigError(f"settings.{name}.exclude_methods: {unknown[0]!r} is neither a method nor a "
                              f"variant; known methods: {', '.join(METHODS.names())}")
    if full.baseline not in full.methods:
        raise ConfigError(f"baseline {full.baseline!r} must be one of the suite's methods {full.methods}")
    if full.headline.method is not None and full.headline.method not in full.variants:
        METHODS.get(full.headline.method)
    if not suite.seeds:
        raise ConfigError("seeds: give at least one seed")
    now = [c for c in _cells(suite, out) if c.setting in chosen]
    every = {(c.setting, c.label, c.seed): c for c in _cells(full, out) + now}
    return now, list(every.values())


def _cells(suite: SuiteConfig, out: Path) -> list[Cell]:
    """Every cell of ``suite``: settings x (methods not excluded there + its extra methods) x seeds."""
    cells = []
    for name, st in settings_of(suite).items():
        for m in [m for m in suite.methods if m not in st.exclude_methods] + st.extra_methods:
            for k in suite.seeds:
                cfg = cell_config(suite.base, st.overrides, m, k, suite.variants, suite.method_params)
                cells.append(Cell(name, m, k, cfg, out / "runs" / safe_name(name) / m / f"seed{k}"))
    return cells


# --------------------------------------------------------------------------- reporting
def resolve_method(suite: SuiteConfig, label: str):
    """(method class, parsed params) of a suite label: a variant's method, else the method itself."""
    var = suite.variants.get(label)
    name, params = (var["method"], var.get("params")) if var is not None else (label, suite.method_params.get(label))
    cls = METHODS.get(name)
    return cls, cls.parse_params(params or {})


def teacher_split(suite: SuiteConfig, methods: list[str]) -> tuple[list[str], list[str]]:
    """(distillers, teacher-free methods) among ``methods``, from the method registry
    (:meth:`~ucmkd.methods.Distiller.teacher_free` of each label's method and params; a variant
    resolves to its method). Teacher-free: every one but the baseline (ablations of the headline
    method included: ``ucmkd-no-teacher`` is one). Distillers: the others, except the headline
    method, its ablations (``ablation_prefix``, ``ungated``) and oracles that need true pairs."""
    h = suite.headline
    distillers, free = [], []
    for m in methods:
        if m == suite.baseline:
            continue
        cls, params = resolve_method(suite, m)
        ablation = m == h.ungated or bool(h.ablation_prefix) and m.startswith(h.ablation_prefix)
        if cls.teacher_free(params):
            free.append(m)
        elif m != h.method and not ablation and not cls.needs_pairs:
            distillers.append(m)
    return distillers, free


def _fmt_p(p: float) -> str:
    return "-" if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else "<0.001")


def setting_tables(rows: list[dict], settings: dict[str, SettingConfig], methods: list[str], baseline: str,
                   field: dict | None = None, headline: str | None = None, baselines=()) -> str:
    """One Markdown table per setting (suite order). With ``field`` (:func:`ucmkd.report.teacher_field`)
    each table is followed by the setting's best baseline (among ``baselines``), best distiller,
    best teacher-free method and the teacher's share of ``headline``."""
    order = {m: i for i, m in enumerate(methods)}
    out = []
    for name, st in settings.items():
        rs = sorted([r for r in rows if r["setting"] == name], key=lambda r: (order.get(r["method"], 99), r["method"]))
        if not rs:
            continue
        ta = rs[0]["teacher_acc"]
        out.append(f"### {name}" + (f": {st.description}" if st.description else ""))
        out.append(f"\nteacher test acc {ta:.1f} %\n")
        out.append(f"| method | test acc % (mean +- std) | delta vs {baseline} pp [95 % CI] | Wilcoxon p | s/run | seeds |")
        out.append("|---|---|---|---|---|---|")
        for r in rs:
            if r["method"] == baseline or math.isnan(r["delta_mean"]):
                delta, p = "-", "-"
            else:
                mark = " *" if ci_excludes_zero(r) else ""
                delta = f"{fmt_ci(r)}{mark}"
                p = _fmt_p(r["wilcoxon_p"])
            out.append(f"| {r['method']} | {r['acc_mean']:.1f} +- {r['acc_std']:.1f} | {delta} | {p} | "
                       f"{r['seconds']:.1f} | {r['n']} |")
        if field is not None:
            f = field[name]
            keyed = {(x["setting"], x["method"]): x for x in rs}
            cands = [keyed[(name, m)] for m in baselines if (name, m) in keyed and not math.isnan(keyed[(name, m)]["delta_mean"])]
            best = max(cands, key=lambda x: x["delta_mean"]) if cands else None
            parts = [f"best baseline: {_named(best)}", f"best distiller: {_named(f['distiller'])}"]
            if f["free"] is None:
                parts.append(f"best teacher-free: none ran besides {baseline}")
            else:
                parts.append(f"best teacher-free: {_named(f['free'])}")
                if headline:
                    parts.append(f"teacher's share ({headline} - {f['free']['method']}): {_fmt_delta(f['share'])}")
            out.append("\n" + "; ".join(parts) + ".")
        out.append("")
    out.append("`*`: the 95 % CI of the paired delta (Student t over seeds) excludes zero; [CI n/a]: one seed.")
    if field is not None:
        out.append(f"Best distiller / teacher-free: the highest mean delta vs {baseline} among the methods that use a "
                   f"teacher / that use none (from the method registry); the teacher's share is the headline method "
                   f"minus that teacher-free method, paired by seed [95 % CI].")
        if headline:
            out.append(share_summary(field, headline))
    return "\n".join(out)


def heatmap(rows: list[dict], path: Path, settings: list[str], methods: list[str], baseline: str,
            title: str = "") -> None:
    """Methods x settings heat map of the mean paired delta vs ``baseline`` (pp); cells whose
    95 % CI excludes zero are marked with ``*``; blank cells were not run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    methods = [m for m in methods if m != baseline]
    grid = np.full((len(methods), len(settings)), np.nan)
    marks = np.zeros_like(grid, dtype=bool)
    for r in rows:
        if r["method"] in methods and r["setting"] in settings:
            i, j = methods.index(r["method"]), settings.index(r["setting"])
            grid[i, j], marks[i, j] = r["delta_mean"], ci_excludes_zero(r)
    lim = max(1.0, float(np.nanmax(np.abs(grid)))) if np.isfinite(grid).any() else 1.0
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(settings), 1.0 + 0.42 * len(methods)))
    im = ax.imshow(grid, cmap="RdBu", norm=TwoSlopeNorm(0.0, -lim, lim), aspect="auto")
    for i in range(len(methods)):
        for j in range(len(settings)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:+.1f}{'*' if marks[i, j] else ''}", ha="center", va="center",
                        fontsize=7, color="white" if abs(grid[i, j]) > 0.6 * lim else "black")
    ax.set_xticks(range(len(settings)))
    ax.set_xticklabels(settings, rotation=35, ha="right", fontsize=7)
    ax.set_yticks(range(len(methods)))
    ax.set_yticklabels(methods, fontsize=8)
    fig.colorbar(im, ax=ax, label=f"delta vs {baseline} (pp)")
    ax.set_title(title + " (* = 95 % CI excludes 0)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cannot_apply(suite: SuiteConfig, setting: str, label: str) -> str | None:
    """Why method ``label`` cannot run in ``setting``: the error that preparing its first cell
    with an untrained teacher raises (as :func:`ucmkd.grid.preflight` does before a grid
    trains); None if it can, or if the setting's data cannot be read here (nobody can tell)."""
    from .grid import cell_context

    st = settings_of(suite)[setting]
    cfg = cell_config(suite.base, st.overrides, label, suite.seeds[0], suite.variants, suite.method_params)
    try:
        data_fingerprints(cfg)
    except UcmkdError:
        return None
    try:
        cell_context(cfg, train_teacher=False)
    except UcmkdError as e:
        return str(e)
    return None


def exclusion_notes(suite: SuiteConfig, methods: list[str]) -> str:
    """The tables' note on the methods a setting excludes (``exclude_methods``): those that
    cannot apply there (:func:`cannot_apply`, with the reason), and those the suite left out."""
    cannot, left_out = {}, []
    for name, st in settings_of(suite).items():
        for m in st.exclude_methods:
            if m in methods:
                why = cannot_apply(suite, name, m)
                if why:
                    cannot.setdefault((m, why), []).append(name)
                else:
                    left_out.append(f"{m} in {name}")
    notes = []
    if cannot:
        notes.append("Not run (the method cannot apply to the setting):\n"
                     + "\n".join(f"- {m} in {', '.join(names)}: {why}" for (m, why), names in cannot.items()))
    if left_out:
        notes.append("Not run (excluded by the suite, settings.<setting>.exclude_methods): " + ", ".join(left_out) + ".")
    return "\n\n".join(notes)


def report(suite: SuiteConfig, results: list[dict], out: Path) -> dict:
    """Write tables.md, the headline report (``<headline method>.md``), summary.csv,
    results.csv, heatmap.png and bars/<setting>.png over ``results`` (rows of ``suite``'s cells)."""
    settings = settings_of(suite)
    methods = list(dict.fromkeys(suite.methods + [m for s in settings.values() for m in s.extra_methods]))
    rows = summarise(results, baseline=suite.baseline, by=("setting",))
    h = suite.headline
    headline = h.method if h.method in methods else None
    # baselines: every other method of the suite (oracles and ablations are variants)
    others = [m for m in methods if m not in (suite.baseline, h.method, *h.compare) and m not in suite.variants]
    distillers, free = teacher_split(suite, methods)
    field = teacher_field(results, {(r["setting"], r["method"]): r for r in rows}, list(settings), distillers, free,
                          headline)
    tables = setting_tables(rows, settings, methods, suite.baseline, field, headline, others)
    notes = exclusion_notes(suite, methods)
    if notes:
        tables += "\n" + notes
    write_text(out / "tables.md", tables + "\n")
    if headline and suite.baseline in methods:
        write_text(out / f"{safe_name(h.method)}.md", headline_report(
            results, list(settings), others, suite.baseline, h.method, tuple(h.compare), h.control,
            h.ablation_prefix, h.ungated, distillers, free, aug_baseline=h.aug_baseline) + "\n")
    write_csv(results, out / "results.csv", extra=["setting"])
    _write_summary(rows, out / "summary.csv")
    dirs = {(r.get("teacher"), r.get("student")) for r in results}
    if results and all(t and s for t, s in dirs) and \
            len({(r.get("teacher"), r.get("student"), r["setting"]) for r in results}) == len(dirs):
        overview(results, methods, suite.baseline, out, suite.name)   # one setting per direction: the compact view
    ran = [s for s in settings if any(r["setting"] == s for r in rows)]
    if ran and any(m != suite.baseline for m in methods):
        heatmap(rows, out / "heatmap.png", ran, methods, suite.baseline, title=suite.name)
    if ran:
        (out / "bars").mkdir(exist_ok=True)
        for s in ran:
            plot([r for r in rows if r["setting"] == s], out / "bars" / f"{safe_name(s)}.png", methods,
                 title=f"{suite.name}: {s}", by=("setting",))
    return {"rows": rows, "tables": tables}


def overview(results: list[dict], methods: list[str], baseline: str, out: Path, title: str) -> str:
    """The compact view of a suite whose settings are directions (teacher -> student), as
    ``ucmkd run`` prints it: ``table.md`` (methods per direction, with the alignment
    diagnostics) and ``plot.png``. Returns the table."""
    rows = summarise(results, baseline=baseline)
    table = markdown_table(rows, methods, baseline)
    diag = diagnostics_table(results, methods)
    if diag:
        table += ("\n\nAlignment diagnostics (validation split, best-validation student; "
                  "see ucmkd.diagnostics):\n\n" + diag)
    write_text(out / "table.md", table + "\n")
    plot(rows, out / "plot.png", methods, title=title)
    return table


def _write_summary(rows: list[dict], path: Path) -> None:
    import csv

    fields = ["setting", "method", "n", "acc_mean", "acc_std", "delta_mean", "delta_std", "ci_low", "ci_high",
              "wilcoxon_p", "teacher_acc", "seconds"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def run_suite(suite: SuiteConfig, out_dir: str | Path | None = None, only: str | None = None,
              workers: int | None = None, progress: bool = True, log=print,
              nproc_per_cell: int | None = None, full: SuiteConfig | None = None,
              report_only: bool = False, print_report: bool = True) -> dict:
    """Run (or resume) ``suite``, restricted to the settings matching ``only``; report every
    finished cell of ``full`` (default ``suite``; ``ucmkd bench`` passes the suite its file
    defines, widened by a command line's methods and seeds: :func:`load_suite`).
    ``report_only``: run nothing, rewrite the reports from the results store. ``workers`` cells
    run side by side; ``nproc_per_cell`` > 1 trains every cell data-parallel in that many
    processes (default: the suite's fields); ``print_report=False`` logs the runs' progress but not
    the tables. Returns {results, rows, tables, out_dir, seconds}."""
    if report_only and only:
        raise ConfigError("--report runs nothing and reports every finished cell: --only has no effect with it")
    full = suite if full is None else full
    out = Path(out_dir or suite.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now, all_cells = suite_cells(suite, out, only, full)
    save_config(full, out / "suite.yaml")
    t0 = time.time()
    store = ResultStore(out / "results.jsonl")
    if not report_only:
        run_cells(now, store, workers=suite.workers if workers is None else workers, progress=progress, log=log,
                  nproc_per_cell=suite.nproc_per_cell if nproc_per_cell is None else nproc_per_cell)
    results = store.rows_for(all_cells)
    rep = report(full, results, out)
    seconds = time.time() - t0
    if print_report:
        log(rep["tables"])
        ran = "reports rebuilt, nothing run" if report_only else f"{len(now)} runs requested"
        log(f"\n{ran}, {len(results)} of {len(all_cells)} suite runs finished; "
            f"{seconds:.0f} s. Outputs in {out}/ (tables.md, summary.csv, results.csv, results.jsonl, "
            f"heatmap.png, bars/)")
    return {"results": results, **rep, "out_dir": str(out), "seconds": seconds}


__all__ = ["run_suite", "suite_cells", "report", "heatmap", "setting_tables", "builtin_suites", "suite_path",
           "load_suite", "widen", "NARROWING", "cannot_apply"]
