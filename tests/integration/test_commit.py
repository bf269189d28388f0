"""One commit point per epoch: a run killed before or after ANY of its writes (checkpoints,
exports, metrics, config, result) resumes to exactly the uninterrupted result."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ucmkd.cache as cache
from ucmkd.api import load_pair, run
from ucmkd.engine import get_teacher, load_checkpoint

from factories import small_config

VOLATILE = ("seconds", "run_dir")      # wall time and the directory's own name


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler of the library sees it (temporaries
    stay on disk, as after a real kill)."""


def _cfg(cache_dir: str):
    # cache_dir module-scoped: set before conftest's per-test cache
    return small_config("ucmkd", 3, cache_dir, **{"optim.steps_per_epoch": 2})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(cfg, run kwargs with a cached teacher, uninterrupted run dir, its write sequence)."""
    cfg = _cfg(str(tmp_path_factory.mktemp("cache")))
    student, teacher_data = load_pair(cfg)
    teacher, info = get_teacher(cfg, teacher_data)
    kw = dict(student=student, teacher_data=teacher_data, teacher=teacher, teacher_info=info)
    ref = tmp_path_factory.mktemp("ref")
    writes = []
    orig = cache._replace

    def record(tmp, path):
        writes.append(Path(path).name)
        orig(tmp, path)

    cache._replace = record
    try:
        run(cfg, run_dir=ref, **kw)
    finally:
        cache._replace = orig
    return cfg, kw, ref, writes


def _result(d: Path) -> dict:
    res = json.loads((d / "result.json").read_text())
    return {k: v for k, v in res.items() if k not in VOLATILE}


def assert_same_run(d: Path, ref: Path) -> None:
    """Every field of result.json (diagnostics included), the metrics and every weight file."""
    assert _result(d) == _result(ref)
    assert (d / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()
    assert (d / "metrics.csv").read_text() == (ref / "metrics.csv").read_text()
    for name in ("best.pt", "best_fallback.pt", "latest.pt"):
        a, b = load_checkpoint(d / name)["model"], load_checkpoint(ref / name)["model"]
        flat_a = {f"{k}.{n}": t for k, sd in (a.items() if "student" in a else [("", a)]) for n, t in sd.items()}
        flat_b = {f"{k}.{n}": t for k, sd in (b.items() if "student" in b else [("", b)]) for n, t in sd.items()}
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            assert torch.equal(flat_a[k], flat_b[k]), f"{name}: {k}"
    assert not list(d.glob(".*.tmp-*")), "temporaries left behind after the resume"


def test_the_run_writes_one_commit_point_per_epoch(setup):
    _, _, _, writes = setup
    assert writes.count("latest.pt") == 3                 # one commit per epoch
    assert writes[:2] == ["key.json", "config.yaml"] and writes[-1] == "result.json"
    # every export of an epoch comes after its commit
    epoch_writes = " ".join(writes[1:-1]).split("latest.pt")[1:]
    assert all("best.pt" in w or "best_fallback.pt" in w or "metrics" in w for w in epoch_writes)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_kill_at_any_write_resumes_to_the_uninterrupted_result(setup, tmp_path, when, monkeypatch):
    cfg, kw, ref, writes = setup
    orig = cache._replace
    for i, name in enumerate(writes):
        d = tmp_path / f"{when}-{i}"
        calls = {"n": 0}

        def crash(tmp, path, i=i):
            if calls["n"] == i and when == "before":
                raise Killed(f"before write {i} ({name})")
            orig(tmp, path)
            if calls["n"] == i:
                raise Killed(f"after write {i} ({name})")
            calls["n"] += 1

        monkeypatch.setattr(cache, "_replace", crash)
        with pytest.raises(Killed):
            run(cfg, run_dir=d, **kw)
        monkeypatch.setattr(cache, "_replace", orig)
        res = run(cfg, run_dir=d, **kw)
        assert set(res) == set(json.loads((ref / "result.json").read_text())) | {"distiller"}
        try:
            assert_same_run(d, ref)
        except AssertionError as e:
            raise AssertionError(f"killed {when} write {i} ({name}): {e}") from None


@pytest.mark.slow
def test_a_real_sigkill_between_the_commit_and_the_exports(setup, tmp_path):
    """A real kill: SIGKILL (in a child process) right after epoch 2's latest.pt,
    before its best.pt; the resumed run restores the right weights (same diagnostics)."""
    cfg, kw, ref, writes = setup
    k = [i for i, w in enumerate(writes) if w == "latest.pt"][1]
    d = tmp_path / "killed"
    tests = Path(__file__).resolve().parent
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(tests)!r})
        import torch; torch.set_num_threads(1)
        import ucmkd.cache as cache
        from ucmkd.api import load_pair, run
        from ucmkd.engine import get_teacher
        from test_commit import _cfg
        orig, n = cache._replace, [0]
        def crash(tmp, path):
            orig(tmp, path)
            if n[0] == {k}:
                os.kill(os.getpid(), signal.SIGKILL)
            n[0] += 1
        cache._replace = crash
        cfg = _cfg({cfg.data.cache_dir!r})
        s, t = load_pair(cfg)
        teacher, info = get_teacher(cfg, t)
        run(cfg, run_dir={str(d)!r}, student=s, teacher_data=t, teacher=teacher, teacher_info=info)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert load_checkpoint(d / "latest.pt")["epoch"] == 2
    assert load_checkpoint(d / "best.pt")["best"]["epoch"] == 1      # the export lags the commit
    run(cfg, run_dir=d, **kw)
    assert_same_run(d, ref)
