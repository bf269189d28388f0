"""Seeded inputs of the OT bit-identity fixture (``tests/support/data/ot_bits.npz``, :mod:`test_ot_bits`).

Each case is ``(name, kwargs of sinkhorn_cost, dtype)``; :func:`inputs` gives its features.
"""
from __future__ import annotations

import torch

DTYPES = (torch.float64, torch.float32)
METRICS = ("cosine", "chordal", "l2", "l1")
# grad "detach" is an alias of "envelope": the test checks it against the envelope entries
SOLVES = [("torch", "autodiff"), ("torch", "envelope"), ("pot", "autodiff"), ("pot", "envelope"),
          ("fused", "autodiff"), ("fused", "envelope"), ("geomloss", "envelope")]
PLAN_METRICS = ("cosine", "l2")        # plans of sinkhorn_plan and plan_cost's value and gradients
PLAN_BACKENDS = ("fused", "pot", "torch")
# (name, seed, B, M, d, feature scale, eps, n_iter, label cost): converged early, capped at
# n_iter, with a label cost, and a cost range that sends ``fused`` to the log domain
PROBLEMS = [("easy", 0, 12, 10, 5, 1.0, 0.1, 100, None),
            ("capped", 1, 9, 11, 4, 0.5, 0.02, 30, None),
            ("label", 2, 10, 10, 3, 1.0, 0.05, 200, 2.0),
            ("logdomain", 3, 8, 7, 3, 3.0, 0.01, 300, None)]


def problem(name: str) -> tuple:
    return next(p for p in PROBLEMS if p[0] == name)


def inputs(seed: int, B: int, M: int, d: int, scale: float, dtype, label_cost):
    """(zs [B, d], zt [M, d], extra_cost [B, M] or None) in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    zs = (scale * torch.randn(B, d, generator=g, dtype=torch.float64)).to(dtype)
    zt = (scale * torch.randn(M, d, generator=g, dtype=torch.float64)).to(dtype)
    extra = None
    if label_cost is not None:
        ys, yt = torch.randint(0, 3, (B,), generator=g), torch.randint(0, 3, (M,), generator=g)
        extra = (ys[:, None] != yt[None, :]).to(dtype) * label_cost
    return zs, zt, extra


def cases():
    """Every (key, problem, metric, backend, grad, dtype) of the fixture."""
    for prob in PROBLEMS:
        for metric in METRICS:
            if prob[0] == "logdomain" and metric in ("cosine", "chordal"):
                continue                       # bounded costs: never beyond the float range
            for backend, grad in SOLVES:
                if prob[-1] is not None and backend == "geomloss":
                    continue                   # no label cost with geomloss
                for dtype in DTYPES:
                    key = f"{prob[0]}/{metric}/{backend}/{grad}/{str(dtype)[6:]}"
                    yield key, prob, metric, backend, grad, dtype


def plan_cases():
    """Every (key, problem, metric, backend, dtype) of the fixture's plans."""
    for prob in PROBLEMS:
        for metric in PLAN_METRICS:
            for dtype in DTYPES:
                for backend in PLAN_BACKENDS:
                    yield f"plan/{prob[0]}/{metric}/{backend}/{str(dtype)[6:]}", prob, metric, backend, dtype
