"""The bilevel strategy: its functional AdamW against torch.optim.AdamW, the whole step against a
deepcopy + fresh-AdamW reference (tests/support/paper_reference.py), the projector, the logged terms,
and the engine's independence from any method."""
import copy
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import paper_reference as ref
from ucmkd.data.pairing import Batch
from ucmkd.engine.precision import Precision
from ucmkd.engine.strategies import BilevelStrategy, FunctionalAdamW, InnerAdamW
from ucmkd.errors import ConfigError
from ucmkd.methods import METHODS, Distiller, build_distiller
from ucmkd.models import Classifier, build_classifier
from torch import nn

F64_EPS, F32_EPS = torch.finfo(torch.float64).eps, torch.finfo(torch.float32).eps


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_functional_adamw_matches_torch_adamw(dtype):
    """Six steps on four tensors, one of which has no gradient for its first two steps (torch
    skips it: no decay, no step count) and one never (left untouched)."""
    g = torch.Generator().manual_seed(0)
    init = {n: torch.randn(*s, generator=g, dtype=dtype) for n, s in
            [("a", (5, 3)), ("b", (7,)), ("late", (4, 2)), ("never", (3,))]}
    grads = [{n: (None if (n == "late" and k < 2) or n == "never" else torch.randn(*t.shape, generator=g, dtype=dtype)
                  * 10.0 ** (k - 3)) for n, t in init.items()} for k in range(6)]
    cfg = InnerAdamW(lr=3e-3, weight_decay=0.05)
    oracle = {n: t.clone().requires_grad_(True) for n, t in init.items()}
    opt = torch.optim.AdamW(list(oracle.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    fun, params = FunctionalAdamW(cfg), {n: t.clone() for n, t in init.items()}
    for gk in grads:
        for n, q in oracle.items():
            q.grad = gk[n]
        opt.step()
        params = fun.step(params, gk)
    # per step each element goes through ~10 roundings, each contributing <= eps |p| plus
    # <= eps of an update of size <= lr (|m / denom| <= ~1): 6 steps -> 60 eps |p| + 60 eps lr
    for n, q in oracle.items():
        tol = 60 * (F64_EPS if dtype == torch.float64 else F32_EPS)
        assert torch.allclose(params[n], q.detach(), rtol=tol, atol=tol * cfg.lr), n
        assert params[n].requires_grad == (n != "never")   # updated tensors are new leaves
    assert torch.equal(params["never"], init["never"])
    assert fun.state["late"][0] == 4 and fun.state["a"][0] == 6


def _plain_student(feat_dim):
    """Linear-ReLU-BN-Linear encoder: batch-norm buffers, but no parameter whose gradient is zero
    up to rounding (a bias right before batch norm), where Adam's lr * g / (|g| + eps) turns
    rounding noise into an O(lr) step and only a loose comparison is possible (see below)."""
    enc = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, feat_dim))
    return Classifier(enc, feat_dim, 4, (1, 12), name="student")


def _models(student_feat, dtype=torch.float64, backbone="plain"):
    torch.manual_seed(0)
    teacher = build_classifier((1, 8, 8), "image", 4, width=4, feat_dim=8).to(dtype).eval()
    student = (_plain_student(student_feat) if backbone == "plain" else
               build_classifier((1, 12), "signal", 4, width=4, feat_dim=student_feat)).to(dtype)
    return teacher, student


def _distiller(name, student, teacher, params, dtype=torch.float64):
    return build_distiller(name, student, teacher, params).to(dtype)   # the projector too


def _batch(step, dtype=torch.float64, n=16):
    g = torch.Generator().manual_seed(step)
    return Batch(torch.randn(n, 1, 12, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g),
                 torch.randn(n, 1, 8, 8, generator=g, dtype=dtype))


BILEVEL = {"n_iter": 20, "inner_lr": 1e-2, "inner_wd": 0.05, "label_smoothing": 0.1}


