"""Summaries of a results grid: mean +- std over seeds, paired-by-seed deltas, tables, plots."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

DIAG_FIELDS = ["diag_fa", "diag_fa_classwise", "diag_teacher_head_acc", "diag_la_tv"]
CSV_FIELDS = ["teacher", "student", "method", "seed", "test_acc", "val_acc", "best_epoch", "last_test_acc",
              "teacher_test_acc", "seconds", *DIAG_FIELDS, "key", "run_dir"]


def direction_label(teacher: str, student: str) -> str:
    return f"{teacher} -> {student}"


def paired_stats(deltas: np.ndarray) -> dict:
    """Mean, std, 95 % t-interval and two-sided Wilcoxon signed-rank p of paired deltas [n]."""
    from scipy import stats

    n = len(deltas)
    out = {"delta_mean": float(deltas.mean()) if n else math.nan,
           "delta_std": float(deltas.std(ddof=1)) if n > 1 else 0.0,
           "ci_low": math.nan, "ci_high": math.nan, "wilcoxon_p": math.nan}
    if n > 1:
        half = stats.t.ppf(0.975, n - 1) * out["delta_std"] / math.sqrt(n)
        out["ci_low"], out["ci_high"] = out["delta_mean"] - half, out["delta_mean"] + half
        if np.allclose(deltas, 0):
            out["wilcoxon_p"] = 1.0
        else:
            out["wilcoxon_p"] = float(stats.wilcoxon(deltas, alternative="two-sided").pvalue)
    return out


def summarise(results: list[dict], baseline: str = "ce", by: tuple = ("teacher", "student")) -> list[dict]:
    """One row per (``by`` fields..., method): n, mean/std test acc, the delta vs ``baseline``
    paired by seed (mean, std, 95 % t-interval, Wilcoxon p over the seeds both ran), teacher
    acc and mean seconds per run. Accuracies and deltas in %."""
    groups: dict = {}
    for r in results:
        groups.setdefault(tuple(r[k] for k in by) + (r["method"],), {})[r["seed"]] = r
    rows = []
    for key, by_seed in groups.items():
        acc = np.array([100 * by_seed[k]["test_acc"] for k in sorted(by_seed)])
        base = groups.get(key[:-1] + (baseline,), {})
        common = sorted(set(by_seed) & set(base))
        deltas = np.array([100 * (by_seed[k]["test_acc"] - base[k]["test_acc"]) for k in common])
        rows.append({
            **dict(zip(by, key[:-1])), "method": key[-1], "n": len(acc),
            "acc_mean": float(acc.mean()), "acc_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            **paired_stats(deltas),
            "teacher_acc": 100 * float(np.nanmean([r.get("teacher_test_acc", math.nan) for r in by_seed.values()])),
            "seconds": float(np.mean([r["seconds"] for r in by_seed.values()])),
        })
    return rows


def markdown_table(rows: list[dict], method_order: list[str] | None = None, baseline: str = "ce") -> str:
    order = {m: i for i, m in enumerate(method_order or [])}
    rows = sorted(rows, key=lambda r: (r["teacher"], r["student"], order.get(r["method"], 99), r["method"]))
    out = ["| teacher -> student | method | student test acc % (mean +- std) | "
           f"delta vs {baseline} (pp, paired by seed) | teacher test acc % | s/run | seeds |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        ta = "-" if math.isnan(r["teacher_acc"]) else f"{r['teacher_acc']:.1f}"
        if r["method"] == baseline or math.isnan(r["delta_mean"]):
            delta = "-"
        else:
            delta = f"{r['delta_mean']:+.1f} +- {r['delta_std']:.1f}"
        out.append(f"| {direction_label(r['teacher'], r['student'])} | {r['method']} | "
                   f"{r['acc_mean']:.1f} +- {r['acc_std']:.1f} | {delta} | {ta} | {r['seconds']:.1f} | {r['n']} |")
    return "\n".join(out)


def diagnostics_table(results: list[dict], method_order: list[str] | None = None) -> str:
    """Mean over seeds of the alignment diagnostics (:mod:`ucmkd.diagnostics`) per cell."""
    order = {m: i for i, m in enumerate(method_order or [])}
    groups: dict = {}
    for r in results:
        if any(k in r for k in DIAG_FIELDS):
            groups.setdefault((r["teacher"], r["student"], r["method"]), []).append(r)
    if not groups:
        return ""
    out = ["| teacher -> student | method | FA (OT cost) | FA class-wise | teacher-head acc on student features % "
           "| LA (TV teacher vs student head) |", "|---|---|---|---|---|---|"]
    for (t, s, m), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], order.get(kv[0][2], 99))):
        v = {k: float(np.nanmean([r.get(k, math.nan) for r in rs])) for k in DIAG_FIELDS}
        out.append(f"| {direction_label(t, s)} | {m} | {v['diag_fa']:.3f} | {v['diag_fa_classwise']:.3f} | "
                   f"{100 * v['diag_teacher_head_acc']:.1f} | {v['diag_la_tv']:.3f} |")
    return "\n".join(out)


def write_csv(results: list[dict], path: str | Path, extra: list[str] | None = None) -> None:
    """One row per run: ``extra`` columns (e.g. ``setting``), then :data:`CSV_FIELDS`."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=(extra or []) + CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in results:
            w.writerow(r)


