"""Record, then compare, the ``result.json`` of a fixed list of runs: the check that a refactor
changes no user's result.

    UCMKD_CACHE=/tmp/ri-cache python benchmarks/result_identity.py record OUT_DIR
    python benchmarks/result_identity.py compare BEFORE_DIR AFTER_DIR

The list: every registered method on digits/image -> digits/signal (``paired-kd``, which needs
true pairs, on synthetic/a -> synthetic/b under ``pairing.mode=paired``) (seed 0, a short schedule:
3 teacher epochs, 4 student epochs of 4 steps), ``ucmkd`` trained by ``torchrun`` in 2
processes (gloo), ``ucmkd-bilevel`` (in the list of methods) and ``ucmkd`` killed (SIGKILL)
right after its second epoch's commit and resumed. ``compare`` prints, per run, every field
of the first record's result.json that differs or is missing in the second, apart from the
fields that describe the execution rather than the result (:data:`VOLATILE`: wall-clock
seconds, the run directory, the code version), and lists the fields only the second has (a
field a change adds). Exit status 1 when a field differs or a run is missing.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = ("seconds", "run_dir", "versions.ucmkd")
#: methods that cannot run on the digits setting, and where they run instead
ELSEWHERE = {"paired-kd": ["data.teacher=synthetic/a", "data.student=synthetic/b", "pairing.mode=paired"]}
OVERRIDES = ["data.teacher=digits/image", "data.student=digits/signal", "seed=0", "threads=1",
             "teacher.epochs=3", "optim.epochs=4", "optim.steps_per_epoch=4", "optim.warmup_epochs=1"]

KILLER = r'''
import os, signal, sys
import ucmkd.cache as cache
from ucmkd.cli import main
run_dir, kill_at = sys.argv[1], int(sys.argv[2])
orig, n = cache._replace, [0]
def hooked(tmp, path):
    orig(tmp, path)
    if str(path).startswith(run_dir) and os.path.basename(path) == "latest.pt":
        n[0] += 1
        if n[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
cache._replace = hooked
main(["train", "--no-progress", "--run-dir", run_dir] + sys.argv[3:])
'''


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def _train(run_dir: Path, extra: list, prefix: list | None = None) -> None:
    if (run_dir / "result.json").is_file():        # recorded by an interrupted invocation
        return
    cmd = (prefix or [sys.executable, "-m", "ucmkd"]) + ["train", "--no-progress", "--run-dir", str(run_dir)]
    subprocess.run(cmd + OVERRIDES + extra, check=True, env=_env(), cwd=ROOT)


def record(out: Path) -> None:
    from ucmkd.methods import METHODS

    runs = out / "runs"
    for m in sorted(METHODS.names()):
        _train(runs / m, [f"method.name={m}"] + ELSEWHERE.get(m, []))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ucmkd"]
    _train(runs / "ddp-ucmkd", ["method.name=ucmkd"], prefix=torchrun)
    killed = runs / "resumed-ucmkd"
    shutil.rmtree(killed, ignore_errors=True)
    r = subprocess.run([sys.executable, "-c", KILLER, str(killed), "2", *OVERRIDES, "method.name=ucmkd"],
                       env=_env(), cwd=ROOT)
    if r.returncode != -signal.SIGKILL:
        raise SystemExit(f"the run to kill ended with status {r.returncode}, not SIGKILL")
    _train(killed, ["method.name=ucmkd"])
    for d in sorted(runs.iterdir()):
        shutil.copy(d / "result.json", out / f"{d.name}.json")
    print(f"recorded {len(list(out.glob('*.json')))} result.json files in {out}")


def _flat(d, prefix: str = "") -> dict:
    if isinstance(d, dict) and d:
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _same(a, b) -> bool:
    """Equal, NaN equal to NaN (e.g. a teacher-free run's teacher accuracy)."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


def compare(before: Path, after: Path) -> int:
    bad, added = 0, set()
    names = sorted({p.name for p in before.glob("*.json")} | {p.name for p in after.glob("*.json")})
    for name in names:
        a, b = before / name, after / name
        if not (a.is_file() and b.is_file()):
            print(f"{name[:-5]:16s} missing in {before if not a.is_file() else after}")
            bad += 1
            continue
        fa, fb = (_flat(json.loads(p.read_text())) for p in (a, b))
        diff = {k: (fa.get(k), fb.get(k)) for k in sorted(fa)
                if not k.startswith(VOLATILE) and not (k in fb and _same(fa[k], fb[k]))}
        added.update(k for k in fb if k not in fa)
        bad += bool(diff)
        print(f"{name[:-5]:16s} {'identical' if not diff else 'DIFFERS: ' + json.dumps(diff, default=str)}")
    print(f"{len(names) - bad} of {len(names)} runs identical in every field of the first record but "
          f"{', '.join(VOLATILE)}" + (f"; fields only the second has: {', '.join(sorted(added))}" if added else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("record", "compare"):
        raise SystemExit(__doc__)
    if sys.argv[1] == "record":
        record(Path(sys.argv[2]))
    else:
        raise SystemExit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
