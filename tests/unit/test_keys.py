"""Content-derived keys: a changed input retrains, an unchanged one is reused; a run directory
holds one run, and a finished run loads back with the same keys as a fresh one."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import ucmkd.engine.trainer as trainer_mod
from ucmkd.api import prepare, run
from ucmkd.cache import FULL_HASH_BYTES, array_digest, content_key, model_signature, signature_diff
from ucmkd.config import RunConfig
from ucmkd.data import RawModality, load_modality, register_dataset
from ucmkd.engine import get_teacher, load_checkpoint
from ucmkd.engine.teacher import teacher_dir
from ucmkd.errors import DataError
from ucmkd.models import Classifier

from factories import run_config

# a dataset registered README-style, without a fingerprint, whose columns a test can change
SOURCE = {"cols": slice(0, 6)}
_RNG = np.random.default_rng(0)
_Y = np.arange(240) % 4
_X = (_RNG.normal(size=(240, 12)) + _Y[:, None]).astype(np.float32)


@register_dataset("keys-test/feat")
def _feat(cfg):
    return RawModality(x=_X[:, SOURCE["cols"]].copy(), y=_Y.copy(), classes=["c0", "c1", "c2", "c3"], kind="vector")


def _cfg(tmp_path, **optim):
    return run_config(None, 2, tmp_path / "cache", data=("keys-test/feat", "synthetic/b"), **{
        "model.teacher_width": 8, "model.student_width": 8, "model.teacher_feat_dim": 8, "model.student_feat_dim": 8,
        "teacher.epochs": 2, "teacher.batch_size": 32, "optim.steps_per_epoch": 2, "optim.batch_size": 16,
        **{f"optim.{k}": v for k, v in optim.items()}})


@pytest.fixture
def no_training(monkeypatch):
    """Any training from here on fails the test."""
    def fail(self, *a, **k):
        raise AssertionError("trained although the cache should have been used")

    def arm():
        monkeypatch.setattr(trainer_mod.Trainer, "fit", fail)
    return arm


# --------------------------------------------------------------------------- fingerprints
def test_array_digest_is_full_below_the_limit_and_bounded_above():
    a = np.arange(1000, dtype=np.float32)
    b = a.copy()
    b[500] += 1
    assert array_digest(a) != array_digest(b) and array_digest(a) == array_digest(a.copy())
    assert array_digest(torch.from_numpy(a)) == array_digest(a)       # tensors hash like arrays
    assert array_digest(a.astype(np.float64))["sha256"] != array_digest(a)["sha256"]
    big = np.zeros(FULL_HASH_BYTES // 4 + 1024, dtype=np.float32)      # just above the limit
    d = array_digest(big)
    assert d["sampled"] is True and d["shape"] == [big.size]
    big[0] = 1.0                                                        # the first chunk is hashed
    assert array_digest(big) != d


def test_modality_fingerprint_follows_content_not_the_name():
    cfg = RunConfig().data
    SOURCE["cols"] = slice(0, 6)
    a = load_modality("keys-test/feat", cfg)
    again = load_modality("keys-test/feat", cfg)
    SOURCE["cols"] = slice(6, 12)            # other columns of the same arrays: same shape
    b = load_modality("keys-test/feat", cfg)
    SOURCE["cols"] = slice(0, 6)
    assert a.fingerprint == again.fingerprint
    assert a.fingerprint["shape"] == b.fingerprint["shape"] and a.fingerprint["content"] != b.fingerprint["content"]
    other_split = load_modality("keys-test/feat", RunConfig().data.__class__(split_seed=1))
    assert other_split.fingerprint["content"] != a.fingerprint["content"]


def test_teacher_cache_retrains_for_changed_data_and_reuses_unchanged(tmp_path, no_training):
    """A dataset registered README-style (no fingerprint) changes its columns: the teacher retrains;
    back to the first columns, the cached teacher is reused."""
    cfg = _cfg(tmp_path)
    SOURCE["cols"] = slice(0, 6)
    t1, info1 = get_teacher(cfg, load_modality("keys-test/feat", cfg.data))
    SOURCE["cols"] = slice(6, 12)
    t2, info2 = get_teacher(cfg, load_modality("keys-test/feat", cfg.data))
    assert info2["path"] != info1["path"]                     # another cache entry: retrained
    assert any(not torch.equal(a, b) for a, b in zip(t1.state_dict().values(), t2.state_dict().values()))
    no_training()
    SOURCE["cols"] = slice(0, 6)                               # back to the first data: reused
    _, again = get_teacher(cfg, load_modality("keys-test/feat", cfg.data))
    assert again == info1


def test_npz_key_follows_content_not_mtime(tmp_path):
    """Rewritten with the same size and the old mtime: another key. Touched only: the same key."""
    cfg = _cfg(tmp_path)
    f = tmp_path / "d.npz"
    x = np.random.default_rng(0).random((60, 5)).astype(np.float32)
    np.savez(f, x=x, y=np.arange(60) % 4)
    st = f.stat()
    k1 = teacher_dir(cfg, load_modality(f"npz:{f}", cfg.data))
    x[7, 2] += 0.5
    np.savez(f, x=x, y=np.arange(60) % 4)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    k2 = teacher_dir(cfg, load_modality(f"npz:{f}", cfg.data))
    assert k2 != k1
    os.utime(f, ns=(1, 1))
    assert teacher_dir(cfg, load_modality(f"npz:{f}", cfg.data)) == k2


@pytest.mark.slow
def test_keys_are_the_same_in_another_process(tmp_path):
    cfg = _cfg(tmp_path)
    f = tmp_path / "d.npz"
    np.savez(f, x=np.random.default_rng(0).random((60, 5)).astype(np.float32), y=np.arange(60) % 4)
    here = teacher_dir(cfg, load_modality(f"npz:{f}", cfg.data))
    code = ("import sys; from ucmkd.config import RunConfig; from ucmkd.data import load_modality; "
            "from ucmkd.engine.teacher import teacher_dir; c = RunConfig(); c.data.cache_dir = sys.argv[2]; "
            "c.model.teacher_width = c.model.teacher_feat_dim = 8; c.teacher.epochs = 2; c.teacher.batch_size = 32; "
            "print(teacher_dir(c, load_modality('npz:' + sys.argv[1], c.data)))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code, str(f), cfg.data.cache_dir], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(here)


def test_model_signature_names_what_differs():
    a = Classifier(nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 8)), 8, 4, (5,))
    b = Classifier(nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Linear(32, 8)), 8, 4, (5,))
    c = Classifier(nn.Sequential(nn.Linear(5, 16), nn.GELU(), nn.Linear(16, 8)), 8, 4, (5,))
    sa = model_signature(a)
    assert sa == model_signature(Classifier(nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 8)), 8, 4, (5,)))
    assert "encoder.0.weight [16, 5] -> [32, 5]" in signature_diff(sa, model_signature(b))
    assert "encoder.1 ReLU -> GELU" in signature_diff(sa, model_signature(c))
    assert content_key(sa) != content_key(model_signature(c))


# --------------------------------------------------------------------------- run directories
def _mlp(width):
    return Classifier(nn.Sequential(nn.Linear(12, width), nn.ReLU(), nn.Linear(width, 8)), 8, 4, (12,),
                      name=f"mlp{width}")


def _run_cfg(tmp_path, **optim):
    cfg = _cfg(tmp_path, **optim)
    cfg.data.teacher, cfg.data.student = "synthetic/a", "keys-test/feat"
    cfg.data.synthetic = cfg.data.synthetic.__class__(n_items=240, num_classes=4)
    cfg.method.name = "kd"
    SOURCE["cols"] = slice(0, 12)
    return cfg


def test_a_run_dir_of_another_model_config_or_data_is_a_named_error(tmp_path):
    """The same call with a wider student (or another lr, or changed data) does not return the first
    run's result: a named error, and the directory is left as it was."""
    cfg = _run_cfg(tmp_path)
    d = tmp_path / "run"
    first = run(cfg, run_dir=d, student_model=_mlp(16))
    with pytest.raises(DataError) as ei:
        run(cfg, run_dir=d, student_model=_mlp(32))
    msg = str(ei.value)
    assert str(d) in msg and "student model" in msg and "encoder.0.weight [16, 12] -> [32, 12]" in msg
    with pytest.raises(DataError, match=r"config optim\.lr: 0\.003 -> 0\.01"):
        run(_run_cfg(tmp_path, lr=0.01), run_dir=d, student_model=_mlp(16))
    SOURCE["cols"] = slice(0, 12)
    original = _X[0, 0].copy()
    _X[0, 0] += 1.0                                            # the student's data changed
    try:
        with pytest.raises(DataError, match=r"student data 'keys-test/feat': content"):
            run(cfg, run_dir=d, student_model=_mlp(16))
    finally:
        _X[0, 0] = original                                    # exactly (x + 1 - 1 != x in float32)
    # the directory was left as it was: the same run still loads back
    again = run(cfg, run_dir=d, student_model=_mlp(16))
    assert again["test_acc"] == first["test_acc"] and again["key"] == first["key"]


