"""TensorBoard logging (logging.tensorboard=true): the event files read back, resume without
duplicated steps, and a clear error without the optional package."""
import json
import subprocess
import sys

import pytest

from ucmkd.api import load_pair, prepare, run, run_key
from ucmkd.engine import get_teacher
from ucmkd.engine.strategies import StandardStrategy
from ucmkd.errors import ConfigError

from factories import small_config

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

EPOCHS, STEPS = 2, 3


class Killed(BaseException):
    """Stands for SIGKILL (no handler of the library catches it)."""


def _cfg():
    return small_config("ucmkd", EPOCHS, **{"logging.tensorboard": True})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cfg = _cfg()
    cfg.data.cache_dir = str(tmp_path_factory.mktemp("cache"))
    student, teacher_data = load_pair(cfg)
    teacher, info = get_teacher(cfg, teacher_data)
    return cfg, dict(student=student, teacher_data=teacher_data, teacher=teacher, teacher_info=info)


def events(log_dir):
    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def test_event_file_has_the_expected_tags_and_steps(data, tmp_path):
    cfg, kw = data
    res = run(cfg, run_dir=tmp_path / "r", **kw)
    ev = events(tmp_path / "r" / "tb")
    total = EPOCHS * STEPS
    for tag in ("train/ce", "train/kd", "train/la", "train/fa", "train/ce_fallback", "train/lr",
                "ot/fa/iterations", "ot/fa/plan_entropy"):
        assert [s for s, _ in ev[tag]] == list(range(1, total + 1)), tag
    for tag in ("val/student/acc", "val/student/loss", "val/fallback/acc", "epoch/pl_threshold"):
        assert [s for s, _ in ev[tag]] == [STEPS * (e + 1) for e in range(EPOCHS)], tag
    for tag in ("diagnostics/fa_classwise", "diagnostics/teacher_head_acc", "diagnostics/selected_is_student"):
        assert [s for s, _ in ev[tag]] == [total + 1], tag
    assert not any(t.startswith("test") for t in ev)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    # TensorBoard stores float32: relative rounding 2^-24 per value, a mean of 3 adds ~2 more
    for e, row in enumerate(rows):
        ce = [v for s, v in ev["train/ce"] if e * STEPS < s <= (e + 1) * STEPS]
        assert sum(ce) / STEPS == pytest.approx(row["train_ce"], rel=1e-6)
        assert ev["val/student/acc"][e][1] == pytest.approx(row["val_acc"], rel=1e-6)
        assert ev["val/fallback/acc"][e][1] == pytest.approx(row["fallback_val_acc"], rel=1e-6)
    assert ev["diagnostics/fa_classwise"][0][1] == pytest.approx(res["diag_fa_classwise"], rel=1e-6)
    iters = [v for _, v in ev["ot/fa/iterations"]]
    assert all(1 <= v <= 10 and v == int(v) for v in iters)       # small_config: n_iter 10


def test_solver_statistics_are_tags_not_epoch_columns(data, tmp_path):
    # the OT statistics travel in the method's metrics as diagnostics ("ot/fa/..."): TensorBoard
    # tags of their own, never train_* averages in metrics.jsonl, and asked for only while logging
    cfg, kw = data
    res = run(cfg, run_dir=tmp_path / "r", **kw)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert rows and not any("/" in k or "ot" in k.split("_") for row in rows for k in row)
    ev = events(tmp_path / "r" / "tb")
    assert {t for t in ev if t.startswith("ot/")} == {"ot/fa/iterations", "ot/fa/plan_entropy"}
    assert not any(t.startswith("train/ot") for t in ev)
    assert res["distiller"].step_diagnostics is False


def test_resume_does_not_duplicate_steps(data, tmp_path, monkeypatch):
    cfg, kw = data
    ref = run(cfg, run_dir=tmp_path / "ref", **kw)
    orig, calls = StandardStrategy.step, {"n": 0}

    def dying(self, batch):
        calls["n"] += 1
        if calls["n"] == STEPS + 2:          # killed in the middle of the second epoch
            raise Killed
        return orig(self, batch)

    monkeypatch.setattr(StandardStrategy, "step", dying)
    with pytest.raises(Killed):
        run(cfg, run_dir=tmp_path / "r", **kw)
    before = events(tmp_path / "r" / "tb")
    assert max(s for s, _ in before["train/ce"]) == STEPS + 1    # a step logged after the last commit
    monkeypatch.setattr(StandardStrategy, "step", orig)
    res = run(cfg, run_dir=tmp_path / "r", **kw)
    assert res["test_acc"] == ref["test_acc"]
    ev, ev_ref = events(tmp_path / "r" / "tb"), events(tmp_path / "ref" / "tb")
    assert set(ev) == set(ev_ref)
    for tag, points in ev.items():
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)) == [s for s, _ in ev_ref[tag]], tag
    assert ev["train/ce"] == ev_ref["train/ce"]       # the resumed run is the uninterrupted one


def test_logging_is_not_part_of_the_run_key(data):
    cfg, kw = data
    off = _cfg()
    off.data.cache_dir = cfg.data.cache_dir
    off.logging.tensorboard = False
    assert run_key(off) == run_key(cfg)
    assert prepare(off, **kw).key == prepare(cfg, **kw).key


def test_a_run_without_a_directory_is_told_where_to_log(data):
    cfg, kw = data
    with pytest.raises(ConfigError, match="tensorboard_dir"):
        run(cfg, **kw)


def test_without_tensorboard_the_core_imports_and_the_error_says_how_to_install(data, monkeypatch):
    code = ("import sys; sys.modules['tensorboard'] = None; sys.modules['torch.utils.tensorboard'] = None\n"
            "import ucmkd, ucmkd.cli, ucmkd.api, ucmkd.engine.tb_logger\n"
            "from ucmkd.engine.tb_logger import require_tensorboard\n"
            "try:\n    require_tensorboard()\nexcept ucmkd.ConfigError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR logging.tensorboard=true needs the optional package 'tensorboard'" in out.stdout
    assert "pip install ucmkd[tensorboard]" in out.stdout
    cfg, kw = data
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"ucmkd\[tensorboard\]"):
        prepare(cfg, **kw)
