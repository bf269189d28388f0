"""The teacher's share of one or more distillers in a finished ``ucmkd bench`` results file: per
setting, each distiller's delta vs ``ce``, the best teacher-free method (highest mean delta vs
``ce`` among the methods the registry calls teacher-free, ``ce`` itself excluded) and each
distiller minus that method, paired by seed with its 95 % Student-t CI; then the means over
settings and the settings where the share's CI is above 0 / the distiller is within 0.5 pp of the
best teacher-free method. The statistics are :mod:`ucmkd.report`'s (the same as every table).

    python benchmarks/teacher_share.py outputs/bench-full/results.jsonl --distillers ucmkd,dkd [--seeds 5,6,7,8,9]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ucmkd.methods import METHODS  # noqa: E402
from ucmkd.report import _fmt_delta, best_of, paired_vs, summarise  # noqa: E402


def teacher_free_labels(results: list[dict], baseline: str) -> list[str]:
    """Labels whose runs used a teacher-free method (read from each row's resolved config)."""
    out = set()
    for r in results:
        m = r["config"]["method"]
        cls = METHODS.get(m["name"])
        if r["method"] != baseline and cls.teacher_free(cls.parse_params(m.get("params") or {})):
            out.add(r["method"])
    return sorted(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--distillers", default="ucmkd")
    ap.add_argument("--baseline", default="ce")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds to keep (default: all)")
    a = ap.parse_args(argv)
    results = [json.loads(x) for x in open(a.results) if x.strip()]
    if a.seeds:
        keep = {int(s) for s in a.seeds.split(",")}
        results = [r for r in results if r["seed"] in keep]
    dist = a.distillers.split(",")
    free = teacher_free_labels(results, a.baseline)
    rows = {(r["setting"], r["method"]): r for r in summarise(results, baseline=a.baseline, by=("setting",))}
    settings = list(dict.fromkeys(r["setting"] for r in results))
    seeds = sorted({r["seed"] for r in results})
    print(f"Teacher-free field: {', '.join(free)}; seeds {seeds}; deltas in pp, paired by seed, [95 % CI], "
          f"`*`: the CI excludes 0.\n")
    print(f"| setting | {a.baseline} % | " + " | ".join(f"{d} vs {a.baseline}" for d in dist)
          + " | best teacher-free vs " + a.baseline + " | " + " | ".join(f"{d} - best teacher-free" for d in dist) + " |")
    print("|---|---|" + "---|" * (2 * len(dist) + 1))
    shares = {d: [] for d in dist}
    for s in settings:
        b = rows.get((s, a.baseline))
        tf = best_of(rows, s, free)
        if b is None or tf is None:
            continue
        share = {d: paired_vs(results, s, d, tf["method"]) for d in dist}
        for d in dist:
            if share[d] is not None:
                shares[d].append(share[d])
        print(f"| {s} | {b['acc_mean']:.1f} | " + " | ".join(_fmt_delta(rows.get((s, d))) for d in dist)
              + f" | {tf['method']} {_fmt_delta(tf)} | " + " | ".join(_fmt_delta(share[d]) for d in dist) + " |")
    print()
    for d in dist:
        sh = shares[d]
        if not sh:
            continue
        above = sum(r["ci_low"] > 0 for r in sh)
        within = sum(r["delta_mean"] >= -0.5 for r in sh)
        print(f"- `{d}`: teacher's share mean {np.mean([r['delta_mean'] for r in sh]):+.2f} pp over {len(sh)} settings; "
              f"CI above 0 in {above}; at least the best teacher-free method - 0.5 pp in {within} of {len(sh)}; "
              f"worst {min(r['delta_mean'] for r in sh):+.1f}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