def test_a_finished_run_loads_back_like_a_fresh_one(tmp_path, no_training):
    """The README's `best_student = result["distiller"].student` on a re-run (new model object,
    another initialisation: the key is the architecture, not the initial weights)."""
    cfg = _run_cfg(tmp_path)
    d = tmp_path / "run"
    torch.manual_seed(0)
    fresh = run(cfg, run_dir=d, student_model=_mlp(16))
    no_training()
    torch.manual_seed(1)
    mine = _mlp(16)
    again = run(cfg, run_dir=d, student_model=mine)
    assert set(again) == set(fresh)
    assert again["distiller"].student is mine
    best = load_checkpoint(d / "best.pt")["model"]["student"]
    for k, v in mine.state_dict().items():
        assert torch.equal(v, best[k]), k
    x = fresh["distiller"].student.eval()(torch.zeros(3, 12))
    assert torch.equal(mine.eval()(torch.zeros(3, 12)), x)


def test_resume_false_moves_the_old_run_aside(tmp_path):
    cfg = _run_cfg(tmp_path)
    d = tmp_path / "run"
    first = run(cfg, run_dir=d, student_model=_mlp(16))
    run(cfg, run_dir=d, student_model=_mlp(32), resume=False)
    aside = tmp_path / f"run.stale-{first['key']}"
    assert json.loads((aside / "result.json").read_text())["key"] == first["key"]
    assert json.loads((d / "result.json").read_text())["key"] != first["key"]


