"""Every method's loss terms against the independent float64 references of tests/support/references.py
(OT feature alignment excepted: tests/unit/test_ot.py holds it against POT). Each method runs in
float64 and in eval mode (batch-norm with running statistics, so the features a reference
starts from are the model's own on each input); the terms must agree to REL64."""
import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

import references as ref
from ucmkd.data.pairing import Batch
from ucmkd.engine.distributed import TrainableView
from ucmkd.engine.shadow import CEShadow
from ucmkd.methods import METHODS, build_distiller
from ucmkd.models import build_classifier

K = 3


def setup(student_feat=6, teacher_items="matched"):
    """Double-precision teacher (image, d_t = 8) and student (signal, d_s = student_feat); a batch
    of 10 student items; teacher items item for item (``matched``) or one per class (``one``)."""
    torch.manual_seed(0)
    teacher = build_classifier((1, 8, 8), "image", K, width=4, feat_dim=8).double().eval()
    student = build_classifier((1, 12), "signal", K, width=4, feat_dim=student_feat).double()
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 2])
    xs = torch.randn(10, 1, 12, generator=g, dtype=torch.float64)
    if teacher_items == "one":
        xt, yt = torch.randn(K, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(K)
    else:
        xt, yt = torch.randn(10, 1, 8, 8, generator=g, dtype=torch.float64), y.clone()
    xu = torch.randn(10, 1, 12, generator=g, dtype=torch.float64)
    # untrained nets predict one class for every input: set their batch-norm statistics to these
    # inputs' (so eval-mode features vary) and spread the heads (so predictions do too)
    with torch.no_grad():
        for model, x in ((teacher, xt), (student, torch.cat([xs, xu]))):
            for mod in model.modules():
                if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                    mod.momentum = 1.0
            model.train()(x)
            model.eval()
            model.head.weight.mul_(4.0)
    return teacher, student, Batch(xs, y, xt, yt, xu)


def build(name, student, teacher, **params):
    cls = METHODS.get(name)
    d = build_distiller(name, student, teacher if cls.uses_teacher else None, params).double()
    d.eval()
    d.progress = 1.0            # past every warm-up ramp
    return d


def np_(t):
    return t.detach().double().numpy()


def features(model, x):
    model.eval()
    with torch.no_grad():
        z, logits = model(x, return_features=True)
    return np_(z), np_(logits)


def check(out, expected: dict, skip=()):
    got = {k: float(v.detach()) for k, v in out.losses.items() if k not in skip}
    assert set(got) == set(expected), (sorted(got), sorted(expected))
    for k, e in expected.items():
        assert got[k] == pytest.approx(e, rel=ref.REL64, abs=1e-14), k


# --------------------------------------------------------------------------- teacher-free
@pytest.mark.parametrize("name,ls", [("ce", 0.0), ("ce-ls", 0.1)])
def test_ce_and_label_smoothing(name, ls):
    _, student, b = setup()
    d = build(name, student, None)
    _, logits = features(student, b.xs)
    check(d(b), {"ce": ref.ce(logits, b.ys, ls)})


def test_pseudo_label():
    _, student, b = setup()
    _, logits = features(student, b.xs)
    _, lu = features(student, b.xu)
    p = ref.softmax(lu)
    tau = float(np.median(p.max(1)))          # a threshold that splits this batch
    mask = p.max(1) >= tau
    assert 0 < mask.sum() < len(mask)
    d = build("pseudo-label", student, None, threshold=tau, w_u=2.0, warmup=0.0)
    pl = 2.0 * float((ref.ce_rows(lu, p.argmax(1)) * mask).sum() / len(lu))
    check(d(b), {"ce": ref.ce(logits, b.ys), "pl": pl})


# --------------------------------------------------------------------------- logit distillation
@pytest.mark.parametrize("name", ["kd", "paired-kd"])
def test_kd(name):
    """paired-kd is checked against the formula, not against its parent class."""
    teacher, student, b = setup()
    d = build(name, student, teacher, temperature=3.0, alpha=0.7)
    _, logits = features(student, b.xs)
    _, tl = features(teacher, b.xt)
    check(d(b), {"ce": 0.3 * ref.ce(logits, b.ys), "kd": 0.7 * ref.kd(logits, tl, 3.0)})


def test_dkd():
    teacher, student, b = setup()
    d = build("dkd", student, teacher, alpha=1.5, beta=6.0, temperature=2.0)
    _, logits = features(student, b.xs)
    _, tl = features(teacher, b.xt)
    tckd, nckd = ref.dkd_terms(logits, tl, b.ys.numpy(), 2.0)
    check(d(b), {"ce": ref.ce(logits, b.ys), "tckd": 1.5 * tckd, "nckd": 6.0 * nckd})


# --------------------------------------------------------------------------- feature distillation
def test_fitnet_and_norm():
    teacher, student, b = setup()
    z, logits = features(student, b.xs)
    zt, _ = features(teacher, b.xt)
    d = build("fitnet", student, teacher, weight=2.0)
    check(d(b), {"ce": ref.ce(logits, b.ys), "fitnet": 2.0 * ref.mse(ref.linear(d.extra["regressor"], z), zt)})
    d = build("norm", student, teacher, n=3, weight=0.5)
    e = ref.linear(d.extra["expander"], z)
    norm = np.mean([ref.mse(e[:, i * 8:(i + 1) * 8], zt) for i in range(3)])
    check(d(b), {"ce": ref.ce(logits, b.ys), "norm": 0.5 * norm})


def test_mmd():
    teacher, student, b = setup()
    d = build("mmd", student, teacher, weight=2.0, factors=[0.5, 2.0])
    z, logits = features(student, b.xs)
    zt, _ = features(teacher, b.xt)
    zp = ref.linear(d.extra["projector"], z)
    check(d(b), {"ce": ref.ce(logits, b.ys), "mmd": 2.0 * ref.mmd2(zp, zt, [0.5, 2.0])})


def test_fa_only_and_the_papers_joint_method():
    """CE and LA terms (the OT term is tests/unit/test_ot.py's)."""
    teacher, student, b = setup()
    z, logits = features(student, b.xs)
    check(build("fa-only", student, teacher, n_iter=10)(b), {"ce": ref.ce(logits, b.ys)}, skip=("fa",))
    d = build("ucmkd-joint", student, teacher, n_iter=10, w_la=0.5)
    th = ref.linear(teacher.head, ref.linear(d.extra["projector"], z))
    check(d(b), {"ce": ref.ce(logits, b.ys), "la": 0.5 * ref.label_alignment(logits, th, b.ys)}, skip=("fa",))


def test_bilevel_outer_loss():
    teacher, student, b = setup()
    d = build("ucmkd-bilevel", student, teacher, n_iter=10, label_smoothing=0.2)
    _, logits = features(student, b.xs)
    check(d(b), {"outer_ce": ref.ce(logits, b.ys, 0.2)})


def test_c2kd():
    """C2KD (Huo et al. 2024): proxies, non-target KL on the rows the Kendall filter keeps
    (tau from SciPy), divided by the whole batch."""
    teacher, student, b = setup()
    d = build("c2kd", student, teacher, temperature=2.0, krc=0.0, weight=0.5)
    z, logits = features(student, b.xs)
    zt, tl = features(teacher, b.xt)
    sp, tp = ref.linear(d.extra["student_proxy"], z), ref.linear(d.extra["teacher_proxy"], zt)
    y = b.ys.numpy()
    tau = np.array([kendalltau(np.delete(t, c), np.delete(s, c))[0] for t, s, c in zip(tl, logits, y)])
    keep = tau > 0.0
    assert 0 < keep.sum() < len(keep), "the filter should split this batch"

    def nt(a):
        return np.stack([np.delete(r, c) for r, c in zip(a, y)])

    def kept_kl(s, t):
        return float((ref.kl_rows(nt(s), nt(t), 2.0) * keep).sum() / len(y))

    check(d(b), {"ce": ref.ce(logits, y), "t_proxy_ce": ref.ce(tp, b.yt),
                 "t_proxy_kl": ref.kd(tp, tl, 2.0), "s_proxy_kl": ref.kd(sp, logits, 2.0),
                 "s_self_kl": ref.kd(logits, sp, 2.0), "kd_t2s": 0.5 * kept_kl(sp, tp),
                 "kd_s2t": 0.5 * kept_kl(tp, sp)})


# --------------------------------------------------------------------------- ucmkd
def test_ucmkd_terms():
    """Teacher items one per class, so each class-level KD target is that class's teacher item;
    every unlabelled item confident (threshold 0); the pseudo-label probabilities are the
    student and teacher heads' average, aligned to the (uniform) teacher prior by the running
    mean of the predictions (momentum m, from 1/K): q = p / mean_p, normalised."""
    teacher, student, b = setup(student_feat=6, teacher_items="one")
    m = 0.9
    d = build("ucmkd", student, teacher, n_iter=10, warmup=0.0, w_kd=2.0, w_la=0.5, w_u=1.5, kd_alpha=1.0,
              kd_beta=4.0, temperature=2.0, momentum=0.0)
    d.extra["prior"].momentum = m
    d.extra["prior"].threshold.fill_(0.0)
    # the default labelled_aug (auto) augments a convolutional student's labelled items weakly
    # (stream 2 of the batch's generator); the CE shadow sees them as given
    assert d.labelled_aug == "weak"
    b.seed = 3
    z, logits = features(student, d.augment(b.xs, "weak", d.augment_generator(b, 2)))
    zu, lu = features(student, b.xu)
    _, tl = features(teacher, b.xt)
    proj = d.extra["projector"]
    y = b.ys.numpy()
    shadow = CEShadow.attach(d)              # the trainer's plain-CE shadow adds its loss to the step's
    out = TrainableView(d, shadow)(b)

    def class_kd(s_logits, labels):
        tckd, nckd = ref.dkd_terms(s_logits, tl[labels], labels, 2.0)    # teacher item c has class c
        return 1.0 * tckd + 4.0 * nckd

    th = ref.linear(teacher.head, ref.linear(proj, z))
    thu = ref.linear(teacher.head, ref.linear(proj, zu))
    p = 0.5 * (ref.softmax(lu) + ref.softmax(thu))
    mean_p = m * np.full(K, 1.0 / K) + (1 - m) * p.mean(0)
    q = p / mean_p
    q /= q.sum(1, keepdims=True)
    yhat = q.argmax(1)
    expected = {"ce": ref.ce(logits, y), "kd": 2.0 * class_kd(logits, y), "la": 0.5 * ref.ce(th, y),
                "pl": 1.5 * ref.ce(lu, yhat), "kd_u": 1.5 * 2.0 * class_kd(lu, yhat),
                "la_u": 1.5 * 0.5 * ref.ce(thu, yhat),
                "ce_fallback": ref.ce(features(d.extra["fallback"], b.xs)[1], y)}
    check(out, expected, skip=("fa",))
    assert out.metrics["pl_mask"] == 1.0
    assert len(set(yhat)) > 1, "a one-class pseudo-labelling would hide the alignment"
