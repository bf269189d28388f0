"""Issue 13, item 3, on the `ucmkd run digits --quick` cell (ucmkd, digits/image -> digits/signal,
seed 0): SIGKILL right after the commit (latest.pt) of the last epoch that improved the student,
before its best.pt export; resume; compare every field of result.json with the uninterrupted run.

    UCMKD_CACHE=/tmp/ucmkd-cache python benchmarks/crash_resume_digits.py [OUT_DIR]
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import os, signal, sys, torch
torch.set_num_threads(1)
import ucmkd.cache as cache
from ucmkd.api import run
from ucmkd.cli import experiment_path
from ucmkd.config import ExperimentConfig, load_config
from ucmkd.experiment import apply_quick, run_config_for
run_dir, kill_at = sys.argv[1], int(sys.argv[2])
orig, writes = cache._replace, []
def hooked(tmp, path):
    orig(tmp, path)
    if str(path).startswith(run_dir):          # the run's own writes (not the teacher cache's)
        writes.append(os.path.basename(path))
        if len(writes) - 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
cache._replace = hooked
exp = apply_quick(load_config(ExperimentConfig, experiment_path("digits")))
run(run_config_for(exp, "digits/image", "digits/signal", "ucmkd", 0), run_dir=run_dir)
print("WRITES", writes)
'''


def child(run_dir: Path, kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, str(run_dir), str(kill_at)], capture_output=True, text=True)


def main(out: Path) -> None:
    import torch

    shutil.rmtree(out, ignore_errors=True)
    ref, killed = out / "uninterrupted", out / "killed"
    r = child(ref, -1)
    writes = eval(r.stdout.split("WRITES")[1])
    k = max(i for i, w in enumerate(writes[:-1]) if w == "latest.pt" and writes[i + 1] == "best.pt" and i > 6)
    r = child(killed, k)
    latest, best = (torch.load(killed / f, weights_only=False) for f in ("latest.pt", "best.pt"))
    print(f"killed (exit {r.returncode}) right after write {k} ({writes[k]}): latest.pt at epoch {latest['epoch']} "
          f"with best epoch {latest['best']['student']['epoch']}; best.pt export still at epoch {best['best']['epoch']}")
    child(killed, -1)
    a, b = (json.loads((d / "result.json").read_text()) for d in (ref, killed))
    diff = {f: (a[f], b.get(f)) for f in a if f not in ("seconds", "run_dir") and a[f] != b.get(f)}
    print(f"resumed: fields of result.json that differ from the uninterrupted run (seconds, run_dir aside): {diff}")
    print({f: a[f] for f in ("test_acc", "selected", "diag_fa", "diag_teacher_head_acc")})


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ucmkd-crash-resume"))
