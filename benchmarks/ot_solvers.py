"""Time forward+backward of the feature-alignment OT loss for each solver.

For every (backend, grad mode) and batch size B (student B x d, teacher B x d, random
Gaussian features), times ``sinkhorn_cost(zs, zt, "cosine", eps, n_iter, backend, grad)``
plus ``.backward()`` and reports the relative difference of its value to the authors'
reference ``ot.sinkhorn2(a, b, C, reg=eps, numItermax=n_iter)``.  A second table says
whether ``n_iter`` plain Sinkhorn iterations are converged on these features.

    PYTHONPATH=src python benchmarks/ot_solvers.py --batch-sizes 32,64,128,256 [--clusters 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import ot
import torch

from ucmkd.losses.ot import cost_matrix, sinkhorn_cost

COMBOS = (
    ("torch", "autodiff"),
    ("torch", "detach"),
    ("pot", "autodiff"),
    ("pot", "detach"),
    ("geomloss", "detach"),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="32,64,128,256",
                   help="comma-separated B (student and teacher batch size)")
    p.add_argument("--dim", type=int, default=64, help="feature dimension d")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per cell")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per cell")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--n-iter", type=int, default=100)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clusters", type=int, default=0,
                   help="0: i.i.d. Gaussian features; K>0: K Gaussian class centres + noise "
                        "(harder, more like trained features)")
    p.add_argument("--noise", type=float, default=0.5,
                   help="noise std relative to the centres' std when --clusters > 0")
    return p.parse_args(argv)


def make_features(n, args, g, dtype):
    if args.clusters <= 0:
        return torch.randn(n, args.dim, generator=g, dtype=dtype)
    centres = torch.randn(args.clusters, args.dim, generator=torch.Generator().manual_seed(args.seed),
                          dtype=dtype)
    labels = torch.randint(args.clusters, (n,), generator=g)
    return centres[labels] + args.noise * torch.randn(n, args.dim, generator=g, dtype=dtype)


def reference_value(zs, zt, eps, n_iter):
    C = cost_matrix(zs.detach(), zt, "cosine")
    a = torch.full((C.shape[0],), 1.0 / C.shape[0], dtype=C.dtype)
    b = torch.full((C.shape[1],), 1.0 / C.shape[1], dtype=C.dtype)
    return ot.sinkhorn2(a, b, C, reg=eps, numItermax=n_iter).item()


def time_cell(zs, zt, backend, grad, args):
    def step():
        zs.grad = None
        loss = sinkhorn_cost(zs, zt, "cosine", eps=args.eps, n_iter=args.n_iter,
                             backend=backend, grad=grad)
        loss.backward()
        return loss.item()

    for _ in range(args.warmup):
        value = step()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        value = step()
        times.append(1e3 * (time.perf_counter() - t0))
    std = statistics.stdev(times) if len(times) > 1 else 0.0
    return statistics.mean(times), std, value


def convergence_row(zs, zt, eps, n_iter):
    """POT's stopping iteration, marginal error after n_iter, gap to the converged value."""
    C = cost_matrix(zs.detach().double(), zt.double(), "cosine")
    a = torch.full((C.shape[0],), 1.0 / C.shape[0], dtype=C.dtype)
    b = torch.full((C.shape[1],), 1.0 / C.shape[1], dtype=C.dtype)
    _, log_default = ot.sinkhorn2(a, b, C, reg=eps, numItermax=n_iter, log=True)
    v_n, log_n = ot.sinkhorn2(a, b, C, reg=eps, numItermax=n_iter, stopThr=0.0, log=True)
    v_conv = ot.sinkhorn2(a, b, C, reg=eps, numItermax=100_000, stopThr=1e-14,
                          method="sinkhorn_log")
    return (log_default["niter"] + 1, float(log_n["err"][-1]), abs(v_n.item() / v_conv.item() - 1),
            float(C.min()), float(C.max()))


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    warnings.filterwarnings("ignore", message="Sinkhorn did not converge")

    feats = f"{args.clusters} clusters, noise {args.noise}" if args.clusters > 0 else "i.i.d. N(0, I)"
    print(f"features: {feats}; cosine cost, eps={args.eps}, n_iter={args.n_iter}, d={args.dim}, {args.dtype}, "
          f"threads={args.threads}, repeats={args.repeats} (+{args.warmup} warm-up), "
          f"torch {torch.__version__}, POT {ot.__version__}\n")
    print("| backend | grad | B | fwd+bwd ms (mean +- std) | rel. diff vs ot.sinkhorn2 |")
    print("|---|---|---:|---:|---:|")
    conv_rows = []
    for B in sizes:
        g = torch.Generator().manual_seed(args.seed + B)
        zs = make_features(B, args, g, dtype).requires_grad_()
        zt = make_features(B, args, g, dtype)
        ref = reference_value(zs, zt, args.eps, args.n_iter)
        for backend, grad in COMBOS:
            mean, std, value = time_cell(zs, zt, backend, grad, args)
            rel = abs(value - ref) / abs(ref)
            print(f"| {backend} | {grad} | {B} | {mean:.2f} +- {std:.2f} | {rel:.1e} |", flush=True)
        conv_rows.append((B, *convergence_row(zs, zt, args.eps, args.n_iter)))

    print("\nConvergence of plain Sinkhorn-Knopp (float64, same features):\n")
    print(f"| B | cost range | POT iterations run (stopThr=1e-9) | marginal err after {args.n_iter} it "
          f"| rel. gap {args.n_iter} it vs converged |")
    print("|---:|---:|---:|---:|---:|")
    for B, niter, err, gap, cmin, cmax in conv_rows:
        print(f"| {B} | [{cmin:.3f}, {cmax:.3f}] | {niter} | {err:.1e} | {gap:.1e} |")


if __name__ == "__main__":
    main()
