"""ReviewKD and C2KD baselines: contract, golden values, the C2KD filter, extras, end to end."""
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

from ucmkd.api import run
from ucmkd.config import RunConfig
from ucmkd.data.pairing import Batch
from ucmkd.errors import ConfigError
from ucmkd.losses.c2kd import drop_target, kendall_tau
from ucmkd.losses.reviewkd import hcl, hcl_pair
from ucmkd.methods import build_distiller
from ucmkd.models import build_classifier

import references as ref
from helpers import check_contract

HCL_GOLDEN = 2.011506   # hcl(HCL_PAIRS) in float64, pinned to 6 decimals

SIGNAL, IMAGE = ((1, 12), "signal"), ((1, 8, 8), "image")


def models(student=SIGNAL, teacher=IMAGE, s_width=4, t_width=4, s_feat=6, k=3):
    torch.manual_seed(0)
    t = build_classifier(teacher[0], teacher[1], k, width=t_width, feat_dim=8, name="teacher[t]")
    s = build_classifier(student[0], student[1], k, width=s_width, feat_dim=s_feat, name="student[s]")
    return s, t


def batch_for(s, t, n=10, k=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    return Batch(torch.randn(n, *s.input_shape, generator=g), y, torch.randn(n, *t.input_shape, generator=g), y)


def check_extras(d, batch):
    """The generic contract (helpers.check_contract), and every extra module gets a gradient."""
    check_contract(d, batch)
    extra_grads = [p.grad for p in d.extra.parameters()]
    assert extra_grads and all(g is not None for g in extra_grads), "an extra module got no gradient"


# ----------------------------------------------------------------------------- ReviewKD
@pytest.mark.parametrize("student,teacher,conv", [(SIGNAL, IMAGE, torch.nn.Conv1d),
                                                  (IMAGE, IMAGE, torch.nn.Conv2d),
                                                  (SIGNAL, ((1, 16), "signal"), torch.nn.Conv1d),
                                                  (IMAGE, SIGNAL, torch.nn.Conv2d)])
def test_reviewkd_contract(student, teacher, conv):
    s, t = models(student, teacher, s_width=3)
    d = build_distiller("reviewkd", s, t)
    d.progress = 1.0   # past the warm-up: the HCL term is active
    n_pairs = min(len(s.encoder.stages), len(t.encoder.stages))
    assert len(d.extra["abf"]) == d.n_pairs == n_pairs
    assert all(isinstance(m, conv) for m in d.extra["abf"].modules()
               if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)))
    assert "projector" not in d.extra
    b = batch_for(s, t)
    out = d(b)
    assert float(out.losses["hcl"].detach()) > 0
    # ABF outputs carry the matched teacher stages' channel counts, deepest pairs aligned
    with torch.no_grad():
        outs = d.review(s.encoder.forward_stages(b.xs))
        t_maps = t.encoder.forward_stages(b.xt)[-n_pairs:]
    assert [o.shape[1] for o in outs] == [m.shape[1] for m in t_maps]
    check_extras(d, b)


def test_reviewkd_warmup_ramps_linearly():
    s, t = models()
    d = build_distiller("reviewkd", s, t, {"warmup": 0.5, "weight": 2.0})
    b = batch_for(s, t)
    d.eval()   # same BN behaviour for every forward
    d.progress = 1.0
    full = d(b).losses["hcl"]
    d.progress = 0.25
    assert torch.equal(d(b).losses["hcl"], 0.5 * full)       # weights 0.5 and 2: exact scalings
    d.progress = 0.0
    assert float(d(b).losses["hcl"].detach()) == 0.0
    with torch.no_grad():
        raw = hcl(d.review(s.encoder.forward_stages(b.xs)), t.encoder.forward_stages(b.xt)[-d.n_pairs:])
    assert torch.equal(full, 2.0 * raw)


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_reviewkd_rejects_mlp(side):
    mlp = build_classifier((16,), "vector", 3, width=4, feat_dim=8, name=f"{side}[digits/vec]")
    s, t = models()
    s, t = (mlp, t) if side == "student" else (s, mlp)
    with pytest.raises(ConfigError) as ei:
        build_distiller("reviewkd", s, t)
    msg = str(ei.value)
    assert "cnn1d/cnn2d" in msg and "ReviewKD needs multi-stage feature maps" in msg
    assert f"{side} '{side}[digits/vec]'" in msg and "mlp" in msg


