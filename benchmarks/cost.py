"""Cost of distillation relative to plain training, measured through the public CLI.

Every run is ``python -m ucmkd train`` in a fresh process (digits: image teacher -> signal
student, library defaults unless a section says otherwise, 1 thread); the time compared is the
fit time the run records in ``result.json`` (``seconds``: training, validation, checkpoints,
diagnostics), so process start-up and data loading are left out. Methods are interleaved
within each repeat (ce, kd, ..., then again), so a machine that gets slower or faster during
the benchmark affects every method alike; each table reports the median over repeats of the
per-repeat ratio to ``ce`` and its range. Ratios, not absolute times, carry the claims.

Sections (``--sections``, default all):
- ``methods``: ratio to ce per method at the defaults (batch 64), ``--epochs`` epochs;
- ``batch``: the same at batch 64 and 512 (steps per epoch fixed, so per-step cost);
- ``pool``: ucmkd's extra time over ce with a 2k vs a 32k mnist1d pool (``data.mnist1d_samples``);
- ``ot``: the OT loss table of ``benchmarks/ot_solvers.py`` (forward + backward, d = 64).

    python benchmarks/cost.py                      # everything, 3 repeats (about 15 min on 2 cores)
    python benchmarks/cost.py --sections methods --repeats 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["ce", "kd", "ucmkd-joint", "ucmkd-bilevel", "ucmkd"]
TARGETS = {"kd": 1.3, "ucmkd-joint": 1.5, "ucmkd-bilevel": 2.5, "ucmkd": 2.5}


def train_seconds(overrides: list[str], workdir: Path, env: dict) -> float:
    """Fit seconds of one ``ucmkd train`` run in a fresh process."""
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    cmd = [sys.executable, "-m", "ucmkd", "train", "--no-progress", "--run-dir", str(run_dir), "threads=1",
           *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return float(json.loads((run_dir / "result.json").read_text())["seconds"])


def interleaved(variants: dict[str, list[str]], repeats: int, workdir: Path, env: dict, log) -> dict:
    """{variant: [seconds per repeat]}, variants run in turn within each repeat."""
    out: dict = {v: [] for v in variants}
    for r in range(repeats):
        for name, ov in variants.items():
            out[name].append(train_seconds(ov, workdir, env))
            log(f"  repeat {r + 1}/{repeats} {name}: {out[name][-1]:.2f} s")
    return out


def ratio_summary(times: dict, base: str, name: str) -> tuple[float, float, float]:
    """(median, min, max) over repeats of times[name][r] / times[base][r]."""
    ratios = [a / b for a, b in zip(times[name], times[base])]
    return statistics.median(ratios), min(ratios), max(ratios)


def methods_table(times: dict, methods: list[str]) -> str:
    rows = ["| method | fit s (median) | ratio to ce (median [min, max]) | target |", "|---|---|---|---|"]
    for m in methods:
        med, lo, hi = ratio_summary(times, "ce", m)
        target = f"<= {TARGETS[m]}x" if m in TARGETS else "-"
        rows.append(f"| {m} | {statistics.median(times[m]):.2f} | {med:.2f}x [{lo:.2f}, {hi:.2f}] | {target} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--sections", default="methods,batch,pool,ot")
    ap.add_argument("--ot-sizes", default="64,256,1024,4096")
    ap.add_argument("--device", default="cpu", help="the runs' device (cuda: benchmarks/gpu_check.py)")
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    methods = args.methods.split(",")
    if "ce" not in methods:
        methods = ["ce"] + methods
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    base = ["data.teacher=digits/image", "data.student=digits/signal", f"optim.epochs={args.epochs}",
            f"device={args.device}"]
    out = [f"# ucmkd cost benchmark ({time.strftime('%Y-%m-%d')}, `python benchmarks/cost.py "
           f"{' '.join(argv if argv is not None else sys.argv[1:])}`)", "",
           f"digits image -> signal, {args.epochs} epochs, device {args.device}, 1 thread, fit seconds from result.json, "
           f"median of {args.repeats} interleaved repeats.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # train (or load) the teacher once, outside every timing
        subprocess.run([sys.executable, "-m", "ucmkd", "train-teacher", "--no-progress", *base], env=env,
                       check=True, capture_output=True)
        if "methods" in sections:
            log("methods (batch 64)")
            times = interleaved({m: base + [f"method.name={m}"] for m in methods}, args.repeats, work, env, log)
            out += ["## Ratio to ce per method (library defaults, batch 64)", "", methods_table(times, methods), ""]
        if "batch" in sections:
            log("batch 64 vs 512")
            variants = {f"{m}@{b}": base + [f"method.name={m}", f"optim.batch_size={b}"]
                        for b in (64, 512) for m in methods}
            times = interleaved(variants, args.repeats, work, env, log)
            rows = ["| method | ratio to ce, batch 64 | ratio to ce, batch 512 |", "|---|---|---|"]
            for m in methods[1:]:
                cells = []
                for b in (64, 512):
                    med, lo, hi = ratio_summary(times, f"ce@{b}", f"{m}@{b}")
                    cells.append(f"{med:.2f}x [{lo:.2f}, {hi:.2f}]")
                rows.append(f"| {m} | {cells[0]} | {cells[1]} |")
            out += ["## Batch 64 vs 512 (steps per epoch fixed: per-step cost)", "", "\n".join(rows), ""]
        if "pool" in sections:
            log("pool 2k vs 32k")
            for n in (2000, 32000):   # generate (and cache) the pools outside the timings
                subprocess.run([sys.executable, "-m", "ucmkd", "train", "--no-progress", *base,
                                f"data.mnist1d_samples={n}", "optim.epochs=1"], env=env, check=True,
                               capture_output=True)
            variants = {f"{m}@{n}": base + [f"method.name={m}", f"data.mnist1d_samples={n}"]
                        for n in (2000, 32000) for m in ("ce", "ucmkd")}
            times = interleaved(variants, args.repeats, work, env, log)
            extra = {n: [u - c for u, c in zip(times[f"ucmkd@{n}"], times[f"ce@{n}"])] for n in (2000, 32000)}
            growth = [b / a for a, b in zip(extra[2000], extra[32000])]
            rows = ["| student pool (mnist1d items) | ce fit s | ucmkd fit s | ucmkd extra over ce s |",
                    "|---|---|---|---|"]
            for n in (2000, 32000):
                rows.append(f"| {n} | {statistics.median(times[f'ce@{n}']):.2f} | "
                            f"{statistics.median(times[f'ucmkd@{n}']):.2f} | {statistics.median(extra[n]):.2f} |")
            out += ["## Student pool 2k vs 32k", "", "\n".join(rows), "",
                    f"Growth of ucmkd's extra time over ce from 2k to 32k: {statistics.median(growth):.2f}x "
                    f"[{min(growth):.2f}, {max(growth):.2f}] (target <= 1.2x).", ""]
        if "ot" in sections:
            log("OT table")
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from ot_solvers import ot_table  # noqa: E402

            out += ["## OT loss, forward + backward (d = 64, cosine, eps 0.1, 100 iterations)", "",
                    ot_table([int(s) for s in args.ot_sizes.split(",")], device=args.device), ""]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
