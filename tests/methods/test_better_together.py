"""``better-together``: a student head shared by both modalities' labelled batches, no teacher."""
import math

import numpy as np
import pytest
import torch

from ucmkd.api import prepare, run
from ucmkd.data.pairing import Batch
from ucmkd.errors import ConfigError
from ucmkd.export import load_student
from ucmkd.methods import METHODS, build_distiller
from ucmkd.models import build_classifier

from factories import run_config


def _ce_ref(z: np.ndarray, w: np.ndarray, b: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of the linear head (w [K, d], b [K]) on features z [B, d], float64."""
    logits = z @ w.T + b
    m = logits.max(1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(1, keepdims=True)))[:, 0]
    return float(np.mean(lse - logits[np.arange(len(y)), y]))


def _tiny(share_trunk=True, other_shape=(1, 8, 8), w_other=0.7):
    torch.manual_seed(0)
    student = build_classifier((1, 12), "signal", 3, width=4, feat_dim=6).double()
    kind = "image" if len(other_shape) == 3 else "signal"
    other = build_classifier(other_shape, kind, 3, width=4, feat_dim=6).double()
    d = build_distiller("better-together", student, None, {"w_other": w_other, "share_trunk": share_trunk})
    d.attach_other_modality(other)
    g = torch.Generator().manual_seed(1)
    batch = Batch(torch.randn(10, 1, 12, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 2]),
                  torch.randn(7, *other_shape, generator=g, dtype=torch.float64), torch.tensor([2, 2, 1, 0, 1, 0, 2]))
    return d.train(), batch   # batch-norm on batch statistics: the features depend on the batch only


def test_registry_flags():
    cls = METHODS.get("better-together")
    assert not cls.uses_teacher and cls.uses_other_modality and cls.draws_teacher_modality()
    assert cls.teacher_free(cls.parse_params({}))


def test_loss_against_a_hand_computation():
    """Two encoders (image vs signal inputs), one head: each CE by hand from the models' own features."""
    d, batch = _tiny()
    assert "other_encoder" in d.extra
    out = d(batch)
    assert set(out.losses) == {"ce", "ce_other"}
    with torch.no_grad():
        zs = d.student.encoder(batch.xs).numpy()
        zo = d.extra["other_encoder"](batch.xt).numpy()
    assert np.abs(zo).sum() > 0
    w, b = d.student.head.weight.detach().numpy(), d.student.head.bias.detach().numpy()
    assert float(out.losses["ce"].detach()) == pytest.approx(_ce_ref(zs, w, b, batch.ys.numpy()), rel=1e-12)
    assert float(out.losses["ce_other"].detach()) == pytest.approx(0.7 * _ce_ref(zo, w, b, batch.yt.numpy()),
                                                                    rel=1e-12)
    assert out.logits.shape == (10, 3)
    # the head is shared: the other modality's CE reaches the student head and the other encoder,
    # never the student encoder
    out.losses["ce_other"].backward()
    assert d.student.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.student.encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.extra["other_encoder"].parameters())
    # only the student and the other encoder are trained: no parameter listed twice
    ids = [id(p) for p in d.trainable_parameters()]
    assert len(ids) == len(set(ids))


def test_same_input_shape_shares_the_trunk():
    d, batch = _tiny(other_shape=(1, 12))
    assert "other_encoder" not in d.extra
    out = d(batch)
    with torch.no_grad():
        zo = d.student.encoder(batch.xt).numpy()
    w, b = d.student.head.weight.detach().numpy(), d.student.head.bias.detach().numpy()
    assert np.abs(zo).sum() > 0
    assert float(out.losses["ce_other"].detach()) == pytest.approx(0.7 * _ce_ref(zo, w, b, batch.yt.numpy()),
                                                                    rel=1e-12)
    d2, _ = _tiny(other_shape=(1, 12), share_trunk=False)
    assert "other_encoder" in d2.extra


def test_w_other_is_validated_and_named():
    student = build_classifier((1, 12), "signal", 3, width=4, feat_dim=6)
    with pytest.raises(ConfigError, match="w_other"):
        build_distiller("better-together", student, None, {"w_other": -1.0})
    with pytest.raises(ConfigError, match="w_other"):
        build_distiller("better-together", student, None, {"w_other": float("nan")})


def _digits_cfg():
    return run_config("better-together", 2, data=("digits/image", "digits/signal"), **{
        "pairing.label_budget": 5, "optim.steps_per_epoch": 3, "optim.batch_size": 32,
        "model.teacher_width": 8, "model.student_width": 8})


def test_prepare_draws_the_other_modality_without_a_teacher():
    ctx = prepare(_digits_cfg(), train_teacher=False)
    assert ctx.teacher is None and ctx.distiller.teacher is None
    assert "other_encoder" in ctx.distiller.extra          # image vs signal inputs: two encoders
    batch = next(iter(ctx.sampler.epoch(0)))
    assert batch.xt is not None and batch.yt is not None and batch.xt.shape[1:] == ctx.teacher_data.input_shape


@pytest.mark.slow
def test_digits_image_to_signal_end_to_end(tmp_path):
    """A short run through the Python API: it trains and its numbers are finite (no accuracy
    threshold: a short run's accuracy moves with the CPU's BLAS path)."""
    res = run(_digits_cfg(), run_dir=tmp_path / "r")
    assert res["method"] == "better-together" and res["epochs"] == 2
    assert math.isfinite(res["test_acc"]) and 0.0 <= res["test_acc"] <= 1.0
    loaded = load_student(tmp_path / "r")                  # only the student is exported
    x = torch.zeros(2, *loaded.model.input_shape)
    assert loaded.model(x).shape == (2, 10)
