"""Validation-only summary of a ``ucmkd bench`` results file (the test split is never printed).

    python benchmarks/validation_summary.py outputs/defaults-validation/results.jsonl

Per setting and method: mean best-validation accuracy over seeds, the delta vs ``ce`` paired by
seed (mean [min, max] over seeds) and, for methods with candidates (``ucmkd``), the candidates'
validation accuracies and how often the fallback was chosen. Then, per method, the worst regret
against the best of the plain baselines (``kd``, ``dkd``) over the settings: the criterion the
final defaults were chosen by (docs/method.md).
"""
from __future__ import annotations

import json
import statistics as st
import sys
from collections import defaultdict

BASELINES = ("kd", "dkd")


def main(path: str) -> None:
    by: dict = defaultdict(dict)
    for line in open(path):
        if line.strip():
            r = json.loads(line)
            by[(r["setting"], r["method"])][r["seed"]] = r
    deltas: dict = defaultdict(dict)
    for s in sorted({k[0] for k in by}):
        print(f"## {s}")
        base = by.get((s, "ce"), {})
        for (ss, m), d in sorted(by.items()):
            if ss != s:
                continue
            seeds = sorted(set(d) & set(base))
            dl = [100 * (d[k]["val_acc"] - base[k]["val_acc"]) for k in seeds]
            va = st.mean(100 * d[k]["val_acc"] for k in d)
            extra = ""
            first = d[sorted(d)[0]]
            if len(first.get("candidates") or {}) > 1:
                cs = [d[k]["candidates"] for k in sorted(d)]
                extra = (f" | student {st.mean(100 * c['student']['val_acc'] for c in cs):.1f}"
                         f" fallback {st.mean(100 * c['fallback']['val_acc'] for c in cs):.1f}"
                         f" | fallback chosen {sum(d[k]['selected'] == 'fallback' for k in d)}/{len(d)}")
            if dl:
                deltas[m][s] = st.mean(dl)
                print(f"{m:16s} val {va:5.1f} | delta {st.mean(dl):+5.1f} [{min(dl):+.1f}, {max(dl):+.1f}] "
                      f"n={len(dl)}{extra}")
    print("\n| method | mean delta vs ce (val pp) | worst regret vs the best of kd/dkd (pp) |\n|---|---|---|")
    for m, per in sorted(deltas.items()):
        regrets = [per[s] - max(deltas[b][s] for b in BASELINES if s in deltas.get(b, {}))
                   for s in per if any(s in deltas.get(b, {}) for b in BASELINES)]
        print(f"| {m} | {st.mean(per.values()):+.2f} | {min(regrets):+.2f} |" if regrets else f"| {m} | {st.mean(per.values()):+.2f} | - |")


if __name__ == "__main__":
    main(sys.argv[1])