def _compare_with_reference(student_feat, n1, n2, backbone, steps=3):
    """Run ``steps`` bilevel steps of ucmkd and of the deepcopy + fresh-AdamW reference in float64;
    returns (distiller, reference student, reference projector, projector before)."""
    teacher, student = _models(student_feat, backbone=backbone)
    params = {**BILEVEL, "n1": n1, "n2": n2}
    d = _distiller("ucmkd-bilevel", student, teacher, params)
    assert ("projector" in d.extra) == (student_feat != 8)
    ref_student = copy.deepcopy(student)
    ref_proj = copy.deepcopy(d.extra["projector"]) if "projector" in d.extra else nn.Identity()
    proj0 = copy.deepcopy(ref_proj)
    opt = torch.optim.AdamW(d.trainable_parameters(), lr=1e-2, weight_decay=0.05)
    ref_opt = torch.optim.AdamW(list(ref_student.parameters()) + list(ref_proj.parameters()), lr=1e-2,
                                weight_decay=0.05)
    strat = BilevelStrategy(d, opt, clip_norm=5.0)
    d.train()
    ref_student.train()
    p = {**params, "metric": "cosine", "eps": 0.1, "clip": 5.0}
    for step in range(steps):
        batch = _batch(step)
        strat.step(batch)
        ref.bilevel_step(ref_student, ref_proj, teacher, ref_opt, batch, p)
    return d, ref_student, ref_proj, proj0


def _assert_same(d, ref_student, ref_proj, tol):
    for (n, a), b in zip(d.student.named_parameters(), ref_student.parameters()):
        assert torch.allclose(a, b, rtol=tol, atol=tol), n
    for (n, a), b in zip(d.student.named_buffers(), ref_student.buffers()):
        assert torch.allclose(a.double(), b.double(), rtol=tol, atol=tol), n
    for (n, a), b in zip(d.extra.named_parameters(), ref_proj.parameters()):
        assert torch.allclose(a, b, rtol=tol, atol=tol), n


@pytest.mark.parametrize("n1,n2", [(1, 1), (2, 3)])
@pytest.mark.parametrize("student_feat", [8, 6])   # 6: widths differ, a projector is added
def test_bilevel_step_matches_deepcopy_reference(student_feat, n1, n2):
    """Three steps of BilevelStrategy against the deepcopy + fresh torch.optim.AdamW reference in
    float64: parameters, batch-norm buffers and the projector."""
    d, ref_student, ref_proj, proj0 = _compare_with_reference(student_feat, n1, n2, "plain")
    # the two sides differ only in operation order (cost normalisation, AdamW kernels): ~1e-15
    # relative per operation; 3 steps through 20-iteration Sinkhorn gradients stay below 1e-11
    _assert_same(d, ref_student, ref_proj, 1e-11)
    if "projector" in d.extra:   # it trained (inner FA steps) and the update persisted
        assert not torch.allclose(d.extra["projector"].weight, proj0.weight)
    bn = d.student.encoder[3]
    assert int(bn.num_batches_tracked) == 3 * (n1 + n2 + 1)   # one update per forward at theta'


def test_bilevel_step_matches_reference_on_a_library_backbone():
    """The cnn1d backbone has a Linear bias right before batch norm: its true gradient is 0, so
    both sides step it by lr * g / (|g| + 1e-8) of their own rounding noise g (<= 100 eps of the
    O(1) gradient terms): up to 3 steps * lr / 1e-8 * 100 eps ~ 7e-8 apart; everything else is
    held to the same bound."""
    d, ref_student, ref_proj, _ = _compare_with_reference(6, 2, 3, "cnn")
    _assert_same(d, ref_student, ref_proj, 3 * (1e-2 / 1e-8) * 100 * F64_EPS)
    assert int(d.student.encoder.stages[0][1].num_batches_tracked) == 3 * (2 + 3 + 1)


def test_bilevel_float32_step_matches_reference_within_float32_rounding():
    teacher, student = _models(8, torch.float32)
    d = _distiller("ucmkd-bilevel", student, teacher, {**BILEVEL, "n1": 2, "n2": 1}, torch.float32)
    ref_student = copy.deepcopy(student)
    opt = torch.optim.AdamW(d.trainable_parameters(), lr=1e-2, weight_decay=0.05)
    ref_opt = torch.optim.AdamW(ref_student.parameters(), lr=1e-2, weight_decay=0.05)
    p = {**BILEVEL, "n1": 2, "n2": 1, "metric": "cosine", "eps": 0.1, "clip": 5.0}
    before = [q.detach().clone() for q in student.parameters()]
    BilevelStrategy(d, opt, 5.0).step(_batch(0, torch.float32))
    ref.bilevel_step(ref_student, torch.nn.Identity(), teacher, ref_opt, _batch(0, torch.float32), p)
    # Adam's step lr * m / (sqrt(v) + eps) has the relative error of the gradient (|g| >> 1e-8
    # here), and the float32 gradients through 100 Sinkhorn iterations carry <= ~1e3 eps of
    # relative error: the updates agree to 1e3 eps ~ 1.2e-4 of their size
    for a, b, w0 in zip(student.parameters(), ref_student.parameters(), before):
        da, db = a.detach() - w0, b.detach() - w0
        assert float((da - db).norm() / db.norm()) <= 1e3 * F32_EPS


