"""Training loop: schedule, selection on validation, exact resume, NaN detection, teacher cache."""
import json
import math

import pytest
import torch

from ucmkd.api import run
from ucmkd.config import SyntheticConfig
from ucmkd.engine import get_teacher, load_checkpoint, warmup_cosine
from ucmkd.engine.teacher import teacher_dir
from ucmkd.errors import NumericalError
from ucmkd.data import load_modality

from factories import small_config


def test_warmup_cosine_schedule():
    lrs = [warmup_cosine(s, 100, 10, 1e-3, 1e-6) for s in range(100)]
    assert lrs[0] < lrs[5] < lrs[9] == pytest.approx(1e-3, rel=1e-15)   # min + (base - min): 2 roundings
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 1e-5


def test_resume_equals_uninterrupted(tmp_path):
    cfg = small_config(epochs=4)
    full = run(cfg, run_dir=tmp_path / "full")
    # interrupted after 2 epochs, then resumed to the end
    from ucmkd.api import run as run2
    import ucmkd.engine.trainer as tr

    orig_fit = tr.Trainer.fit
    tr.Trainer.fit = lambda self, stop_after=None: orig_fit(self, stop_after=2)
    try:
        part = run2(cfg, run_dir=tmp_path / "part")
    finally:
        tr.Trainer.fit = orig_fit
    assert part["epochs"] == 2
    (tmp_path / "part" / "result.json").unlink()
    resumed = run(cfg, run_dir=tmp_path / "part")
    assert resumed["epochs"] == 4
    a = load_checkpoint(tmp_path / "full" / "latest.pt")["model"]["student"]
    b = load_checkpoint(tmp_path / "part" / "latest.pt")["model"]["student"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["test_acc"] == full["test_acc"]
    assert resumed["best_epoch"] == full["best_epoch"]
    # a finished run is loaded back, not re-run: the same keys, a distiller with the best weights
    stamp = (tmp_path / "full" / "result.json").stat().st_mtime_ns
    again = run(cfg, run_dir=tmp_path / "full")
    assert (tmp_path / "full" / "result.json").stat().st_mtime_ns == stamp
    assert set(again) == set(full) and again["key"] == full["key"]
    assert {k: v for k, v in again.items() if k not in ("distiller", "seconds")} == \
        {k: v for k, v in full.items() if k not in ("distiller", "seconds")}
    best = load_checkpoint(tmp_path / "full" / "best.pt")["model"]["student"]
    for k, v in again["distiller"].student.state_dict().items():
        assert torch.equal(v, best[k]), k
    for k, v in full["distiller"].student.state_dict().items():
        assert torch.equal(v, best[k]), k


def test_selection_on_validation_and_outputs(tmp_path):
    res = run(small_config("ce", epochs=5), run_dir=tmp_path)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    best = max(rows, key=lambda r: (r["val_acc"], -r["val_loss"]))
    assert res["best_epoch"] == best["epoch"]
    assert res["test_acc"] == best["test_acc"]   # test reported at the best *validation* epoch
    for f in ("config.yaml", "metrics.csv", "latest.pt", "best.pt", "result.json"):
        assert (tmp_path / f).is_file(), f
    assert load_checkpoint(tmp_path / "best.pt")["best"]["epoch"] == res["best_epoch"]


def test_nan_loss_is_detected_and_reported(tmp_path, monkeypatch):
    cfg = small_config("ce", epochs=3)
    import ucmkd.methods.ce as ce

    calls = {"n": 0}
    orig = ce.CE.forward

    def poisoned(self, batch):
        out = orig(self, batch)
        calls["n"] += 1
        if calls["n"] > 4:   # after the first epoch (3 steps) succeeded
            out.losses["ce"] = out.losses["ce"] * float("nan")
        return out

    monkeypatch.setattr(ce.CE, "forward", poisoned)
    with pytest.raises(NumericalError, match=r"loss 'ce'.*epoch 1.*latest.pt"):
        run(cfg, run_dir=tmp_path)
    # the work done before the failure is kept
    assert load_checkpoint(tmp_path / "latest.pt")["epoch"] == 1


def test_teacher_is_cached_and_keyed(tmp_path):
    cfg = small_config()
    cfg.data.cache_dir = str(tmp_path)
    data = load_modality("synthetic/a", cfg.data)
    m1, info1 = get_teacher(cfg, data)
    assert (teacher_dir(cfg, data) / "teacher.pt").is_file()
    m2, info2 = get_teacher(cfg, data)   # reused: same weights, no retraining
    assert info2 == info1
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert not m2.training and not any(p.requires_grad for p in m2.parameters())
    other = small_config()
    other.data.cache_dir = str(tmp_path)
    other.teacher.seed = 1
    assert teacher_dir(other, data) != teacher_dir(small_config(cache_dir=tmp_path), data)
    assert info1["test_acc"] > 0.5 and math.isfinite(info1["val_acc"])   # chance: 0.25 (4 classes)


def test_teacher_key_follows_the_data_recipe_not_just_the_shape(tmp_path):
    """(A user's file changed in content only: tests/unit/test_keys.py.)"""
    cfg = small_config()
    base = teacher_dir(cfg, load_modality("synthetic/b", cfg.data))
    noisier = small_config()
    noisier.data.synthetic = SyntheticConfig(n_items=400, num_classes=4, noise=1.5)   # same shape
    assert teacher_dir(noisier, load_modality("synthetic/b", noisier.data)) != base
