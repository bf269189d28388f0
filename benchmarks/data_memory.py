"""Memory and throughput of one training run on an in-memory vs a memory-mapped modality.

A vector modality of ``--mib`` MiB of float32 (``--dim`` features, 4 classes, columns at scales
1e-2..1e2) is written once as an uncompressed ``.npz``; each variant then trains the same run
(``kd``, a small in-memory teacher, ``--epochs`` x ``--steps`` steps at batch ``--batch``, 1
thread) in a fresh process:

- ``memory``: ``data.storage=memory`` (the modality read into one tensor);
- ``mmap``: ``data.storage=mmap`` (read lazily, batch by batch, from the memory-mapped file);
- ``mmap+1w``: the same with ``data.workers=1`` (a DataLoader process reads batches ahead).

Per run: peak RSS (``VmHWM``), peak anonymous memory (``RssAnon``, sampled every 5 ms: memory
that is the process's own, as opposed to mapped page-cache pages of the file), load seconds
(``prepare``, after an untimed warm-up run of each variant has cached the teacher and the
statistics: reading, or mapping, the modality), training steps/s (``fit`` seconds, validation
included) and batches/s of the sampler alone (one epoch of batches read, no training, after a
first epoch that starts the workers).
Variants are interleaved within each repeat; medians over repeats, and ratios to ``memory``.
The file is in the page cache (just written): this measures the cost of the lazy path itself,
not of a disk. Every variant's result must equal the ``memory`` one (same test/val accuracy).

    python benchmarks/data_memory.py                       # 1 GiB, 3 repeats (~3 min on 2 cores)
    python benchmarks/data_memory.py --mib 256 --repeats 1 # quick look
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"memory": ["data.storage=memory"], "mmap": ["data.storage=mmap"],
            "mmap+1w": ["data.storage=mmap", "data.workers=1"]}

CHILD = r"""
import json, sys, threading, time
import torch
torch.set_num_threads(1)
from ucmkd.api import prepare, run_context
from ucmkd.config import RunConfig, load_config

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

peak_anon, done = [0], [False]
def sample():
    while not done[0]:
        peak_anon[0] = max(peak_anon[0], status("RssAnon"))
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])   # its one-time imports (torch._dynamo) out of the timings
rss0 = status("VmRSS")
cfg = load_config(RunConfig, None, json.loads(sys.argv[1]))
t0 = time.perf_counter()
ctx = prepare(cfg)
t1 = time.perf_counter()
for b in ctx.sampler.epoch(98):          # starts the DataLoader workers (kept for every epoch)
    pass
ts = time.perf_counter()
n = 0
for b in ctx.sampler.epoch(99):
    n += 1
t2 = time.perf_counter()
res = run_context(ctx)
t3 = time.perf_counter()
done[0] = True
steps = cfg.optim.epochs * len(ctx.sampler)
print(json.dumps({"load_s": t1 - t0, "batches_per_s": n / (t2 - ts), "steps_per_s": steps / (t3 - t2),
                  "peak_rss": status("VmHWM"), "peak_anon": peak_anon[0], "rss0": rss0,
                  "test_acc": res["test_acc"], "val_acc": res["val_acc"], "lazy": ctx.student_data.lazy}))
"""


def write_modality(path: Path, n: int, d: int) -> None:
    """``x`` [n, d] float32 (4 classes, column scales 1e-2..1e2) and ``y`` [n] as an uncompressed
    ``.npz``, written in blocks of 4096 rows (never whole in memory). Also the modality of
    ``tests/unit/test_lazy_data.py``'s memory-limit test."""
    from ucmkd.cache import write_npz_rows

    rng = np.random.default_rng(0)
    y = np.arange(n) % 4
    means = rng.normal(size=(4, d)).astype(np.float32)
    noise = rng.normal(size=(4096, d)).astype(np.float32)
    scale = np.logspace(-2, 2, d).astype(np.float32)
    blocks = ((means[y[a:a + 4096]] + np.roll(noise, a // 4096, axis=0)[:len(y[a:a + 4096])]) * scale
              for a in range(0, n, 4096))
    write_npz_rows(path, "x", (n, d), np.float32, blocks)
    with zipfile.ZipFile(path, "a") as zf, zf.open("y.npy", "w") as f:
        np.lib.format.write_array(f, y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024, help="modality size, MiB of float32")
    ap.add_argument("--dim", type=int, default=2048, help="features per item")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50, help="steps per epoch")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=None, help="write the raw figures as JSON here")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    n = args.mib * 2 ** 20 // (4 * args.dim)
    work = Path(tempfile.mkdtemp(prefix="ucmkd-data-bench-"))
    big, small = work / "big.npz", work / "teacher.npz"
    write_modality(big, n, args.dim)
    rng = np.random.default_rng(1)
    ty = np.arange(2000) % 4
    np.savez(small, x=(rng.normal(size=(4, 8))[ty] * 2 + rng.normal(size=(2000, 8))).astype(np.float32), y=ty)
    base = [f"data.student=npz:{big}", f"data.teacher=npz:{small}", f"data.cache_dir={work / 'cache'}",
            "data.test_frac=0.05", "data.val_frac=0.05", "method.name=kd", f"optim.epochs={args.epochs}",
            f"optim.steps_per_epoch={args.steps}", f"optim.batch_size={args.batch}", "optim.warmup_epochs=0",
            "pairing.label_budget=null", "teacher.epochs=2", "threads=1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    names = args.variants.split(",")
    runs: dict = {k: [] for k in names}

    def child(name: str) -> dict:
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(base + VARIANTS[name])],
                             capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise SystemExit(f"{name}: {out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    for name in names:       # untimed: trains and caches the teacher, computes the mmap statistics once
        first = child(name)
        print(f"warm-up {name}: load {first['load_s']:.1f} s", file=sys.stderr, flush=True)
    for r in range(args.repeats):
        for name in names:
            runs[name].append(child(name))
            print(f"repeat {r} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    ref = runs[names[0]]
    for name in names:
        for a, b in zip(ref, runs[name]):
            assert (a["test_acc"], a["val_acc"]) == (b["test_acc"], b["val_acc"]), f"{name} differs from {names[0]}"

    def med(name, key):
        return statistics.median(x[key] for x in runs[name])

    mib = 2 ** 20
    print(f"modality: [{n}, {args.dim}] float32 = {n * args.dim * 4 / mib:.0f} MiB; batch {args.batch}, "
          f"{args.epochs} x {args.steps} steps, kd, 1 thread; median of {args.repeats} (ratio to {names[0]})\n")
    print("| storage | peak RSS (MiB) | peak anonymous (MiB) | load (s) | training steps/s | sampler batches/s |")
    print("|---|---|---|---|---|---|")
    for name in names:
        row = [f"{med(name, 'peak_rss') / mib:.0f}", f"{med(name, 'peak_anon') / mib:.0f}", f"{med(name, 'load_s'):.1f}"]
        for key in ("steps_per_s", "batches_per_s"):
            ratios = [x[key] / y[key] for x, y in zip(runs[name], ref)]
            row.append(f"{med(name, key):.1f} ({statistics.median(ratios):.2f}x)")
        print(f"| `{name}` | " + " | ".join(row) + " |")
    print(f"\nprocess baseline after imports: {med(names[0], 'rss0') / mib:.0f} MiB RSS; test accuracy "
          f"{ref[0]['test_acc']:.4f} in every run")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