def test_bilevel_does_not_deepcopy_nor_build_an_optimizer(monkeypatch):
    teacher, student = _models(8, torch.float32)
    d = build_distiller("ucmkd-bilevel", student, teacher, {"n_iter": 5})
    strat = BilevelStrategy(d, torch.optim.AdamW(d.trainable_parameters()), 5.0)

    def forbidden(*a, **k):
        raise AssertionError("called in the bilevel step")

    monkeypatch.setattr(copy, "deepcopy", forbidden)
    monkeypatch.setattr(torch.optim.Optimizer, "__init__", forbidden)
    logs = strat.step(_batch(0, torch.float32))
    assert set(logs) == {"inner_fa", "inner_head_ce", "inner_head_la", "outer_ce"}
    assert teacher.head.weight.grad is None


@pytest.mark.parametrize("student_feat", [8, 6])
def test_bilevel_logs_name_the_terms(student_feat):
    """inner_head_ce is the head step's CE (label smoothing 0.1) on the features at theta'
    after the FA step; inner_head_la subtracts mean(kappa_y CE(h_T(z), y)), the value the
    scripts log as LA (dropped where the widths differ); outer_ce is the outer CE at theta'."""
    teacher, student = _models(student_feat)
    params = {**BILEVEL, "n1": 1, "n2": 1, "inner_lr": 0.0, "inner_wd": 0.0}   # theta' = theta
    d = _distiller("ucmkd-bilevel", student, teacher, params)
    batch = _batch(0)
    probe = copy.deepcopy(student).train()
    with torch.no_grad():
        probe.encoder(batch.xs)            # the FA step's forward moves the BN statistics once
        z = probe.encoder(batch.xs)
        head_ce = ref.ce(probe.head(z), batch.ys, 0.1)
        t = teacher.head(z) if student_feat == 8 else None
        kappa_term = ((t.softmax(1).gather(1, batch.ys[:, None]).squeeze(1) * ref.ce(t, batch.ys, 0.1, "none")).mean()
                      if t is not None else 0.0)
        outer = ref.ce(probe(batch.xs), batch.ys, 0.1)
    logs = BilevelStrategy(d, torch.optim.SGD(d.trainable_parameters(), lr=0.0), 5.0).step(batch)
    assert logs["inner_head_ce"] == pytest.approx(float(head_ce), rel=1e-12)
    assert logs["inner_head_la"] == pytest.approx(float(head_ce - kappa_term), rel=1e-12)
    assert logs["outer_ce"] == pytest.approx(float(outer), rel=1e-12)
    if student_feat == 8:
        assert logs["inner_head_la"] < logs["inner_head_ce"]


def test_fp16_scaler_logic_of_both_strategies_on_cpu():
    """The GradScaler path (CUDA fp16 in practice) exercised on CPU with a CPU scaler and no
    autocast: power-of-two scaling is exact, so the step equals the unscaled one; an
    overflowing scale skips the step and halves the scale."""
    teacher, student = _models(8, torch.float32)
    results = []
    for scale in (None, 2.0 ** 10, 3e38):
        s = copy.deepcopy(student)
        d = _distiller("ucmkd-bilevel", s, teacher, {**BILEVEL, "n1": 1, "n2": 1}, torch.float32)
        prec = Precision("fp32")
        if scale is not None:
            prec.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        before = [q.detach().clone() for q in s.parameters()]
        batch = _batch(0, torch.float32)
        if scale == 3e38:     # first-layer gradients ~1e6 x those of the unit inputs: scaled, they overflow
            batch.xs = batch.xs * 1e6
        logs = BilevelStrategy(d, torch.optim.AdamW(d.trainable_parameters(), lr=1e-2), 5.0, prec).step(batch)
        results.append(([q.detach().clone() for q in s.parameters()], before, logs, prec))
    for a, b in zip(results[0][0], results[1][0]):
        assert torch.equal(a, b)
    overflow_after, overflow_before, logs, prec = results[2]
    assert logs.get("skipped_step") == 1.0 and all(torch.equal(a, b) for a, b in zip(overflow_after, overflow_before))
    assert prec.loss_scale < 3e38


