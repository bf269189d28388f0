"""Per-step time of the bilevel strategy: this tree's functional AdamW step against the previous
implementation (fresh ``torch.optim.AdamW`` on cloned parameters every batch), loaded from git.

    PYTHONPATH=src python benchmarks/bilevel_step.py [--old-rev main] [--batch 64] [--repeats 7]

Both run side by side in one process, interleaved, on copies of the same distiller (digits
sizes: a cnn1d signal student of width 16 on 40-sample signals, a cnn2d image teacher of width
64 on 8x8 images, 64-d features, 10 classes, the library's ucmkd-bilevel defaults); the
figure is the median over repeats of the mean time of ``--steps`` steps, and their ratio.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ucmkd.data.pairing import Batch
from ucmkd.engine.strategies import BilevelStrategy, FunctionalAdamW, InnerAdamW
from ucmkd.methods import build_distiller
from ucmkd.models import build_classifier


def old_strategy_class(rev: str):
    """``BilevelStrategy`` of ``src/ucmkd/engine/strategies.py`` at git revision ``rev``."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{rev}:src/ucmkd/engine/strategies.py"], cwd=root,
                         check=True, capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("ucmkd.engine._strategies_old", loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "ucmkd.engine"
    exec(compile(src, f"{rev}:strategies.py", "exec"), mod.__dict__)
    return mod.BilevelStrategy


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-rev", default="main")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = build_classifier((1, 8, 8), "image", 10, width=64, feat_dim=64).eval()
    student = build_classifier((1, 40), "signal", 10, width=16, feat_dim=64)
    Old = old_strategy_class(a.old_rev)
    variants = {}
    for name, cls in (("old", Old), ("new", BilevelStrategy)):
        d = build_distiller("ucmkd-bilevel", copy.deepcopy(student), teacher)
        d.head_loss = d.outer_loss = d.ce   # the previous strategy called these method attributes
        d.train()
        variants[name] = cls(d, torch.optim.AdamW(d.trainable_parameters(), lr=1e-3), 5.0)
    g = torch.Generator().manual_seed(0)
    batches = [Batch(torch.randn(a.batch, 1, 40, generator=g), torch.randint(0, 10, (a.batch,), generator=g),
                     torch.randn(a.batch, 1, 8, 8, generator=g)) for _ in range(a.steps)]
    for s in variants.values():   # warm-up
        s.step(batches[0])
    times = {k: [] for k in variants}
    for _ in range(a.repeats):
        for name, s in variants.items():
            t0 = time.perf_counter()
            for b in batches:
                s.step(b)
            times[name].append((time.perf_counter() - t0) / len(batches))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"bilevel step, batch {a.batch}, {a.steps} steps x {a.repeats} interleaved repeats, 1 thread")
    print("| implementation | median ms/step |")
    print("|---|---|")
    print(f"| {a.old_rev}: clones + fresh torch.optim.AdamW per batch | {1e3 * med['old']:.2f} |")
    print(f"| this tree: functional AdamW, hooks | {1e3 * med['new']:.2f} |")
    print(f"new / old = {med['new'] / med['old']:.3f}")
    print()
    print(optimiser_only(student, a.repeats))
    return 0


def optimiser_only(student, repeats: int, inner_steps: int = 2) -> str:
    """The inner optimiser alone on the student's parameter shapes: a fresh torch.optim.AdamW
    on clones plus ``inner_steps`` steps, against FunctionalAdamW's ``inner_steps`` steps."""
    params = {n: q.detach().clone() for n, q in student.named_parameters()}
    grads = {n: torch.randn_like(q) for n, q in params.items()}

    def torch_adamw():
        qs = [q.clone().requires_grad_(True) for q in params.values()]
        opt = torch.optim.AdamW(qs, lr=5e-5, weight_decay=0.05)
        for _ in range(inner_steps):
            for q, g in zip(qs, grads.values()):
                q.grad = g
            opt.step()

    def functional():
        f, qs = FunctionalAdamW(InnerAdamW(5e-5, 0.05)), dict(params)
        for _ in range(inner_steps):
            qs = f.step(qs, grads)

    times = {"torch": [], "functional": []}
    for _ in range(repeats):
        for name, fn in (("torch", torch_adamw), ("functional", functional)):
            t0 = time.perf_counter()
            for _ in range(20):
                fn()
            times[name].append((time.perf_counter() - t0) / 20)
    t, f = statistics.median(times["torch"]), statistics.median(times["functional"])
    return (f"inner optimiser alone ({len(params)} tensors, {sum(q.numel() for q in params.values())} weights, "
            f"{inner_steps} steps): fresh torch.optim.AdamW {1e3 * t:.2f} ms, FunctionalAdamW {1e3 * f:.2f} ms "
            f"(ratio {f / t:.2f})")


if __name__ == "__main__":
    sys.exit(main())
