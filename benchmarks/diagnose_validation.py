"""Validation of ``ucmkd diagnose``'s predicted gain, end to end and resumable.

    python benchmarks/diagnose_validation.py [--store DIR] [--fit-seeds 100,101,102] [--workers N]
        [--full outputs/bench-full] [--stress outputs/bench-stress] [--generalize outputs/bench-generalize]

Steps (each resumes from what ``--store`` already holds):

(a) probes: ``ucmkd.diagnose`` on every setting of the ``full``, ``stress`` and ``generalize``
    suites (probe seed 100, a validation seed), stored in ``<store>/probes.jsonl``;
(b) runs: ``ce`` and ``ucmkd`` on the validation seeds (``--fit-seeds``) of every setting, through
    the grid engine and its results store ``<store>/results.jsonl`` (the method's default params
    are spelled out in every cell, so rows of an older ``ucmkd`` default are never reused);
(c) fit: the gain model on the probes and the realised gains of the validation seeds ONLY,
    written to the coefficients file the package ships (``--coefficients``);
(d) score: the predictions against the realised gains of the REPORTED seeds, read from each
    suite's ``results.jsonl`` (``--full`` etc.: a results file or the suite's output directory;
    ``--score-seeds`` narrows them, e.g. to a held-out validation seed while developing), next
    to the trivial predictor (the headroom: teacher accuracy minus ``ce`` accuracy): a table,
    Spearman and mean absolute error of both, and a scatter plot (``--plot``).

``--only`` restricts every step to settings matching comma-separated globs of ``suite/setting``.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ucmkd.bench import settings_of, suite_path
from ucmkd.cache import write_text
from ucmkd.config import RunConfig, SuiteConfig, load_config
from ucmkd.grid import Cell, ResultStore, cell_config, run_cells, safe_name
from ucmkd.methods import METHODS

SUITES = ("full", "stress", "generalize")
METHOD, BASELINE = "ucmkd", "ce"
PROBE_SEED = 100


# --------------------------------------------------------------------------- settings
def suite_settings(only: str | None = None) -> dict[str, RunConfig]:
    """``suite/setting`` -> the setting's ``ucmkd`` run config (seed 0), for every built-in suite
    of :data:`SUITES` (those matching ``only``)."""
    out = {}
    pats = [p.strip() for p in (only or "").split(",") if p.strip()]
    for name in SUITES:
        suite = load_config(SuiteConfig, suite_path(name))
        for st_name, st in settings_of(suite).items():
            sid = f"{name}/{st_name}"
            if pats and not any(fnmatch.fnmatch(sid, p) for p in pats):
                continue
            out[sid] = method_config(suite, st.overrides, METHOD, 0)
    return out


def method_config(suite: SuiteConfig, overrides: dict, method: str, seed: int) -> RunConfig:
    """A cell config with the method's params spelled out (defaults included): the results store
    keys cells by their config, so a changed default is a new cell, never an old row."""
    cfg = cell_config(suite.base, overrides, method, seed, suite.variants, suite.method_params)
    cfg.method.params = asdict(METHODS.get(method).parse_params(cfg.method.params))
    cfg.threads = 1
    return cfg


def with_method(cfg: RunConfig, method: str, seed: int) -> RunConfig:
    from ucmkd.config import from_dict, to_dict

    d = to_dict(cfg)
    d["method"] = {"name": method, "params": asdict(METHODS.get(method).parse_params({}))}
    d["seed"] = seed
    return from_dict(RunConfig, d)


def unique_settings(settings: dict[str, RunConfig]) -> dict[str, str]:
    """``suite/setting`` -> the id of the first setting with the same config (generalize repeats
    two settings of full): each distinct config is probed and run once."""
    from ucmkd.api import run_key

    first: dict[str, str] = {}
    out = {}
    for sid, cfg in settings.items():
        out[sid] = first.setdefault(run_key(cfg), sid)
    return out


# --------------------------------------------------------------------------- (a) probes
def probe_rows(settings: dict[str, RunConfig], store: Path, log=print) -> dict[str, dict]:
    """Run (or reuse) ``ucmkd.diagnose`` on every distinct setting; ``suite/setting`` -> row."""
    from ucmkd.api import run_key
    from ucmkd.diagnose import PROBE_VERSION, diagnose

    path = store / "probes.jsonl"
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue              # a partial last line of a killed run
                done[r["key"]] = r
    canon = unique_settings(settings)
    out = {}
    for sid, cfg in settings.items():
        pcfg = with_method(cfg, METHOD, PROBE_SEED)
        key = f"{run_key(pcfg)}-v{PROBE_VERSION}"
        if key not in done:
            d = diagnose(pcfg, predict=False)
            row = {"key": key, "setting": canon[sid], **d.to_dict()}
            store.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")
            done[key] = row
            log(f"probe {sid}: {d.seconds:.2f} s, teacher {100 * d.teacher_val_acc:.1f} %, "
                f"ce probe {100 * d.ce_val_acc:.1f} %")
        out[sid] = done[key]
    return out


# --------------------------------------------------------------------------- (b) runs
def validation_runs(settings: dict[str, RunConfig], store: Path, seeds: list[int], workers: int,
                    log=print) -> list[dict]:
    """``ce`` and ``ucmkd`` on ``seeds`` of every distinct setting (grid engine, resumable)."""
    canon = unique_settings(settings)
    cells = []
    for sid, cfg in settings.items():
        if canon[sid] != sid:
            continue
        for m in (BASELINE, METHOD):
            for k in seeds:
                c = with_method(cfg, m, k)
                c.threads = 1
                cells.append(Cell(sid, m, k, c, store / "runs" / safe_name(sid.replace("/", "--")) / m / f"seed{k}"))
    rs = ResultStore(store / "results.jsonl")
    return run_cells(cells, rs, workers=workers, progress=False, log=log)


def gains(rows: list[dict], seeds: list[int] | None = None) -> dict[str, dict]:
    """setting -> {gain (pp, mean over seeds of ucmkd - ce paired by seed), n, ce, teacher,
    headroom (pp)} from result rows."""
    by: dict = {}
    for r in rows:
        if seeds is not None and r["seed"] not in seeds:
            continue
        by.setdefault(r["setting"], {}).setdefault(r["method"], {})[r["seed"]] = r
    out = {}
    for s, m in by.items():
        a, b = m.get(METHOD, {}), m.get(BASELINE, {})
        common = sorted(set(a) & set(b))
        if not common:
            continue
        ce = float(np.mean([100 * b[k]["test_acc"] for k in common]))
        teacher = float(np.mean([100 * b[k]["teacher_test_acc"] for k in common]))
        out[s] = {"gain": float(np.mean([100 * (a[k]["test_acc"] - b[k]["test_acc"]) for k in common])),
                  "n": len(common), "ce": ce, "teacher": teacher, "headroom": teacher - ce}
    return out


# --------------------------------------------------------------------------- (d) score
def reported_rows(path: str | Path) -> list[dict]:
    p = Path(path)
    p = p / "results.jsonl" if p.is_dir() else p
    if not p.is_file():
        return []
    return ResultStore(p).rows


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic) if len(a) > 2 else math.nan


def score(settings: dict[str, RunConfig], probes: dict[str, dict], reported: dict[str, list[dict]],
          seeds: list[int] | None, model, plot_path: Path | None, log=print, title: str = "") -> dict:
    from ucmkd.diagnose import features_of

    table = []
    for suite, rows in reported.items():
        g = gains(rows, seeds)
        for name, real in g.items():
            sid = name if "/" in name else f"{suite}/{name}"    # a validation store names suite/setting
            if sid not in probes:
                continue
            pred, lo, hi = model.predict(features_of(probes[sid]))
            a_h, b_h = model.info.get("headroom_rescaled", [1.0, 0.0])
            table.append({"setting": sid, "pred": pred, "lo": lo, "hi": hi, "realised": real["gain"],
                          "headroom": real["headroom"], "headroom_rescaled": max(0.0, a_h * real["headroom"] + b_h),
                          "n": real["n"]})
    if not table:
        log("no reported results to score against (run the suites, or give --score-seeds with a store)")
        return {}
    p = np.array([t["pred"] for t in table])
    r = np.array([t["realised"] for t in table])
    h = np.array([t["headroom"] for t in table])
    hs = np.array([t["headroom_rescaled"] for t in table])
    res = {"n": len(table), "spearman": spearman(p, r), "mae": float(np.abs(p - r).mean()),
           "spearman_headroom": spearman(h, r), "mae_headroom": float(np.abs(h - r).mean()),
           "mae_headroom_rescaled": float(np.abs(hs - r).mean()),
           "coverage": float(np.mean([t["lo"] <= t["realised"] <= t["hi"] for t in table]))}
    lines = ["| setting | predicted gain pp [interval] | realised gain pp | headroom pp | seeds |",
             "|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['setting']} | {t['pred']:+.1f} [{t['lo']:+.1f}, {t['hi']:+.1f}] | {t['realised']:+.1f} | "
                     f"{t['headroom']:+.1f} | {t['n']} |")
    lines += ["", "| predictor | Spearman (predicted, realised) | mean absolute error pp |", "|---|---|---|",
              f"| diagnose | {res['spearman']:.2f} | {res['mae']:.2f} |",
              f"| headroom (teacher - ce) | {res['spearman_headroom']:.2f} | {res['mae_headroom']:.2f} |",
              f"| headroom rescaled on the validation seeds (a h + b, at least 0) | {res['spearman_headroom']:.2f} | "
              f"{res['mae_headroom_rescaled']:.2f} |",
              "", f"{res['n']} settings; realised gain inside the predicted interval in "
              f"{100 * res['coverage']:.0f} % of them."]
    res["table"] = "\n".join(lines)
    log(res["table"])
    if plot_path is not None:
        scatter(table, plot_path, title)
    return res


def scatter(table: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    r = np.array([t["realised"] for t in table])
    colors = {"full": "tab:blue", "stress": "tab:red", "generalize": "tab:green"}
    for ax, key, label in ((axes[0], "pred", "diagnose: predicted gain (pp)"),
                           (axes[1], "headroom", "headroom: teacher - ce (pp)")):
        x = np.array([t[key] for t in table])
        for suite, c in colors.items():
            sel = [i for i, t in enumerate(table) if t["setting"].startswith(suite + "/")]
            if not sel:
                continue
            if key == "pred":
                lo = np.array([table[i]["lo"] for i in sel])
                hi = np.array([table[i]["hi"] for i in sel])
                ax.errorbar(x[sel], r[sel], xerr=[x[sel] - lo, hi - x[sel]], fmt="o", color=c, ms=4, alpha=0.8,
                            elinewidth=0.8, label=suite)
            else:
                ax.plot(x[sel], r[sel], "o", color=c, ms=4, alpha=0.8, label=suite)
        lim = [min(x.min(), r.min(), 0) - 1, max(x.max(), r.max()) + 1]
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set_xlabel(label)
        ax.set_ylabel("realised gain of ucmkd over ce (pp)")
        rho = spearman(x, r)
        ax.set_title(f"Spearman {rho:.2f}, MAE {np.abs(x - r).mean():.1f} pp", fontsize=9)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="outputs/diagnose-validation", help="probes, validation runs and their results store")
    ap.add_argument("--fit-seeds", default="100,101,102", help="validation seeds whose realised gains fit the model")
    ap.add_argument("--score-seeds", default=None, help="only these seeds of the reported results (default: all)")
    ap.add_argument("--full", default="outputs/bench-full", help="the full suite's results.jsonl (or its directory)")
    ap.add_argument("--stress", default="outputs/bench-stress")
    ap.add_argument("--generalize", default="outputs/bench-generalize")
    ap.add_argument("--coefficients", default=None,
                    help="where the fitted model is written (default: the file the package ships)")
    ap.add_argument("--plot", default="docs/diagnose-validation.png")
    ap.add_argument("--only", default=None, help="comma-separated globs of suite/setting")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--steps", default="probes,runs,fit,score", help="which of probes,runs,fit,score to do")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    steps = set(a.steps.split(","))
    store = Path(a.store)
    fit_seeds = [int(s) for s in a.fit_seeds.split(",")]
    score_seeds = [int(s) for s in a.score_seeds.split(",")] if a.score_seeds else None
    settings = suite_settings(a.only)
    t0 = time.time()
    probes = probe_rows(settings, store) if steps & {"probes", "fit", "score"} else {}
    if "runs" in steps:
        validation_runs(settings, store, fit_seeds, a.workers)
    if steps & {"fit", "score"}:
        from ucmkd.diagnose import COEFFICIENTS_FILE, GainModel

        coefficients = a.coefficients or COEFFICIENTS_FILE
    if "fit" in steps:
        rows = ResultStore(store / "results.jsonl").rows
        g = gains(rows, fit_seeds)
        canon = unique_settings(settings)
        fit_ids = [sid for sid in settings if sid == canon[sid] and sid in g]
        # the trivial predictor, rescaled on the same validation runs: gain ~ a * headroom + b
        h = np.array([g[sid]["headroom"] for sid in fit_ids])
        y = np.array([g[sid]["gain"] for sid in fit_ids])
        a_h, b_h = np.polyfit(h, y, 1)
        model = GainModel.fit([probes[sid] for sid in fit_ids], list(y),
                              info={"fit_seeds": fit_seeds, "probe_seed": PROBE_SEED, "settings": fit_ids,
                                    "headroom_rescaled": [float(a_h), float(b_h)]})
        model.save(coefficients)
        print(f"fitted on {len(fit_ids)} settings x seeds {fit_seeds}: {model.describe()}\nwritten to {coefficients}")
    if "score" in steps:
        model = GainModel.load(coefficients)
        reported = {name: reported_rows(getattr(a, name)) for name in SUITES}
        fitted = set(model.info.get("fit_seeds", []))
        scored = {r["seed"] for rows in reported.values() for r in rows
                  if score_seeds is None or r["seed"] in score_seeds}
        if scored & fitted:
            print(f"error: the model was fitted on seeds {sorted(fitted)}; the scored results include seeds "
                  f"{sorted(scored & fitted)} (narrow them with --score-seeds)", file=sys.stderr)
            return 2
        title = (f"gain model fitted on seeds {model.info.get('fit_seeds')}, scored on "
                 f"{'seeds ' + str(score_seeds) if score_seeds else 'the reported seeds'}")
        res = score(settings, probes, reported, score_seeds, model, Path(a.plot) if a.plot else None, title=title)
        if res:
            write_text(store / "score.md", res["table"] + "\n")
    print(f"done in {time.time() - t0:.0f} s")
    if "fit" in steps and "score" not in steps:
        print("(score with --steps score once the suites' results exist)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
