"""Teacher-free SSL baselines (ce-aug, fixmatch, freematch): reference values of their losses
computed by hand in float64, the method forwards against those functions, resume-exact
augmentation, mu and augment.labelled, and short end-to-end runs on digits."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from factories import SMALL_STEPS, SMALL_STUDENT, run_config
from helpers import check_contract

from ucmkd.api import key_config, prepare, run, run_key
from ucmkd.augment import batch_generator, get_policy
from ucmkd.data.pairing import Batch
from ucmkd.engine import load_checkpoint
from ucmkd.errors import ConfigError
from ucmkd.losses.semi import FreeMatchThreshold, fixmatch_unlabelled_loss, freematch_fairness
from ucmkd.methods import METHODS, build_distiller
from ucmkd.models import build_classifier

EPS32 = float(np.finfo(np.float32).eps)


def _logits(seed, n=12, k=4, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, k, generator=g, dtype=torch.float64))


def _softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


# --------------------------------------------------------------------------- FixMatch reference
def _fixmatch_by_hand(lw, ls, tau):
    pw = _softmax(lw)
    conf, yhat = pw.max(1), pw.argmax(1)
    mask = conf >= tau
    logp = np.log(_softmax(ls))
    return sum(-logp[i, yhat[i]] for i in range(len(lw)) if mask[i]) / len(lw), mask


@pytest.mark.parametrize("tau", [0.5, 0.95])
def test_fixmatch_loss_matches_a_float64_reference(tau):
    lw, ls = _logits(0), _logits(1)
    ref, mask = _fixmatch_by_hand(lw.numpy(), ls.numpy(), tau)
    assert 0 < mask.sum() < len(mask)           # the case exercises both sides of the threshold
    got64, m64 = fixmatch_unlabelled_loss(lw, ls, tau)
    assert m64.numpy().tolist() == mask.tolist()
    # float64: a dozen log-softmax terms, each a few roundings of magnitude <= ~30
    assert float(got64) == pytest.approx(ref, rel=0, abs=100 * 30 * np.finfo(np.float64).eps)
    got32, _ = fixmatch_unlabelled_loss(lw.float(), ls.float(), tau)
    # float32 inputs: the logits' own rounding (|z| <= ~15, rel. eps/2) dominates: ~ 2 * 15 * eps32 per term
    assert float(got32) == pytest.approx(ref, rel=0, abs=len(lw) * 2 * 15 * EPS32)


def test_fixmatch_loss_is_zero_without_confident_items_and_has_no_gradient_through_targets():
    lw = torch.zeros(5, 3, requires_grad=True)     # uniform: nothing confident
    ls = torch.randn(5, 3, requires_grad=True)
    loss, mask = fixmatch_unlabelled_loss(lw, ls, 0.95)
    assert not mask.any() and float(loss.detach()) == 0.0
    lw2 = (10 * torch.eye(3)[[0, 1, 2, 0, 1]]).requires_grad_(True)
    loss, mask = fixmatch_unlabelled_loss(lw2, ls, 0.95)
    loss.backward()
    assert mask.all() and lw2.grad is None and ls.grad is not None


# --------------------------------------------------------------------------- FreeMatch reference
def _freematch_by_hand(batches, ls_last, m, k):
    tau, pm, hist = 1.0 / k, np.full(k, 1.0 / k), np.full(k, 1.0 / k)
    for lw in batches:
        p = _softmax(lw)
        tau = m * tau + (1 - m) * p.max(1).mean()
        pm = m * pm + (1 - m) * p.mean(0)
        hist = m * hist + (1 - m) * np.bincount(p.argmax(1), minlength=k) / len(p)
    p = _softmax(batches[-1])
    thr = tau * pm / pm.max()
    mask = p.max(1) >= thr[p.argmax(1)]
    ps = _softmax(ls_last)[mask]
    hbar = np.bincount(ps.argmax(1), minlength=k) / len(ps)
    pbar = ps.mean(0)
    ratio = np.where(hbar > 0, pbar / np.where(hbar > 0, hbar, 1), 0.0)
    b = ratio / ratio.sum()
    a = (pm / hist) / (pm / hist).sum()
    fair = float((a * np.log(np.maximum(b, 1e-12))).sum())
    return tau, pm, hist, mask, fair


def test_freematch_thresholds_and_fairness_match_a_float64_reference():
    k, m = 4, 0.3
    batches = [_logits(s, scale=2.0).numpy() for s in (2, 3, 4)]
    ls = _logits(5, scale=2.0)
    tau, pm, hist, mask, fair = _freematch_by_hand(batches, ls.numpy(), m, k)
    th = FreeMatchThreshold(k, m).double()
    for lw in batches:
        th.update(torch.from_numpy(lw).softmax(1))
    _, got_mask = th.mask(torch.from_numpy(batches[-1]).softmax(1))
    tol = 1e3 * np.finfo(np.float64).eps
    assert float(th.tau) == pytest.approx(tau, abs=tol)
    assert np.allclose(th.p_model.numpy(), pm, rtol=0, atol=tol)
    assert np.allclose(th.label_hist.numpy(), hist, rtol=0, atol=tol)
    assert got_mask.numpy().tolist() == mask.tolist() and 0 < mask.sum() < len(mask)
    got = freematch_fairness(ls, got_mask, th.p_model, th.label_hist)
    # a sum of K terms a_c log b_c, |log b_c| <= ~28 where b_c is clamped
    assert float(got) == pytest.approx(fair, abs=k * 30 * tol)


def test_freematch_thresholds_start_at_one_over_k_and_fairness_vanishes_without_confident_items():
    th = FreeMatchThreshold(5)
    assert float(th.tau) == pytest.approx(0.2) and torch.allclose(th.class_thresholds(), torch.full((5,), 0.2))
    ls = torch.randn(4, 5, requires_grad=True)
    assert float(freematch_fairness(ls, torch.zeros(4, dtype=torch.bool), th.p_model, th.label_hist).detach()) == 0.0


# --------------------------------------------------------------------------- the method forwards
def _tiny(name, params=None):
    torch.manual_seed(0)
    student = build_classifier((1, 12), "signal", 3, width=4, feat_dim=8)
    d = build_distiller(name, student, None, params)
    d.set_augmentation("signal")
    g = torch.Generator().manual_seed(1)
    batch = Batch(torch.randn(6, 1, 12, generator=g), torch.randint(0, 3, (6,), generator=g),
                  xu=torch.randn(12, 1, 12, generator=g), seed=1234)
    return d, batch


def _views(d, batch):
    gen = batch_generator(batch.seed, 1, "cpu")
    pol = get_policy("signal")
    xw, xs = pol.apply("weak", batch.xu, gen), pol.apply("strong", batch.xu, gen)
    logits = d.student(torch.cat([batch.xs, xw, xs]))
    return logits[:6], logits[6:18], logits[18:]


def test_fixmatch_forward_is_ce_plus_the_unlabelled_loss_on_its_views():
    d, batch = _tiny("fixmatch", {"threshold": 0.4})
    d.eval()                                       # batch-norm in eval: the two forwards agree exactly
    out = d(batch)
    l, lw, ls = _views(d, batch)
    unsup, mask = fixmatch_unlabelled_loss(lw, ls, 0.4)
    assert torch.equal(out.logits, l)
    assert torch.equal(out.losses["ce"], F.cross_entropy(l, batch.ys)) and torch.equal(out.losses["unsup"], unsup)
    assert out.metrics["mask"] == float(mask.float().mean())


def test_freematch_forward_updates_its_buffers_in_training_only():
    d, batch = _tiny("freematch")
    th = d.extra["threshold"]
    d.eval()
    d(batch)
    assert float(th.tau) == pytest.approx(1 / 3)           # no update in eval
    d.train()
    check_contract(d, batch)
    assert float(th.tau) != pytest.approx(1 / 3)
    assert "threshold.tau" in d.trainable_state_dict()["extra"]      # checkpointed with the model


@pytest.mark.parametrize("name", ["ce-aug", "fixmatch", "freematch"])
def test_contract_and_registration(name):
    cls = METHODS.get(name)
    assert not cls.uses_teacher and cls.labelled_augment == "weak"
    d, batch = _tiny(name)
    check_contract(d, batch)


def test_labelled_items_are_augmented_in_one_place_by_level():
    d, batch = _tiny("ce")
    assert d.augment_labelled(batch) is batch                   # ce: none
    d.set_augmentation("signal", "strong")
    out = d.augment_labelled(batch)
    want = get_policy("signal").apply("strong", batch.xs, batch_generator(1234, 0, "cpu"))
    assert torch.equal(out.xs, want) and torch.equal(out.xu, batch.xu)
    aug, _ = _tiny("ce-aug")
    aug.set_augmentation("signal", "none")                       # the method's own level wins when stronger
    assert aug.labelled_level == "weak"


def test_params_are_validated_naming_the_field():
    with pytest.raises(ConfigError, match="threshold"):
        _tiny("fixmatch", {"threshold": 1.5})
    with pytest.raises(ConfigError, match="momentum"):
        _tiny("freematch", {"momentum": 1.0})
    with pytest.raises(ConfigError, match="w_f"):
        _tiny("freematch", {"w_f": -1})
    with pytest.raises(ConfigError, match="augment.labelled"):
        _tiny("ce")[0].set_augmentation("signal", "medium")


def test_a_method_without_a_policy_says_so():
    from ucmkd.models import Classifier

    built = build_classifier((1, 12), "signal", 3, width=4, feat_dim=8)
    assert build_distiller("fixmatch", built, None).input_kind == "signal"    # the builder's kind
    own = Classifier(built.encoder, 8, 3, (1, 12))                            # a user's model: no kind
    d = build_distiller("fixmatch", own, None)
    _, batch = _tiny("fixmatch")
    with pytest.raises(ConfigError, match="set_augmentation"):
        d(batch)


# --------------------------------------------------------------------------- runs
def small_cfg(method, epochs=3, **pairing):
    """The small synthetic student (the teacher at its defaults: these methods train none)."""
    return run_config(method, epochs, data="synthetic", layers=(SMALL_STUDENT, SMALL_STEPS),
                      **{f"pairing.{k}": v for k, v in pairing.items()})


def test_mu_sizes_the_unlabelled_batch_and_defaults_keep_earlier_keys():
    ctx = prepare(small_cfg("fixmatch", unlabelled_ratio=3.0))
    batch = next(iter(ctx.sampler.epoch(0)))
    assert len(batch.xs) == 16 and len(batch.xu) == 48 and batch.seed is not None
    assert ctx.sampler.summary()["unlabelled_batch"] == 48
    base = small_cfg("ce")
    d = key_config(base)
    assert "augment" not in d and "unlabelled_ratio" not in d["pairing"]     # at their defaults: as before
    assert run_key(base) != run_key(dataclasses.replace(base, pairing=dataclasses.replace(base.pairing,
                                                                                          unlabelled_ratio=2.0)))
    aug = small_cfg("ce")
    aug.augment.labelled = "weak"
    assert run_key(aug) != run_key(base)
    assert "augment" not in prepare(base).key_parts and prepare(aug).key_parts["augment"]["policy"] == "vector"


def test_the_same_batches_with_and_without_augmentation():
    a = [b.xs for b in prepare(small_cfg("ce")).sampler.epoch(1)]
    b = [b.xs for b in prepare(small_cfg("ce-aug")).sampler.epoch(1)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))      # augmentation draws from no sampler RNG


def _resume_cfg(case):
    if case == "freematch":
        cfg = small_cfg("freematch", epochs=4, unlabelled_ratio=2.0)
        cfg.augment.labelled = "strong"
    else:         # ucmkd's own augmentations: weak labelled items, weak and strong views
        cfg = small_cfg("ucmkd", epochs=4, unlabelled_ratio=2.0)
        cfg.method.params = {"n_iter": 10, "consistency": True, "labelled_aug": "weak"}
    return cfg


@pytest.mark.parametrize("case", ["freematch", "ucmkd-consistency"])
def test_resumed_run_with_augmentation_is_bit_identical(tmp_path, case):
    import ucmkd.engine.trainer as tr

    cfg = _resume_cfg(case)
    full = run(cfg, run_dir=tmp_path / "full")
    orig = tr.Trainer.fit
    tr.Trainer.fit = lambda self, stop_after=None: orig(self, stop_after=2)
    try:
        part = run(cfg, run_dir=tmp_path / "part")
    finally:
        tr.Trainer.fit = orig
    assert part["epochs"] == 2
    (tmp_path / "part" / "result.json").unlink()
    torch.manual_seed(999)                     # another global RNG state: the augmentations must not care
    resumed = run(cfg, run_dir=tmp_path / "part")
    a = load_checkpoint(tmp_path / "full" / "latest.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "latest.pt")["model"]
    for part_name in ("student", "extra"):
        for k in a[part_name]:
            assert torch.equal(a[part_name][k], b[part_name][k]), (part_name, k)
    for k in ("test_acc", "best_epoch", "candidates"):
        assert resumed[k] == full[k], k


def _digits_cfg(method, student):
    pair = ("digits/signal", "digits/image") if student == "image" else ("digits/image", "digits/signal")
    return run_config(method, 2, data=pair, **{"optim.steps_per_epoch": 2, "optim.batch_size": 32,
                                                "optim.warmup_epochs": 0, "pairing.unlabelled_ratio": 2.0})


@pytest.mark.parametrize("method,student", [("ce-aug", "signal"), ("fixmatch", "image"), ("freematch", "signal")])
def test_end_to_end_on_digits(method, student):
    res = run(_digits_cfg(method, student))
    assert res["method"] == method and res["epochs"] == 2
    assert 0.0 <= res["test_acc"] <= 1.0 and math.isfinite(res["val_acc"])
    hist = res["distiller"]
    assert hist.input_kind == student


def test_ranks_shard_an_unlabelled_batch_of_mu_b_items():
    from ucmkd.data import PairingSampler

    ctx = prepare(small_cfg("fixmatch", unlabelled_ratio=1.5))
    cfg = small_cfg("fixmatch", unlabelled_ratio=1.5)

    def sampler(rank, world):
        return PairingSampler(ctx.student_data, None, cfg.pairing, 16, 3, seed=0, unlabelled=True,
                              rank=rank, world_size=world)

    whole = list(sampler(0, 1).epoch(0))
    shards = [list(sampler(r, 2).epoch(0)) for r in range(2)]
    for step, b in enumerate(whole):
        assert len(b.xu) == 24
        assert torch.equal(torch.cat([shards[0][step].xu, shards[1][step].xu]), b.xu)
        assert shards[0][step].seed != shards[1][step].seed        # each rank draws its own augmentations
    with pytest.raises(ConfigError, match="unlabelled_ratio"):
        PairingSampler(ctx.student_data, None, small_cfg("fixmatch", unlabelled_ratio=1.0 + 1 / 16).pairing, 16, 3,
                       unlabelled=True, rank=0, world_size=2)
