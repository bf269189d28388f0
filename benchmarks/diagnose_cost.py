"""What ``ucmkd diagnose`` costs next to one default ``ucmkd`` run, measured side by side.

    python benchmarks/diagnose_cost.py [--settings full/digits-img2sig-k10,...] [--repeats 3]

For each setting (``suite/setting`` of the built-in suites): the teacher and the data are made
ready first (both calls then find them in the cache, as ``ucmkd train`` would after its first
run), then ``ucmkd.diagnose(cfg)`` and ``ucmkd.run(cfg)`` (method ``ucmkd``, no run directory)
alternate ``--repeats`` times in one process with one thread. Each call is timed whole (data
loading from the cache included). Printed: the median seconds of each and their ratio.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diagnose_validation import suite_settings, with_method  # noqa: E402

DEFAULT = "full/digits-img2sig-k10,full/digits-sig2img-k5,full/synthetic-mild,generalize/tabular-mild,full/spoken-img2aud-k10"


def main(argv=None) -> int:
    import torch

    from ucmkd import run
    from ucmkd.diagnose import diagnose

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", default=DEFAULT)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    sets = suite_settings(a.settings)
    lines = ["| setting | diagnose s (median) | ucmkd run s (median) | ratio |", "|---|---|---|---|"]
    ratios = []
    for sid, cfg in sets.items():
        c = with_method(cfg, "ucmkd", 0)
        diagnose(c, predict=False)                  # teacher and data into the cache
        td, tr = [], []
        for _ in range(a.repeats):
            t = time.perf_counter()
            diagnose(c, predict=False)
            td.append(time.perf_counter() - t)
            t = time.perf_counter()
            run(c)
            tr.append(time.perf_counter() - t)
        d, r = float(np.median(td)), float(np.median(tr))
        ratios.append(d / r)
        lines.append(f"| {sid} | {d:.2f} | {r:.2f} | {100 * d / r:.1f} % |")
        print(lines[-1], flush=True)
    lines.append(f"| median over settings | | | {100 * float(np.median(ratios)):.1f} % |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