def plot(rows: list[dict], path: str | Path, method_order: list[str] | None = None, title: str = "",
         by: tuple = ("teacher", "student")) -> None:
    """Grouped bars (one group per ``by`` value, e.g. direction): mean test accuracy +- std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dirs = sorted({tuple(r[k] for k in by) for r in rows})
    methods = method_order or sorted({r["method"] for r in rows})
    methods = [m for m in methods if any(r["method"] == m for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(dirs) * len(methods) / 3), 4))
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        means, stds = [], []
        for d in dirs:
            r = next((r for r in rows if tuple(r[k] for k in by) == d and r["method"] == m), None)
            means.append(r["acc_mean"] if r else np.nan)
            stds.append(r["acc_std"] if r else 0)
        ax.bar(np.arange(len(dirs)) + (j - (len(methods) - 1) / 2) * width, means, width, yerr=stds,
               capsize=3, label=m)
    for i, d in enumerate(dirs):
        t = next(r["teacher_acc"] for r in rows if tuple(r[k] for k in by) == d)
        if not math.isnan(t):
            ax.hlines(t, i - 0.45, i + 0.45, colors="k", linestyles="dashed", linewidth=1)
    ax.set_xticks(np.arange(len(dirs)))
    ax.set_xticklabels(["\n-> ".join(d) for d in dirs], fontsize=8)
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(title + " (dashed: teacher accuracy)", fontsize=9)
    ax.legend(fontsize=7, ncol=min(len(methods), 6), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- headline report
def with_ungated(results: list[dict], method: str, label: str) -> list[dict]:
    """``results`` plus, for every ``method`` run that recorded its candidates, a row ``label``
    with its "student" candidate's numbers: the same run without the candidate selection (the
    other candidates never touch the distilled student)."""
    extra = []
    for r in results:
        cand = (r.get("candidates") or {}).get("student")
        if r["method"] == method and cand is not None:
            extra.append({**r, "method": label, "test_acc": cand["test_acc"], "val_acc": cand["val_acc"]})
    return results + extra


def fmt_ci(r: dict) -> str:
    """``mean [low, high]`` of a summary row's paired delta (pp); ``mean [CI n/a]`` when the
    interval is undefined (one paired seed)."""
    if math.isnan(r["ci_low"]):
        return f"{r['delta_mean']:+.1f} [CI n/a]"
    return f"{r['delta_mean']:+.1f} [{r['ci_low']:+.1f}, {r['ci_high']:+.1f}]"


def _fmt_delta(r: dict | None, spread: bool = False) -> str:
    """``mean [CI]`` of a summary row's paired delta, `` *`` when the CI excludes 0; ``spread``
    adds the seed-to-seed standard deviation of the per-seed deltas (``sd``)."""
    if r is None or math.isnan(r["delta_mean"]):
        return "-"
    mark = " *" if ci_excludes_zero(r) else ""
    sd = f" sd {r['delta_std']:.1f}" if spread and r["n"] > 1 else ""
    return f"{fmt_ci(r)}{mark}{sd}"


def _named(r: dict | None, spread: bool = False) -> str:
    """``method mean [CI]`` of a summary row, ``-`` when None."""
    return "-" if r is None else f"{r['method']} {_fmt_delta(r, spread)}"


def best_of(rows: dict, setting: str, labels) -> dict | None:
    """The summary row (``rows[(setting, label)]``) with the largest mean delta vs the baseline
    among ``labels`` that ran in ``setting`` with a defined delta; None if none did."""
    cands = [rows[(setting, m)] for m in labels
             if (setting, m) in rows and not math.isnan(rows[(setting, m)]["delta_mean"])]
    return max(cands, key=lambda r: r["delta_mean"]) if cands else None


def paired_vs(results: list[dict], setting: str, method: str, reference: str) -> dict | None:
    """Summary row of ``method`` minus ``reference`` in ``setting``, paired by seed (the same
    statistics as the deltas vs the baseline: :func:`summarise` with ``reference`` as baseline)."""
    sub = [r for r in results if r["setting"] == setting and r["method"] in (method, reference)]
    row = next((r for r in summarise(sub, baseline=reference, by=("setting",)) if r["method"] == method), None)
    return None if row is None or math.isnan(row["delta_mean"]) else row


def teacher_field(results: list[dict], rows: dict, settings: list[str], distillers, teacher_free,
                  method: str | None = None) -> dict:
    """Per setting: the best distiller (``distillers``, by mean delta vs the baseline), the best
    teacher-free method (``teacher_free``, likewise; a choice over finished runs, for reporting)
    and the teacher's share: ``method`` minus that teacher-free method, paired by seed.
    ``rows``: summary rows vs the baseline keyed by (setting, method).
    Returns {setting: {"distiller": row, "free": row, "share": row}} (None where absent)."""
    out = {}
    for s in settings:
        free = best_of(rows, s, teacher_free)
        share = paired_vs(results, s, method, free["method"]) if free and method and (s, method) in rows else None
        out[s] = {"distiller": best_of(rows, s, distillers), "free": free, "share": share}
    return out


def share_summary(field: dict, method: str) -> str:
    """One sentence: the mean teacher's share over the settings that have one, and in how many
    of them its 95 % CI is above 0."""
    shares = [f["share"] for f in field.values() if f["share"] is not None]
    if not shares:
        return f"Teacher's share of `{method}`: not measured (no setting ran a teacher-free method besides the baseline)."
    above = sum(not math.isnan(r["ci_low"]) and r["ci_low"] > 0 for r in shares)
    return (f"Teacher's share (`{method}` minus the setting's best teacher-free method, paired by seed): "
            f"mean {np.mean([r['delta_mean'] for r in shares]):+.2f} pp over {len(shares)} settings; "
            f"95 % CI above 0 in {above} of {len(shares)}.")


def ci_excludes_zero(r: dict) -> bool:
    """Whether a summary row's 95 % CI of the paired delta excludes zero (False when undefined)."""
    return not math.isnan(r["ci_low"]) and (r["ci_low"] > 0 or r["ci_high"] < 0)


