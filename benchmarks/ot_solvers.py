"""Cost of the feature-alignment OT loss per solver, and how far the envelope gradient is.

``ot_table`` times forward + backward of the OT loss between student features zs [B, d]
(requires grad) and teacher features zt [B, d], cosine cost, for POT's own calls and the
ucmkd backends, interleaved across variants (median of ``repeats``), and measures each
cell's peak memory in a fresh subprocess (peak RSS during one forward + backward, after a
warm-up, minus the RSS just before it; torch's CPU allocations are all counted).  Every row also gives the
relative difference of its ``<P, C>`` to ``ot.sinkhorn2(a, b, C, reg=eps, numItermax=n_iter)``
on the same cost matrix.  ``grad_table`` compares the envelope gradient (``grad="envelope"``)
with the autodiff gradient through the iterations (POT's ``ot.sinkhorn2``) in float64.

    PYTHONPATH=src python benchmarks/ot_solvers.py [--batch-sizes 64,256,1024,4096]
        [--features clustered|iid] [--repeats 3] [--variants fused-envelope,pot-autodiff]

Importable: ``from benchmarks.ot_solvers import ot_table, grad_table`` (repository root on
``sys.path``) or by path; both return Markdown text.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
import warnings

import ot
import torch

from ucmkd.losses.ot import cost_matrix, sinkhorn_cost

# name -> (label for the table, what it runs)
VARIANTS = {
    "pot-autodiff": ("POT autodiff", "`ot.sinkhorn2(a, b, C, eps, numItermax=n_iter)` + backward"),
    "pot-envelope": ("POT envelope", "`ot.solve(C, a, b, reg=eps, max_iter=n_iter, grad='envelope')` "
                                     "(log-domain), `res.value.backward()`"),
    "torch-autodiff": ("torch log-domain autodiff", "`sinkhorn_cost(backend='torch', grad='autodiff')`"),
    "ucmkd-pot-autodiff": ("ucmkd pot/autodiff", "`sinkhorn_cost(backend='pot', grad='autodiff')` "
                                                 "(the paper methods' path: POT + underflow guards)"),
    "ucmkd-pot-envelope": ("ucmkd pot/envelope", "`sinkhorn_cost(backend='pot', grad='envelope')` "
                                                 "(= the old `grad='detach'`: `ot.sinkhorn` plan)"),
    "fused-autodiff": ("ucmkd fused/autodiff", "`sinkhorn_cost(backend='fused', grad='autodiff')`"),
    "fused-envelope": ("ucmkd fused/envelope", "`sinkhorn_cost(backend='fused', grad='envelope')` "
                                               "(recommended default)"),
}
# torch autodiff keeps ~2 float32 [B, M] tensors per iteration for backward (821 MB measured
# at B = M = 1024, 100 iterations): skip it where that exceeds 4 GB.
TORCH_AUTODIFF_MAX_BYTES = 4 << 30


def make_features(n: int, dim: int, features: str, g: torch.Generator, clusters: int = 10,
                  noise: float = 0.5, dtype=torch.float32) -> torch.Tensor:
    """[n, dim] features: ``iid`` N(0, I), or ``clustered`` (``clusters`` Gaussian class
    centres, fixed by seed 1, plus ``noise`` x N(0, I) per item), more like trained features."""
    if features == "iid":
        return torch.randn(n, dim, generator=g, dtype=dtype)
    centres = torch.randn(clusters, dim, generator=torch.Generator().manual_seed(1), dtype=dtype)
    labels = torch.randint(clusters, (n,), generator=g)
    return centres[labels] + noise * torch.randn(n, dim, generator=g, dtype=dtype)


def _uniform(n, like):
    return torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device)


def make_step(name: str, zs: torch.Tensor, zt: torch.Tensor, eps: float, n_iter: int):
    """A function running one forward + backward of variant ``name``; returns <P, C>."""

    def pot_autodiff():
        C = cost_matrix(zs, zt)
        loss = ot.sinkhorn2(_uniform(C.shape[0], C), _uniform(C.shape[1], C), C, reg=eps, numItermax=n_iter)
        loss.backward()
        return float(loss.detach())

    def pot_envelope():
        C = cost_matrix(zs, zt)
        res = ot.solve(C, _uniform(C.shape[0], C), _uniform(C.shape[1], C), reg=eps, max_iter=n_iter,
                       grad="envelope")
        res.value.backward()
        return float(res.value_linear)

    def library(backend, grad):
        def run():
            loss = sinkhorn_cost(zs, zt, "cosine", eps=eps, n_iter=n_iter, backend=backend, grad=grad)
            loss.backward()
            return float(loss.detach())
        return run

    runs = {"pot-autodiff": pot_autodiff, "pot-envelope": pot_envelope}
    for key in VARIANTS:
        if key not in runs:
            backend, grad = key.replace("ucmkd-", "").split("-")
            runs[key] = library(backend, grad)
    run = runs[name]

    def step():
        zs.grad = None
        return run()

    return step


def _device_name(device: str) -> str:
    d = torch.device(device)
    return torch.cuda.get_device_name(d) if d.type == "cuda" else "cpu"


def skip_reason(name: str, B: int, n_iter: int) -> str | None:
    need = 2 * 4 * B * B * n_iter
    if name == "torch-autodiff" and need > TORCH_AUTODIFF_MAX_BYTES:
        return f"skipped: ~{need / 2**30:.0f} GB for backward (> 4 GB)"
    return None


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def _memory_cell(name: str, B: int, args) -> dict:
    """Child process: peak RSS of one forward + backward minus the RSS just before it.

    A warm-up at the same size first (lazy library buffers are setup, not per-call cost);
    then the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``), so VmHWM is the
    peak of the measured call alone.  The parent fixes glibc's mmap threshold at 128 KiB
    (``MALLOC_MMAP_THRESHOLD_``), so blocks the warm-up freed go back to the system instead
    of being reused from the heap unseen.
    """
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    g = torch.Generator().manual_seed(args.seed + B)
    zs = make_features(B, args.dim, args.features, g).requires_grad_()
    zt = make_features(B, args.dim, args.features, g)
    step = make_step(name, zs, zt, args.eps, args.n_iter)
    step()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_bytes("VmRSS")
    step()
    return {"peak_extra_mb": max(_status_bytes("VmHWM") - base, 0) / 2**20}


def measure_memory(name: str, B: int, args) -> float | None:
    """Peak extra memory (MiB) of one cell in a fresh subprocess; None where unavailable."""
    if not os.access("/proc/self/clear_refs", os.W_OK):  # Linux only (resettable peak RSS)
        return None
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-cell", name, "--batch-sizes", str(B),
           "--dim", str(args.dim), "--eps", str(args.eps), "--n-iter", str(args.n_iter),
           "--features", args.features, "--threads", str(args.threads), "--seed", str(args.seed)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mb"]


def _args(**kw) -> argparse.Namespace:
    return parse_args([f"--{k.replace('_', '-')}={v}" for k, v in kw.items()])


def ot_table(batch_sizes=(64, 256, 1024, 4096), dim: int = 64, eps: float = 0.1, n_iter: int = 100,
             features: str = "clustered", repeats: int = 3, threads: int = 1, seed: int = 0,
             variants=tuple(VARIANTS), memory: bool = True, device: str = "cpu") -> str:
    """Markdown table of forward + backward time (median of ``repeats``, variants interleaved)
    and peak extra memory per (B, variant), with <P, C> relative to ``ot.sinkhorn2``. On a CUDA
    ``device`` the features live there (every step ends in a host read of its value, so the
    timings include the kernels) and the memory column, which measures host RSS, is left out."""
    memory = memory and torch.device(device).type == "cpu"
    args = _args(dim=dim, eps=eps, n_iter=n_iter, features=features, threads=threads, seed=seed)
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message="Sinkhorn did not converge")
    load0 = os.getloadavg()[0]
    lines = [
        f"Features: {features} ({'10 class centres + 0.5 noise' if features == 'clustered' else 'N(0, I)'}), "
        f"d={dim}, M=B, cosine cost, eps={eps}, n_iter={n_iter}, float32, {threads} thread(s); time: median of "
        f"{repeats} interleaved repeats (random order each) after one warm-up; memory: fresh subprocess per "
        f"cell, peak RSS of one forward+backward (after a warm-up) minus the RSS before it. "
        f"torch {torch.__version__}, POT {ot.__version__}, device {_device_name(device)}.",
        "",
        "| B | variant | POT iterations | fwd+bwd ms | ratio to POT autodiff | peak extra MB | "
        "<P, C> rel. diff to ot.sinkhorn2 |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for B in batch_sizes:
        g = torch.Generator().manual_seed(seed + B)
        zs = make_features(B, dim, features, g).to(device).requires_grad_()
        zt = make_features(B, dim, features, g).to(device)
        C = cost_matrix(zs.detach(), zt)
        a = _uniform(B, C)
        ref = float(ot.sinkhorn2(a, a, C, reg=eps, numItermax=n_iter))
        _, log = ot.sinkhorn(a, a, C, reg=eps, numItermax=n_iter, log=True)
        del C
        names = [v for v in variants if skip_reason(v, B, n_iter) is None]
        steps = {v: make_step(v, zs, zt, eps, n_iter) for v in names}
        times = {v: [] for v in names}
        values = {v: steps[v]() for v in names}  # warm-up
        order = random.Random(seed + B)
        for _ in range(repeats):  # interleaved, in a fresh (seeded) random order each repeat
            for v in order.sample(names, len(names)):
                t0 = time.perf_counter()
                steps[v]()
                times[v].append(1e3 * (time.perf_counter() - t0))
        base = statistics.median(times["pot-autodiff"]) if "pot-autodiff" in times else None
        for v in variants:
            label = VARIANTS[v][0]
            why = skip_reason(v, B, n_iter)
            if why:
                lines.append(f"| {B} | {label} | {log['niter'] + 1} | {why} | | | |")
                continue
            ms = statistics.median(times[v])
            mem = measure_memory(v, B, args) if memory else None
            ratio = f"{ms / base:.2f}x" if base else ""
            mem_s = f"{mem:.0f}" if mem is not None else "n/a"
            lines.append(f"| {B} | {label} | {log['niter'] + 1} | {ms:.1f} | {ratio} | {mem_s} | "
                         f"{abs(values[v] / ref - 1):.1e} |")
            print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", f"Load average (1 min) at the start / end: {load0:.1f} / {os.getloadavg()[0]:.1f} "
                  f"on {os.cpu_count()} CPUs.", "", "Variants:"]
    lines += [f"- {label}: {what}" for label, what in (VARIANTS[v] for v in variants)]
    return "\n".join(lines)


def grad_table(batch_sizes=(64, 256), dim: int = 64, eps: float = 0.1, n_iter: int = 100, seeds: int = 5) -> str:
    """How far the envelope gradient is from the autodiff one, float64, clustered features.

    Per seed: g_auto = d/dzs of ``ot.sinkhorn2`` (autodiff through the iterations),
    g_env = the gradient of ``sinkhorn_cost(backend='fused', grad='envelope')``;
    reported: median [min, max] over seeds of |g_env - g_auto| / |g_auto| and of their cosine.
    """
    warnings.filterwarnings("ignore", message="Sinkhorn did not converge")
    lines = [
        f"Envelope vs autodiff gradient w.r.t. the student features, float64, clustered 64-d features "
        f"(10 centres + 0.5 noise), cosine, eps={eps}; median [min, max] over {seeds} seeds.",
        "",
        "| B | n_iter | rel. difference \\|g_env - g_auto\\| / \\|g_auto\\| | cosine(g_env, g_auto) |",
        "|---:|---:|---|---|",
    ]
    for B in batch_sizes:
        for it in (n_iter, 10 * n_iter):
            rel, cos = [], []
            for seed in range(seeds):
                g = torch.Generator().manual_seed(1000 + seed)
                zs = make_features(B, dim, "clustered", g, dtype=torch.float64)
                zt = make_features(B, dim, "clustered", g, dtype=torch.float64)
                z1 = zs.clone().requires_grad_()
                C = cost_matrix(z1, zt)
                a = _uniform(B, C)
                ot.sinkhorn2(a, a, C, reg=eps, numItermax=it).backward()
                z2 = zs.clone().requires_grad_()
                sinkhorn_cost(z2, zt, eps=eps, n_iter=it, backend="fused", grad="envelope").backward()
                rel.append(float((z2.grad - z1.grad).norm() / z1.grad.norm()))
                cos.append(float(torch.nn.functional.cosine_similarity(z2.grad.flatten(), z1.grad.flatten(), 0)))
            fmt = lambda xs: f"{statistics.median(xs):.2f} [{min(xs):.2f}, {max(xs):.2f}]"  # noqa: E731
            lines.append(f"| {B} | {it} | {fmt(rel)} | {fmt(cos)} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="64,256,1024,4096", help="comma-separated B (= M)")
    p.add_argument("--dim", type=int, default=64, help="feature dimension d")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--n-iter", type=int, default=100)
    p.add_argument("--features", choices=("clustered", "iid"), default="clustered",
                   help="clustered: runs all n_iter iterations at eps 0.1; iid: POT stops after ~10")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per cell (median)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--no-memory", action="store_true", help="skip the per-cell memory subprocesses")
    p.add_argument("--no-grad-table", action="store_true", help="skip the envelope-vs-autodiff gradient table")
    p.add_argument("--memory-cell", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    if args.memory_cell:
        print(json.dumps(_memory_cell(args.memory_cell, sizes[0], args)))
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; valid: {', '.join(VARIANTS)}")
    cmd = "PYTHONPATH=src python benchmarks/ot_solvers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"{datetime.date.today().isoformat()}, `{cmd.strip()}`\n")
    print(ot_table(sizes, args.dim, args.eps, args.n_iter, args.features, args.repeats, args.threads,
                   args.seed, variants, memory=not args.no_memory))
    if not args.no_grad_table:
        print()
        print(grad_table(dim=args.dim, eps=args.eps, n_iter=args.n_iter))


if __name__ == "__main__":
    main()
