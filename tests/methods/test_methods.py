"""Every method: finite losses, gradient reaches the student, the teacher stays frozen in eval."""
import dataclasses

import numpy as np
import pytest
import torch

import references as ref
from ucmkd.losses.kd import kd_kl
from ucmkd.losses.label_alignment import label_alignment
from ucmkd.methods import METHODS, build_distiller
from ucmkd.models import build_classifier

from helpers import check_contract, tiny

# regression pins (7 decimals) of the NumPy float64 references
KD_GOLDEN = 0.0947360
LA_GOLDEN = 0.0824470


# settings that make every loss term of a method live on the tiny batch (c2kd's Kendall filter
# keeps every item); OT methods use fewer Sinkhorn iterations for speed
LIVE = {"c2kd": {"krc": -1.0}}


@pytest.mark.parametrize("name", METHODS.names())
@pytest.mark.parametrize("student_feat", [8, 6])
def test_method_contract(name, student_feat):
    """Every registered method (a new one is covered by registering it): see helpers.check_contract."""
    teacher, student, batch = tiny(student_feat)
    cls = METHODS.get(name)
    params = dict(LIVE.get(name, {}))
    if "n_iter" in {f.name for f in dataclasses.fields(cls.Params)}:
        params["n_iter"] = 10
    d = build_distiller(name, student, teacher if cls.uses_teacher else None, params)
    if cls.uses_other_modality:          # as ucmkd.api.prepare does: an untrained teacher-modality model
        d.attach_other_modality(build_classifier((1, 8, 8), "image", 3, width=4, feat_dim=student_feat))
    d.progress = 0.5                     # past every warm-up, so every loss term is live
    check_contract(d, batch)


# (every method's loss terms against float64 references: tests/methods/test_loss_references.py)
KD_S, KD_T = [[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]], [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
LA_S, LA_TH, LA_Y = [[2.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 3.0]], [0, 1]


def test_kd_golden_value():
    """T^2 KL at T = 4: float64 against the NumPy reference and the pinned value (7 decimals);
    float32 within the bound of its ~16 roundings on terms summing to T^2 sum p(|log p| + |log q|)."""
    T = 4.0
    expected = ref.kd(KD_S, KD_T, T)
    assert abs(expected - KD_GOLDEN) <= 5e-8
    got64 = float(kd_kl(torch.tensor(KD_S, dtype=torch.float64), torch.tensor(KD_T, dtype=torch.float64), T))
    assert got64 == pytest.approx(expected, rel=ref.REL64)
    lt, ls = ref.log_softmax(np.array(KD_T) / T), ref.log_softmax(np.array(KD_S) / T)
    scale = T * T * float(np.mean((np.exp(lt) * (np.abs(lt) + np.abs(ls))).sum(1)))
    assert abs(float(kd_kl(torch.tensor(KD_S), torch.tensor(KD_T), T)) - expected) <= ref.f32_bound(16, scale)


def test_label_alignment_golden_value_and_sign():
    expected = ref.label_alignment(LA_S, LA_TH, LA_Y)
    assert abs(expected - LA_GOLDEN) <= 5e-8
    th = torch.tensor(LA_TH, dtype=torch.float64, requires_grad=True)
    la = label_alignment(torch.tensor(LA_S, dtype=torch.float64), th, torch.tensor(LA_Y))
    assert float(la.detach()) == pytest.approx(expected, rel=ref.REL64)
    la.backward()
    # as coded by the authors: descending LA lowers the teacher head's true-class logit
    assert th.grad[0, 0] > 0 and th.grad[1, 1] > 0


def test_label_alignment_without_teacher_gradient_is_the_ave_scripts_term():
    """teacher_grad=False (the AVE script runs h_T under no_grad): same value, no gradient into
    the teacher-head logits, so LA's gradient is the student CE's; with the default it flows."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    th = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (6,), generator=g)
    off = label_alignment(s, th, y, teacher_grad=False)
    on = label_alignment(s, th, y)
    assert float(off.detach()) == float(on.detach())
    gs_off, gt_off = torch.autograd.grad(off, (s, th), allow_unused=True)
    (gs_ce,) = torch.autograd.grad(torch.nn.functional.cross_entropy(s, y), (s,))
    assert gt_off is None and torch.allclose(gs_off, gs_ce, rtol=1e-14, atol=1e-15)
    gt_on = torch.autograd.grad(on, (th,))[0]
    assert float(gt_on.abs().sum()) > 0
    teacher, student, batch = tiny()
    d = build_distiller("ucmkd-joint", student, teacher, {"la_teacher_grad": False, "n_iter": 10})
    assert d.params.la_teacher_grad is False and torch.isfinite(d(batch).total)


def _outside(rng):
    """A value outside the range ``(lo, hi, lo_open, hi_open)`` of a ranged field."""
    lo, hi, lo_open, hi_open = rng
    if lo is not None:
        return lo if lo_open else lo - 1
    return hi if hi_open else hi + 1


def test_every_method_params_field_is_validated_by_the_config_machinery():
    """Each method's ``Params`` declares its ranges (``ranged``) and choices (``CHOICES``), so a
    bad value fails at parse time and for ``Params(...)`` built in Python, naming the field."""
    from dataclasses import fields, replace

    from ucmkd.config import choices_of
    from ucmkd.errors import ConfigError
    from ucmkd.methods import METHODS

    checked = 0
    for name in METHODS.names():
        cls = METHODS.get(name)
        for f in fields(cls.Params):
            bad = None
            if "range" in f.metadata:
                bad = _outside(f.metadata["range"])
            elif f.name in choices_of(cls.Params):
                bad = "no-such-choice"
            if bad is None:
                continue
            with pytest.raises(ConfigError, match=rf"method\.params\.{f.name}: "):
                cls.parse_params({f.name: bad})
            with pytest.raises(ConfigError, match=rf"method\.params\.{f.name}: "):
                cls(*_models_for(cls), params=replace(cls.Params(), **{f.name: bad}))
            checked += 1
    assert checked >= 44      # every ranged or choice field of the 19 built-in methods


def _models_for(cls):
    from helpers import tiny

    teacher, student, _ = tiny()
    return student, teacher