def headline_report(results: list[dict], settings: list[str], baselines: list[str], baseline: str,
                    method: str, compare: tuple = (), control: str | None = None,
                    ablation_prefix: str | None = None, ungated: str | None = None,
                    distillers=None, teacher_free=None, aug_baseline: str | None = None) -> str:
    """Markdown: (1) headline, per setting: ``baseline`` accuracy, then the paired delta
    [95 % t-CI] of ``method``, of the ``compare`` methods, of the teacher-free ``control`` and of
    the best of ``baselines`` (by mean delta), and how often a candidate other than the student
    was chosen; (2) the mean delta over settings of every method (the suite's mean delta); (3)
    the ablation table: for each variant ``<ablation_prefix><ingredient>`` (and ``ungated``, the
    runs' "student" candidates), its delta vs ``method`` paired by seed (negative = the
    ingredient helps). With ``distillers`` and ``teacher_free`` (method labels; the caller
    decides which need a teacher), the headline also shows per setting the best distiller, the
    best teacher-free method (both by mean delta vs ``baseline``) and the teacher's share
    (``method`` minus that teacher-free method, paired by seed), summarised over settings. With
    ``aug_baseline`` (the augmented supervised baseline, e.g. ``ce-aug``), a column gives
    ``method`` minus it, paired by seed, where it ran."""
    if ungated:
        results = with_ungated(results, method, ungated)
    rows = {(r["setting"], r["method"]): r for r in summarise(results, baseline=baseline, by=("setting",))}
    sel, chosen_names = {}, set()
    for r in results:
        if r["method"] == method:
            picked = r.get("selected", "student")
            sel.setdefault(r["setting"], []).append(picked != "student")
            chosen_names |= ({picked} | set(r.get("candidates") or {})) - {"student"}
    chosen = " / ".join(sorted(chosen_names)) or "other candidate"
    aug = aug_baseline if aug_baseline and any(r["method"] == aug_baseline for r in results) else None
    cols = ([f"{method} - {aug}"] if aug else []) + list(compare) + ([f"{control} (no teacher)"] if control else [])
    field = (teacher_field(results, rows, settings, distillers, teacher_free, method)
             if distillers is not None and teacher_free is not None else None)
    has_free = field is not None and any(f["free"] is not None for f in field.values())
    tail = []
    if field is not None:
        tail = ["best distiller"] + (["best teacher-free", f"teacher's share ({method} - best teacher-free)"]
                                     if has_free else [])
    out = [f"| setting | teacher % | {baseline} % | **{method}** | " + " | ".join(cols)
           + " | best baseline | " + "".join(f"{c} | " for c in tail) + f"{chosen} chosen |",
           "|---|---|---|---|" + "---|" * len(cols) + "---|" * (1 + len(tail)) + "---|"]
    for s in settings:
        b = rows.get((s, baseline))
        if b is None or (s, method) not in rows:
            continue
        cands = [rows[(s, m)] for m in baselines if (s, m) in rows]
        best = max(cands, key=lambda r: r["delta_mean"]) if cands else None
        best_txt = f"{best['method']} {_fmt_delta(best, spread=True)}" if best else "-"
        fb = sel.get(s, [])
        # the teacher the method distilled from (a teacher-free baseline's row may come from an
        # earlier teacher of the same data: its result does not depend on it)
        out.append(f"| {s} | {rows[(s, method)]['teacher_acc']:.1f} | {b['acc_mean']:.1f} +- {b['acc_std']:.1f} | "
                   f"**{_fmt_delta(rows[(s, method)], spread=True)}** | "
                   + " | ".join(([_fmt_delta(paired_vs(results, s, method, aug))] if aug else [])
                                + [_fmt_delta(rows.get((s, m))) for m in list(compare) + ([control] if control else [])])
                   + f" | {best_txt} | "
                   + "".join(f"{c} | " for c in _field_cells(field, s, has_free)) + f"{sum(fb)}/{len(fb)} |")
    out += ["", "Deltas: pp vs " + baseline + ", mean over seeds paired by seed, [95 % Student-t CI]; "
            "`*`: the CI excludes 0; sd: the standard deviation of the per-seed deltas (seed-to-seed spread)."]
    if field is not None:
        out.append(f"Best distiller / best teacher-free: the method with the highest mean delta vs {baseline} in "
                   "the setting among those that use a teacher (other than "
                   f"`{method}` and its ablations) / that use none (other than {baseline}); the teacher's share "
                   f"is `{method}` minus that teacher-free method, paired by seed, [95 % CI].")
        if not has_free:
            out.append(f"No teacher-free method other than {baseline} ran: the teacher's share is not measured.")
    out.append("")
    # suite mean delta of every method that ran in every listed setting
    def is_ablation(m: str) -> bool:
        return m == ungated or bool(ablation_prefix) and m.startswith(ablation_prefix)

    methods = sorted({m for (_, m) in rows if m != baseline and not is_ablation(m)})
    means = []
    n_all = len([s for s in settings if (s, baseline) in rows])
    for m in methods:
        ds = [rows[(s, m)]["delta_mean"] for s in settings if (s, m) in rows]
        if ds:
            means.append((float(np.mean(ds)), m, min(ds), len(ds),
                          sum(ci_excludes_zero(rows[(s, m)]) and rows[(s, m)]["delta_mean"] > 0
                              for s in settings if (s, m) in rows)))
    out += ["| method | mean delta vs " + baseline + " over settings (pp) | worst setting (pp) | "
            "settings with CI > 0 |", "|---|---|---|---|"]
    for mean, m, worst, n, wins in sorted(means, reverse=True):
        only = "" if n == n_all else f" ({n} of {n_all} settings)"
        out.append(f"| {m} | {mean:+.2f}{only} | {worst:+.1f} | {wins} |")
    if field is not None and has_free:
        out += ["", share_summary(field, method)]
    # ablations: paired by seed against the full method
    abl = sorted({m for (_, m) in rows if is_ablation(m)})
    if abl:
        full = summarise([r for r in results if r["method"] in [method] + abl], baseline=method, by=("setting",))
        ab = {(r["setting"], r["method"]): r for r in full}
        out += ["", f"Ablation: delta vs the full `{method}` (pp, paired by seed; negative = removing it hurts)", "",
                f"| setting | {method} vs {baseline} | " + " | ".join(abl) + " |", "|---|---|" + "---|" * len(abl)]
        for s in settings:
            if (s, method) not in rows or not any((s, m) in ab for m in abl):
                continue
            out.append(f"| {s} | {_fmt_delta(rows[(s, method)])} | "
                       + " | ".join(_fmt_delta(ab.get((s, m))) for m in abl) + " |")
        mean_row = []
        for m in abl:
            ds = [ab[(s, m)]["delta_mean"] for s in settings if (s, m) in ab]
            mean_row.append(f"{np.mean(ds):+.2f} ({len(ds)} settings)" if ds else "-")
        out.append("| mean | | " + " | ".join(mean_row) + " |")
    return "\n".join(out)


def _field_cells(field: dict | None, setting: str, has_free: bool) -> list[str]:
    """The headline's teacher-field cells of ``setting``: best distiller, then (with ``has_free``)
    best teacher-free and the teacher's share."""
    if field is None:
        return []
    f = field[setting]
    return [_named(f["distiller"])] + ([_named(f["free"]), _fmt_delta(f["share"])] if has_free else [])