def test_run_key_covers_teacher_weights_and_data(tmp_path):
    cfg = _run_cfg(tmp_path)
    ctx = prepare(cfg)
    assert set(ctx.fingerprints) == {"student_data", "teacher_data", "student_model", "teacher"}
    other_teacher = ctx.teacher.__class__(ctx.teacher.encoder, ctx.teacher.feat_dim, 4, ctx.teacher.input_shape)
    ctx2 = prepare(cfg, teacher=other_teacher, teacher_data=ctx.teacher_data)   # another (random) head
    assert ctx2.key != ctx.key and ctx2.fingerprints["teacher"] != ctx.fingerprints["teacher"]
    assert prepare(cfg).key == ctx.key                                          # same inputs, same key


def test_grid_reruns_a_cell_whose_data_changed(tmp_path):
    from ucmkd.config import ExperimentConfig, from_dict
    from ucmkd.experiment import run_experiment

    f = tmp_path / "s.npz"
    rng = np.random.default_rng(0)
    y = np.arange(240) % 4
    np.savez(f, x=(rng.normal(size=(240, 6)) + y[:, None]).astype(np.float32), y=y,
             classes=np.array(["c0", "c1", "c2", "c3"]))
    exp = from_dict(ExperimentConfig, {
        "name": "t", "methods": ["ce"], "seeds": [0], "directions": [["synthetic/a", f"npz:{f}"]],
        "base": {"data": {"synthetic": {"n_items": 240, "num_classes": 4}, "cache_dir": str(tmp_path / "c")},
                 "model": {"teacher_width": 8, "student_width": 8, "teacher_feat_dim": 8, "student_feat_dim": 8},
                 "optim": {"epochs": 1, "steps_per_epoch": 1, "batch_size": 16},
                 "teacher": {"epochs": 1, "batch_size": 32}}})
    quiet = {"progress": False, "log": lambda *a: None}
    run_experiment(exp, tmp_path / "out", **quiet)
    run_experiment(exp, tmp_path / "out", **quiet)                  # unchanged: reused
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 1
    np.savez(f, x=(rng.normal(size=(240, 6)) + y[:, None]).astype(np.float32), y=y,
             classes=np.array(["c0", "c1", "c2", "c3"]))
    res = run_experiment(exp, tmp_path / "out", **quiet)            # changed: run again
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["fingerprints"]["student_data"] != rows[1]["fingerprints"]["student_data"]
    assert res["results"][0]["fingerprints"] == rows[1]["fingerprints"]
    assert any(p.name.startswith("seed0.stale-") for p in (tmp_path / "out" / "runs").rglob("seed0*"))