# --------------------------------------------------------------------------- genericity
def test_engine_strategies_name_no_method_nor_method_parameter():
    src = (Path(__file__).parents[2] / "src/ucmkd/engine/strategies.py").read_text()
    for name in METHODS.names():   # as a string, or as a word where the name has a hyphen
        assert f'"{name}"' not in src and f"'{name}'" not in src, name
        if "-" in name:
            assert not re.search(rf"(?<![\w.\-]){re.escape(name)}(?![\w\-])", src), name
    for token in ("inner_lr", "inner_wd", "n1", "n2", "label_smoothing", "projector", ".fa(", "params."):
        assert token not in src, token


class _InnerCE(Distiller):
    """A toy method on the bilevel hooks: inner CE steps on the head, outer CE; not registered."""

    name = "toy-inner-ce"
    uses_teacher = False
    strategy = "bilevel"

    @dataclass
    class Params:
        lr: float = 0.1

    def bilevel_parameters(self):
        return [n for n, _ in self.named_parameters() if n.startswith("student.head.")]

    def bilevel_optimizer(self):
        return InnerAdamW(lr=self.params.lr)

    def bilevel_stages(self):
        return [("head", 2)]

    def bilevel_inner_loss(self, stage, batch, cache):
        loss = F.cross_entropy(self.student(batch.xs), batch.ys)
        return loss, {"toy_inner": loss}

    def bilevel_outer_loss(self, batch, cache):
        loss = F.cross_entropy(self.student(batch.xs), batch.ys)
        return loss, {"toy_outer": loss}

    def bilevel_persistent(self):
        return []


def test_any_method_with_the_hooks_runs_bilevel_and_missing_hooks_are_named():
    torch.manual_seed(0)
    student = build_classifier((5,), "vector", 3, width=8, feat_dim=4)
    d = _InnerCE(student, None)
    head0, enc0 = student.head.weight.detach().clone(), student.encoder.embed[1].weight.detach().clone()
    logs = BilevelStrategy(d, torch.optim.SGD(d.trainable_parameters(), lr=0.5), 5.0).step(
        Batch(torch.randn(8, 5), torch.randint(0, 3, (8,))))
    assert set(logs) == {"toy_inner", "toy_outer"}
    assert not torch.equal(head0, student.head.weight)   # outer gradient at theta' applied
    assert not torch.equal(enc0, student.encoder.embed[1].weight)   # outer-only parameters step too
    plain = build_distiller("ce", build_classifier((5,), "vector", 3, width=8, feat_dim=4), None)
    with pytest.raises(ConfigError, match="bilevel_parameters"):
        BilevelStrategy(plain, torch.optim.SGD(plain.trainable_parameters(), lr=0.1))


def test_the_trainer_s_ce_shadow_trains_beside_a_bilevel_method():
    """Any method enables the CE shadow from its params, a bilevel one too: its CE joins the
    outer loss at the real parameters, and only the shadow's parameters take that gradient."""
    from helpers import tiny
    from ucmkd.engine.shadow import CEShadow
    from ucmkd.methods.fallback import FallbackParams

    base = METHODS.get("ucmkd-bilevel")

    @dataclass
    class Params(base.Params, FallbackParams):
        fallback: bool = True

    class WithShadow(base):
        pass

    WithShadow.Params = Params
    teacher, student, batch = tiny()
    d = WithShadow(student, teacher, Params(n_iter=10))
    shadow = CEShadow.attach(d)
    reference = WithShadow(copy.deepcopy(student), copy.deepcopy(teacher), Params(n_iter=10, fallback=False))
    assert CEShadow.attach(reference) is None
    before = {k: v.clone() for k, v in shadow.model.state_dict().items()}
    logs = {}
    for m, sh in ((d, shadow), (reference, None)):
        torch.manual_seed(0)
        opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-2)
        logs[m is d] = BilevelStrategy(m, opt, 5.0, shadow=sh).step(batch)
    assert "ce_fallback" in logs[True] and "ce_fallback" not in logs[False]
    assert any(not torch.equal(v, before[k]) for k, v in shadow.model.state_dict().items()), "the shadow did not move"
    for (n, p), (_, q) in zip(d.student.named_parameters(), reference.student.named_parameters()):
        assert torch.equal(p, q), n          # the shadow never changes the distilled student's update