def test_reviewkd_rejects_encoder_without_stages():
    s, t = models()

    class Plain(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)

    t.encoder = Plain()
    with pytest.raises(ConfigError, match="without forward_stages.*cnn1d/cnn2d"):
        build_distiller("reviewkd", s, t)


def _np_pool1d(x, n):
    """Adaptive average pooling of the last axis to n bins (PyTorch's bin edges)."""
    length = x.shape[-1]
    return np.stack([x[..., (i * length) // n: -(-((i + 1) * length) // n)].mean(-1) for i in range(n)], -1)


def _np_pool2d(x, n):
    return np.swapaxes(_np_pool1d(np.swapaxes(_np_pool1d(x, n), -1, -2), n), -1, -2)


def _arr(shape, c):
    return np.sin(np.arange(int(np.prod(shape))) * 0.7 + c).reshape(shape)


# (student shape, teacher shape): same 1-D shape; 2-D of different sizes; 1-D vs 2-D
HCL_PAIRS = [((1, 2, 4), (1, 2, 4)), ((1, 1, 2, 2), (1, 1, 3, 3)), ((1, 2, 3), (1, 2, 2, 2))]


def test_hcl_golden_values():
    fs = [_arr(s, 0.3 * i) for i, (s, _) in enumerate(HCL_PAIRS)]
    ft = [_arr(t, 1.1 + 0.5 * i) for i, (_, t) in enumerate(HCL_PAIRS)]

    def mse(a, b):
        return float(((a - b) ** 2).mean())

    # pair 0: full resolution (w 1), level 2 (w 1/2), level 1 (w 1/4); level 4 = full size, skipped
    e0 = (mse(fs[0], ft[0]) + 0.5 * mse(_np_pool1d(fs[0], 2), _np_pool1d(ft[0], 2))
          + 0.25 * mse(fs[0].mean(-1), ft[0].mean(-1))) / 1.75
    # pair 1: sizes differ -> no full term; levels 2 (w 1) and 1 (w 1/2); largest extent 3 < 4
    e1 = (mse(_np_pool2d(fs[1], 2), _np_pool2d(ft[1], 2))
          + 0.5 * mse(fs[1].mean((-1, -2)), ft[1].mean((-1, -2)))) / 1.5
    # pair 2: 1-D vs 2-D -> flatten the teacher's 2x2 positions to 4, pool both to 2 and 1 bins
    tf = ft[2].reshape(1, 2, 4)
    e2 = (mse(_np_pool1d(fs[2], 2), _np_pool1d(tf, 2)) + 0.5 * mse(fs[2].mean(-1), tf.mean(-1))) / 1.5
    ts = [torch.tensor(a) for a in fs]
    tt = [torch.tensor(a) for a in ft]
    for a, b, e in zip(ts, tt, (e0, e1, e2)):
        assert float(hcl_pair(a, b)) == pytest.approx(e, rel=1e-12)
    total = float(hcl(ts, tt))
    assert total == pytest.approx(e0 + e1 + e2, rel=1e-12)
    assert round(total, 6) == HCL_GOLDEN


def test_hcl_gradient_reaches_student_only():
    fs = torch.randn(2, 3, 5, requires_grad=True)
    ft = torch.randn(2, 3, 4, 4, requires_grad=True)
    hcl([fs], [ft]).backward()
    assert fs.grad is not None and float(fs.grad.abs().sum()) > 0
    assert ft.grad is None


# ----------------------------------------------------------------------------- C2KD
def test_kendall_tau_matches_scipy():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(25, 7, generator=g, dtype=torch.float64)
    b = torch.randn(25, 7, generator=g, dtype=torch.float64)
    b[0] = a[0] * 2 + 1      # perfectly concordant
    b[1] = -a[1]             # perfectly discordant
    tau = kendall_tau(a, b)
    assert tau.shape == (25,)
    ref = np.array([kendalltau(x, y)[0] for x, y in zip(a.numpy(), b.numpy())])
    np.testing.assert_allclose(tau.numpy(), ref, atol=1e-12)
    assert float(tau[0]) == 1.0 and float(tau[1]) == -1.0
    assert torch.equal(kendall_tau(a[:, :1], b[:, :1]), torch.zeros(25, dtype=torch.float64))


def test_drop_target_keeps_order():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]])
    assert torch.equal(drop_target(x, torch.tensor([1, 3])), torch.tensor([[0.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))


def test_c2kd_contract():
    s, t = models(k=5)
    d = build_distiller("c2kd", s, t, {"krc": -1.0})
    assert {"student_proxy", "teacher_proxy"} <= set(d.extra) and "projector" not in d.extra
    check_extras(d, batch_for(s, t, k=5))


def _proxies(d, b):
    z, logits = d.student(b.xs, return_features=True)
    with torch.no_grad():
        zt, t_logits = d.teacher(b.xt, return_features=True)
    return logits, t_logits, d.extra["student_proxy"](z), d.extra["teacher_proxy"](zt)


@pytest.mark.parametrize("krc", [1.0, -1.0, 0.0])
def test_c2kd_filter(krc):
    k = 6
    s, t = models(k=k)
    d = build_distiller("c2kd", s, t, {"krc": krc, "temperature": 2.0, "weight": 0.5})
    d.train()   # batch statistics: the same outputs on every forward of this batch
    b = batch_for(s, t, n=16, k=k)
    out = d(b)
    logits, t_logits, s_proxy, t_proxy = _proxies(d, b)
    ys = b.ys.numpy()
    tau = np.array([kendalltau(np.delete(tl, y), np.delete(sl, y))[0]
                    for tl, sl, y in zip(t_logits.numpy(), logits.detach().numpy(), ys)])
    keep = np.ones(16, bool) if krc <= -1 else tau > krc
    assert float(d.kept_fraction) == keep.mean()        # k / 16: exact in float32

    def softmax(v):
        e = np.exp(v - v.max())
        return e / e.sum()

    def nt_kl(stu, tea):   # T^2 * KL over non-target classes, summed over kept rows / B
        total = 0.0
        for i in np.nonzero(keep)[0]:
            ps = softmax(np.delete(stu[i], ys[i]).astype(np.float64) / 2.0)
            pt = softmax(np.delete(tea[i], ys[i]).astype(np.float64) / 2.0)
            total += float((pt * (np.log(pt) - np.log(ps))).sum())
        return 4.0 * total / 16

    sp, tp = s_proxy.detach().numpy(), t_proxy.detach().numpy()
    exp_t2s, exp_s2t = 0.5 * nt_kl(sp, tp), 0.5 * nt_kl(tp, sp)
    kd_t2s, kd_s2t = float(out.losses["kd_t2s"].detach()), float(out.losses["kd_s2t"].detach())
    # float32: each KL row takes ~20 roundings of terms summing to T^2 sum p (|log p| + |log q|)
    # <= T^2 * 2 (2 max|logit| / T + log(K - 1)); weight 0.5, kept rows / B
    lmax = float(np.abs(np.concatenate([sp, tp])).max())
    scale = 0.5 * 4.0 * 2 * (lmax + np.log(k - 1)) * keep.sum() / 16
    assert kd_t2s == pytest.approx(exp_t2s, abs=ref.f32_bound(20, scale))
    assert kd_s2t == pytest.approx(exp_s2t, abs=ref.f32_bound(20, scale))
    if krc == 1.0:
        assert not keep.any()
        assert kd_t2s == 0.0 and kd_s2t == 0.0
        assert out.losses["kd_t2s"].requires_grad and out.losses["kd_s2t"].requires_grad
        out.total.backward()   # still part of the graph
    elif krc == -1.0:
        assert keep.all() and kd_t2s > 0
    else:
        assert 0 < keep.sum() < 16, "seed should give a mixed filter"


def test_c2kd_directions_are_detached():
    s, t = models()
    d = build_distiller("c2kd", s, t, {"krc": -1.0})
    b = batch_for(s, t)
    out = d(b)
    sp, tp = d.extra["student_proxy"].weight, d.extra["teacher_proxy"].weight

    def grads(name):
        d.zero_grad(set_to_none=True)
        out.losses[name].backward(retain_graph=True)
        return sp.grad, tp.grad, next(s.head.parameters()).grad

    g_sp, g_tp, g_head = grads("kd_t2s")      # student proxy <- teacher proxy
    assert g_sp is not None and g_tp is None and g_head is None
    g_sp, g_tp, _ = grads("kd_s2t")           # teacher proxy <- student proxy
    assert g_sp is None and g_tp is not None
    g_sp, _, g_head = grads("s_proxy_kl")     # student proxy <- student logits
    assert g_sp is not None and g_head is None
    g_sp, _, g_head = grads("s_self_kl")      # student logits <- student proxy
    assert g_sp is None and g_head is not None
    g_sp, g_tp, _ = grads("t_proxy_ce")
    assert g_sp is None and g_tp is not None


@pytest.mark.parametrize("name", ["reviewkd", "c2kd"])
def test_extras_are_trainable_and_saved(name):
    s, t = models()
    d = build_distiller(name, s, t)
    ids = {id(p) for p in d.trainable_parameters()}
    extra = list(d.extra.parameters())
    assert extra and all(id(p) in ids for p in extra)
    assert not any(id(p) in ids for p in t.parameters())
    keys = set(d.trainable_state_dict()["extra"])
    prefixes = ("abf.",) if name == "reviewkd" else ("student_proxy.", "teacher_proxy.")
    assert keys and all(k.startswith(prefixes) for k in keys)
    assert all(any(k.startswith(p) for k in keys) for p in prefixes)
    state = {k: {n: v.clone() + 1 for n, v in sd.items()} for k, sd in d.trainable_state_dict().items()}
    d.load_trainable_state_dict(state)
    for n, v in d.extra.state_dict().items():
        assert torch.equal(v, state["extra"][n])


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("digits_cache")   # one teacher shared by both runs


@pytest.mark.slow
@pytest.mark.parametrize("name,loss", [("reviewkd", "hcl"), ("c2kd", "kd_t2s")])
def test_end_to_end_digits(name, loss, digits_cache, tmp_path):
    cfg = RunConfig()
    cfg.data.teacher, cfg.data.student = "digits/image", "digits/signal"
    cfg.data.mnist1d_samples = 600
    cfg.data.cache_dir = str(digits_cache)
    cfg.optim.epochs, cfg.optim.steps_per_epoch, cfg.optim.batch_size, cfg.optim.warmup_epochs = 2, 2, 16, 1
    cfg.teacher.epochs = 1
    cfg.model.teacher_width = cfg.model.student_width = 4
    cfg.model.teacher_feat_dim, cfg.model.student_feat_dim = 16, 8
    cfg.method.name = name
    res = run(cfg, run_dir=tmp_path / "run")
    assert res["epochs"] == 2 and 0.0 <= res["test_acc"] <= 1.0
    hist = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(hist) == 2
    assert all(math.isfinite(row[f"train_{loss}"]) for row in hist)
    assert all(math.isfinite(row["train_ce"]) for row in hist)
    if name == "reviewkd":   # epoch 0 at progress 0: warm-up weight 0; epoch 1 at 0.5 > warmup
        assert hist[0]["train_hcl"] == 0.0 and hist[1]["train_hcl"] > 0.0
    assert res["teacher_test_acc"] > 0.0
