"""1- vs 2-process equality of the training gradient, per method: the numbers behind
tests/integration/test_distributed.py (which asserts them), printed as a table.

    UCMKD_CACHE=/tmp/ucmkd-cache python benchmarks/ddp_equality.py

For every case of ``tests/support/distributed_workers.py``'s GRAD_CASES (each method under fp32; the
paper's and the default method under bf16), one training step on the first global batch (16
items; 8 per rank under 2 processes) of a 4-class synthetic problem with a student without
batch norm: the gradient each rank steps with, against the 1-process gradient, as the
relative error in the global norm over all trainable parameters. The 2 processes run under
``torchrun --standalone --nproc_per_node=2`` with the gloo backend.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SUPPORT = ROOT / "tests" / "support"
sys.path.insert(0, str(SUPPORT))

from distributed_workers import GRAD_CASES, step_grads  # noqa: E402  (the tests' own worker)


def rel(g2: list, g1: list) -> float:
    num = sum(float((a - b).norm()) ** 2 for a, b in zip(g2, g1) if b is not None) ** 0.5
    return num / sum(float(b.norm()) ** 2 for b in g1 if b is not None) ** 0.5


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cache, out = str(Path(tmp) / "cache"), str(Path(tmp) / "g")
        ref = {c: step_grads(c, cache) for c in GRAD_CASES}
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(SUPPORT), os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(SUPPORT / "distributed_workers.py"), "grads", cache, out],
                       env=env, check=True, capture_output=True, timeout=600)
        ranks = [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(2)]
    print("| method | precision | relative gradient error, 2 processes vs 1 (rank 0, rank 1) | "
          "ranks identical | 1-process gradient norm |")
    print("|---|---|---|---|---|")
    for case, (method, precision, params) in GRAD_CASES.items():
        g1 = ref[case]["grads"]
        errs = [rel(r[case]["grads"], g1) for r in ranks]
        same = all(torch.equal(a, b) for a, b in zip(ranks[0][case]["grads"], ranks[1][case]["grads"]) if a is not None)
        norm = sum(float(b.norm()) ** 2 for b in g1 if b is not None) ** 0.5
        label = method + "".join(f" ({k}: {v})" for k, v in params.items())
        print(f"| {label} | {precision} | {errs[0]:.1e}, {errs[1]:.1e} | {'yes' if same else 'no'} | {norm:.3g} |")
    print("\nbf16 rows: the 2-process bf16 gradient against the 1-process bf16 gradient (both round the "
          "forwards to bf16, on different batch shapes).")


if __name__ == "__main__":
    main()
