"""The GPU check: everything that needs CUDA, in one prepared script of at most ~5 minutes on one
GPU (nothing else in the project needs a GPU; CI never has one).

1. the CUDA tests (``pytest -m cuda tests/integration/test_gpu.py``: bf16 and fp16 with the scaler and its
   checkpointed state, nccl collectives in one process, pinned-memory reading, the teacher-output
   table's device);
2. the cost table of ``benchmarks/cost.py`` on the GPU (ratio of each method's fit time to ce's,
   median of interleaved repeats);
3. the OT loss forward + backward timings of ``benchmarks/ot_solvers.py`` on the GPU, B up to 4096.

It prints one Markdown report (the card's name, library versions, each part's output and time)
and exits non-zero if the tests fail. Parts that run out of ``--budget-s`` are reported as not run.

    python benchmarks/gpu_check.py [--repeats 2] [--epochs 10] [--budget-s 290] > gpu_check.md
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="cost table repeats")
    ap.add_argument("--epochs", type=int, default=10, help="cost table epochs per run")
    ap.add_argument("--methods", default="ce,kd,ucmkd-joint,ucmkd-bilevel,ucmkd")
    ap.add_argument("--ot-sizes", default="256,1024,4096")
    ap.add_argument("--budget-s", type=float, default=290.0, help="skip the parts that would start after this")
    args = ap.parse_args(argv)
    t0 = time.time()

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check", file=sys.stderr)
        return 2
    from ucmkd.provenance import versions

    out = [f"# ucmkd GPU check ({time.strftime('%Y-%m-%d')}, `python benchmarks/gpu_check.py "
           f"{' '.join(argv if argv is not None else sys.argv[1:])}`)", "",
           f"Device: {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}, "
           f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB); versions: {versions()}.", ""]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "integration" / "test_gpu.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    tail = "\n".join(proc.stdout.strip().splitlines()[-25:])
    out += ["## CUDA tests", "", "```", tail, "```", f"({time.time() - t:.0f} s, exit code {proc.returncode})", ""]
    print("\n".join(out), flush=True)
    out = []

    def part(title: str, fn) -> None:
        if time.time() - t0 > args.budget_s:
            print(f"## {title}\n\nnot run: the {args.budget_s:.0f} s budget was spent\n", flush=True)
            return
        t1, buf = time.time(), io.StringIO()
        with contextlib.redirect_stdout(buf):
            fn()
        print(f"## {title}\n\n{buf.getvalue().strip()}\n\n({time.time() - t1:.0f} s)\n", flush=True)

    import cost
    from ot_solvers import ot_table

    part("Cost on the GPU (ratio of fit time to ce)",
         lambda: cost.main(["--sections", "methods", "--repeats", str(args.repeats), "--epochs", str(args.epochs),
                            "--methods", args.methods, "--device", "cuda"]))
    part("OT loss on the GPU, forward + backward (d = 64, cosine, eps 0.1, 100 iterations)",
         lambda: print(ot_table([int(s) for s in args.ot_sizes.split(",")], device="cuda", memory=False)))
    print(f"Total: {time.time() - t0:.0f} s")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
