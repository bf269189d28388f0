"""The default distiller ``ucmkd``, its teacher-free control ``pseudo-label``, and the pieces
they are built from (pseudo-label terms, prior alignment, class prototypes, label-aware OT,
validation calibration, the validation-gated fallback)."""
import dataclasses
import json
import math

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from ucmkd.config import OptimConfig, PairingConfig
from ucmkd.data.pairing import PairingSampler
from ucmkd.engine.strategies import STRATEGIES
from ucmkd.engine.trainer import Trainer
from ucmkd.errors import ConfigError, DataError
from ucmkd.losses.ot import sinkhorn_cost, cost_matrix
from ucmkd.losses.prototypes import ClassPrototypes
from ucmkd.losses.semi import PriorAlignment, confident_targets, masked_ce, ramp
from ucmkd.engine.distributed import TrainableView
from ucmkd.engine.shadow import CEShadow, FallbackParams
from ucmkd.methods.ucmkd import UCMKD
from ucmkd.methods import METHODS, build_distiller
from ucmkd.methods.base import DistillOutput, Distiller
from ucmkd.models import build_classifier

from helpers import tiny

EPS32 = float(torch.finfo(torch.float32).eps)
EPS64 = float(torch.finfo(torch.float64).eps)


@pytest.fixture
def synth_pair():
    """(student, teacher) synthetic modalities, 400 items, 4 classes."""
    from ucmkd.config import DataConfig, SyntheticConfig
    from ucmkd.data import load_modality

    cfg = DataConfig()
    cfg.synthetic = SyntheticConfig(n_items=400, num_classes=4)
    return load_modality("synthetic/b", cfg), load_modality("synthetic/a", cfg)


# ----------------------------------------------------------------------------- loss pieces
def test_confident_targets_and_masked_ce():
    probs = torch.tensor([[0.97, 0.02, 0.01], [0.4, 0.35, 0.25], [0.05, 0.05, 0.9]])
    labels, mask = confident_targets(probs, 0.9)
    assert labels.tolist() == [0, 0, 2] and mask.tolist() == [True, False, True]
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    ce = F.cross_entropy(logits, labels, reduction="none")
    assert torch.equal(masked_ce(logits, labels, mask), (ce[0] + ce[2]) / 3)   # normalised by B (adding 0 is exact)
    assert float(masked_ce(logits, labels, torch.zeros(3, dtype=torch.bool))) == 0.0
    with pytest.raises(ValueError, match="threshold"):
        confident_targets(probs, 1.5)
    assert ramp(0.05, 0.1) == pytest.approx(0.5, rel=4 * EPS64) and ramp(0.5, 0.1) == 1.0 and ramp(0.0, 0.0) == 1.0


def test_prior_alignment_undoes_a_collapse_onto_one_class():
    pa = PriorAlignment(3, momentum=0.0)          # running mean = this batch's mean
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.6, 0.1, 0.3]])
    q = pa.align(probs, torch.tensor([10.0, 10.0, 10.0]))
    # float32, values <= 1: a sum of 3 and a division, a few eps32 each
    assert (q.sum(1) - 1).abs().max() <= 4 * EPS32
    # q ∝ p / mean_p (float64 reference): class 0 is over-predicted, so its share falls
    p64 = probs.double().numpy()
    expected = p64 / p64.mean(0)
    expected /= expected.sum(1, keepdims=True)
    assert np.abs(q.double().numpy() - expected).max() <= 16 * EPS32
    assert float(q[:, 0].mean()) < float(probs[:, 0].mean())
    before = pa.mean_p.clone()
    pa.align(torch.full((2, 3), 1 / 3), torch.ones(3), update=False)
    assert torch.equal(pa.mean_p, before)


def test_class_prototypes_are_class_means_then_ema():
    protos = ClassPrototypes(3, 2, momentum=0.5)            # cumulative while count < 2 per class
    f = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    lg = torch.tensor([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 6.0]])
    y = torch.tensor([0, 0, 2])
    protos.update(f, lg, y)
    assert torch.equal(protos.features[0], torch.tensor([2.0, 0.0]))        # dyadic values: exact
    assert torch.equal(protos.logits[2], torch.tensor([0.0, 0.0, 6.0]))
    assert protos.known(torch.tensor([0, 1, 2])).tolist() == [True, False, True]
    # one more item of class 2: weight max(1 - 0.5^1, 1/2) = 0.5
    protos.update(torch.tensor([[0.0, 4.0]]), torch.tensor([[0.0, 0.0, 2.0]]), torch.tensor([2]))
    assert torch.equal(protos.features[2], torch.tensor([0.0, 3.0]))
    with pytest.raises(ValueError, match="feats"):
        protos.update(torch.zeros(2, 5), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("backend", ["pot", "torch"])
def test_label_aware_ot_matches_pot_on_the_summed_cost(backend):
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(6, 4, generator=g), torch.randn(5, 4, generator=g)
    ys, yt = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 1, 2, 2])
    extra = (ys[:, None] != yt[None, :]).double() * 1.0
    C = cost_matrix(zs.double(), zt.double(), "cosine") + extra
    a, b = torch.full((6,), 1 / 6, dtype=torch.double), torch.full((5,), 1 / 5, dtype=torch.double)
    ref = float(ot.sinkhorn2(a, b, C, reg=0.1, numItermax=5000, stopThr=1e-15))    # converged
    got = float(sinkhorn_cost(zs.double(), zt.double(), eps=0.1, n_iter=2000, backend=backend, extra_cost=extra))
    # float64, both converged: POT's own stop (marginal error 1e-9) moves <P, C> by <= 1e-9 max C
    assert got == pytest.approx(ref, rel=1e-8)
    with pytest.raises(DataError, match="extra_cost"):
        sinkhorn_cost(zs, zt, extra_cost=torch.zeros(5, 6))
    with pytest.raises(ConfigError, match="extra_cost"):
        sinkhorn_cost(zs, zt, backend="geomloss", grad="detach", extra_cost=torch.zeros(6, 5))


def test_label_cost_moves_mass_within_classes():
    # two classes whose features are swapped across modalities: label-blind OT pairs across
    # classes, label-aware OT pays the feature cost to stay within them
    zs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    zt = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 1])
    blind = float(sinkhorn_cost(zs, zt, eps=0.05, n_iter=200))
    aware = float(sinkhorn_cost(zs, zt, eps=0.05, n_iter=200, extra_cost=(y[:, None] != y[None, :]).float() * 5))
    # known answers of the symmetric 2 x 2 entropic problem: P = [[a, b], [b, a]], a + b = 1/2,
    # a / b = exp(-(C_11 - C_12) / eps); blind: C = [[1, 0], [0, 1]] -> <P, C> = 2a = e^-20 / (1 + e^-20);
    # aware: C = [[1, 5], [5, 1]] -> <P, C> = 1 + 8b, b = 1 / (2 (1 + e^80)); float32: ~16 roundings
    assert blind == pytest.approx(math.exp(-20) / (1 + math.exp(-20)), rel=16 * EPS32)
    assert aware == pytest.approx(1 + 4 / (1 + math.exp(80)), abs=16 * EPS32)


# ----------------------------------------------------------------------------- methods
def test_ucmkd_has_every_term_when_all_unlabelled_items_are_confident():
    """(The generic contract over every method is tests/methods/test_methods.py::test_method_contract.)"""
    teacher, student, batch = tiny(6)
    d = build_distiller("ucmkd", student, teacher, {"n_iter": 10})
    d.train()
    d.progress = 0.5
    d.extra["prior"].threshold.fill_(0.0)       # every unlabelled item counts
    out = d(batch)
    assert {"ce", "kd", "la", "fa", "pl", "kd_u", "la_u"} <= set(out.losses)
    assert out.metrics["pl_mask"] == 1.0


def test_ucmkd_consistency_labels_the_weak_view_and_trains_the_strong_one(monkeypatch):
    """consistency: the pseudo-labels are those of the weak view (no gradient), the pseudo-label
    CE is on the strong view; both views come from the batch's seeded generator (stream 1)."""
    teacher, student, batch = tiny(6)
    d = build_distiller("ucmkd", student, teacher, {"n_iter": 10, "consistency": True, "labelled_aug": "weak"})
    assert d.input_kind == "signal" and d.augment_policy is not None and d.labelled_level == "none"
    d.train()
    d.progress = 0.5
    d.extra["prior"].threshold.fill_(0.0)
    seen = []
    real = type(d.student).forward

    def spy(self, x, return_features=False):
        if self is d.student:
            seen.append(x.detach().clone())
        return real(self, x, return_features=return_features)

    monkeypatch.setattr(type(d.student), "forward", spy)
    batch.seed = 7
    out = d(batch)
    gen = d.augment_generator(batch, 1)
    xw, xst = d.augment(batch.xu, "weak", gen), d.augment(batch.xu, "strong", gen)
    xl = d.augment(batch.xs, "weak", d.augment_generator(batch, 2))
    assert len(seen) == 3 and torch.equal(seen[0], xl)                # labelled (weak), weak, strong
    assert torch.equal(seen[1], xw) and torch.equal(seen[2], xst)
    assert {"ce", "kd", "la", "fa", "pl", "kd_u", "la_u"} <= set(out.losses)
    # the pseudo-label CE equals the strong view's CE on the weak view's (voted, aligned) labels
    monkeypatch.setattr(type(d.student), "forward", real)
    d.eval()
    out.losses["pl"].backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in d.student.parameters())


def test_ucmkd_augments_labelled_items_of_convolutional_students_only():
    """labelled_aug auto: weak for a student with a convolution (the built-in 1-D/2-D CNNs), none
    for an MLP (a user's MLP on pixels is hurt by shifts); explicit values win."""
    from ucmkd.methods.ucmkd import is_convolutional

    teacher, cnn, _ = tiny(6)
    mlp = build_classifier((12,), "vector", 3, width=4, feat_dim=6)
    assert is_convolutional(cnn) and not is_convolutional(mlp)
    assert build_distiller("ucmkd", cnn, teacher, {}).labelled_aug == "weak"
    assert build_distiller("ucmkd", mlp, teacher, {}).labelled_aug == "none"
    assert build_distiller("ucmkd", tiny(6)[1], teacher, {"labelled_aug": "none"}).labelled_aug == "none"
    assert build_distiller("ucmkd", mlp, teacher, {"labelled_aug": "strong"}).labelled_aug == "strong"


def test_the_ce_shadow_trains_on_the_labelled_items_as_given(monkeypatch):
    """ucmkd augments its labelled items inside its forward; the trainer's shadow sees them as
    the step got them, and its loss joins the step's."""
    teacher, student, batch = tiny(6)
    d = build_distiller("ucmkd", student, teacher, {"n_iter": 10, "labelled_aug": "weak"})
    shadow = CEShadow.attach(d)
    d.train()
    seen = []
    monkeypatch.setattr(shadow.model, "forward", lambda x, return_features=False: seen.append(x) or d.student.head.weight.new_zeros(len(x), 3))
    out = TrainableView(d, shadow)(batch)
    assert len(seen) == 1 and torch.equal(seen[0], batch.xs) and "ce_fallback" in out.losses
    assert CEShadow.attach(build_distiller("ucmkd", tiny(6)[1], teacher, {"fallback": False})) is None


def test_labelled_items_are_augmented_once_when_the_run_augments_every_method(monkeypatch):
    """augment.labelled: weak (the trainer augments xs before the step): ucmkd's own labelled_aug
    does not augment them a second time."""
    teacher, student, batch = tiny(6)
    d = build_distiller("ucmkd", student, teacher, {"n_iter": 10})
    d.set_augmentation("signal", labelled="weak")
    d.train()
    calls = []
    real = type(d).augment
    monkeypatch.setattr(type(d), "augment", lambda self, x, level, gen: calls.append(level) or real(self, x, level, gen))
    d(d.augment_labelled(batch))
    assert calls == ["weak"]          # the trainer's, only


def test_ucmkd_consistency_bad_params_are_named():
    teacher, student, _ = tiny(6)
    with pytest.raises(ConfigError, match="method.params.labelled_aug: unknown value .*; choose one of auto, none, weak, strong"):
        build_distiller("ucmkd", student, teacher, {"labelled_aug": "heavy"})
    with pytest.raises(ConfigError, match="consistency needs u_forward: separate"):
        build_distiller("ucmkd", student, teacher, {"consistency": True, "u_forward": "joint"})


def test_ucmkd_class_targets_are_same_class_teacher_items():
    """Each KD target is the logits of a teacher item of the student's class (its values: see
    tests/methods/test_loss_references.py)."""
    teacher, student, batch = tiny(8)
    d = build_distiller("ucmkd", student, teacher, {"n_iter": 10})
    d(batch)
    _, t_logits = teacher(batch.xt, return_features=True)
    torch.manual_seed(0)
    target = d._class_targets(batch.ys, batch.yt, t_logits)
    same = [(t_logits == target[i]).all(1).nonzero().flatten() for i in range(10)]
    assert all(len(s) and bool((batch.yt[s] == batch.ys[i]).all()) for i, s in enumerate(same))


def test_ucmkd_mean_targets_and_unpaired_batches():
    teacher, student, batch = tiny(8)
    d = build_distiller("ucmkd", student, teacher, {"n_iter": 10, "kd_target": "mean"})
    d(batch)
    target = d._class_targets(batch.ys, batch.yt, torch.zeros(10, 3))
    assert torch.equal(target, d.extra["protos"].logits[batch.ys])
    with pytest.raises(ConfigError, match="kd_target"):
        build_distiller("ucmkd", student, teacher, {"kd_target": "pairs"})
    with pytest.raises(ConfigError, match="w_la"):
        build_distiller("ucmkd", student, teacher, {"w_la": -1.0})


def test_calibration_picks_the_lowest_threshold_with_the_wanted_precision():
    teacher, student, _ = tiny(8)
    d = build_distiller("ucmkd", student, teacher, {"teacher_vote": False, "align_prior": False,
                                                    "precision": 0.9, "threshold": 0.5})
    x = torch.randn(40, 1, 12)
    with torch.no_grad():
        conf, pred = student.eval()(x).softmax(1).max(1)
    y = pred.clone()
    # make the least confident half wrong: precision reaches 0.9 only above the median confidence
    low = conf < conf.median()
    y[low] = (pred[low] + 1) % 3
    logs = d.calibrate(x, y)
    tau = logs["pl_threshold"]
    grid = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99]
    def ok(t):
        sel = conf >= t
        return sel.float().mean() >= 0.05 and (pred[sel] == y[sel]).float().mean() >= 0.9
    expected = next((t for t in grid if ok(t)), 2.0)
    assert tau == expected and float(d.extra["prior"].threshold) == expected
    # nothing reaches the precision: the unlabelled terms pause
    assert d.calibrate(x, (pred + 1) % 3)["pl_threshold"] == 2.0
    _, _, batch = tiny(8)
    out = d(batch)
    # paused: the unlabelled items are not even forwarded (no pl term; BN sees the labelled batch only)
    assert out.metrics["pl_mask"] == 0.0 and "pl" not in out.losses


def test_ucmkd_without_an_unlabelled_pool(synth_pair):
    student, teacher = synth_pair
    sampler = PairingSampler(student, teacher, PairingConfig(label_budget=None), 32, 2, seed=0,
                             unlabelled=True, require_unlabelled=False)
    assert all(b.xu is None for b in sampler.epoch(0))
    with pytest.raises(DataError, match="unlabelled"):
        PairingSampler(student, teacher, PairingConfig(label_budget=None), 32, 2, seed=0, unlabelled=True)


# ----------------------------------------------------------------------------- fallback gate
@dataclasses.dataclass
class _SabotageParams(FallbackParams):
    fallback: bool = True


class _Sabotage(Distiller):
    """A distiller whose loss destroys the student; it enables the trainer's CE shadow from its
    params (any method can), which the gate then selects."""

    name = "sabotage"
    uses_teacher = False
    Params = _SabotageParams

    def forward(self, batch):
        logits = self.student(batch.xs)
        wrong = (batch.ys + 1) % self.student.num_classes
        return DistillOutput(logits, {"bad": F.cross_entropy(logits, wrong)})


def test_fallback_is_selected_when_it_validates_better_and_survives_resume(synth_pair, tmp_path):
    student_data, _ = synth_pair
    from ucmkd.models import build_classifier

    def make():
        torch.manual_seed(0)
        s = build_classifier(student_data.input_shape, student_data.kind, student_data.num_classes, width=4, feat_dim=8)
        return _Sabotage(s)

    optim = OptimConfig(epochs=6, batch_size=32, lr=1e-2, steps_per_epoch=5, warmup_epochs=0)
    sampler = PairingSampler(student_data, None, PairingConfig(), 32, 5, seed=0)
    tr = Trainer(make(), sampler, student_data, optim, run_dir=tmp_path / "a", config_hash="h")
    fit = tr.fit()
    assert fit.selected == "fallback"
    assert fit.candidates["fallback"]["val_acc"] > fit.candidates["student"]["val_acc"]
    assert fit.test_acc == fit.candidates["fallback"]["test_acc"]
    tr.restore_best()
    from ucmkd.engine.trainer import evaluate
    assert evaluate(tr.distiller.student, *student_data.split("val"))[0] == fit.val_acc   # the same count
    # interrupted after 2 epochs, resumed in a new trainer: same choice, same numbers
    tr2 = Trainer(make(), sampler, student_data, optim, run_dir=tmp_path / "b", config_hash="h")
    tr2.fit(stop_after=3)
    tr3 = Trainer(make(), sampler, student_data, optim, run_dir=tmp_path / "b", config_hash="h")
    fit3 = tr3.fit()
    assert fit3.selected == "fallback" and fit3.candidates == fit.candidates
    tr3.restore_best()     # the fallback's best weights come from the committed latest.pt
    assert evaluate(tr3.distiller.student, *student_data.split("val"))[0] == fit.val_acc


def test_fallback_never_changes_the_distilled_students_training():
    """The shadow has its own clipping group and no randomness: the distilled student's
    parameters after a step equal those of the same method without a fallback."""
    teacher, student, batch = tiny(8)
    import copy
    s2 = copy.deepcopy(student)
    params = {"n_iter": 10, "unlabelled": False, "warmup": 0.0}
    a = build_distiller("ucmkd", student, teacher, {**params, "fallback": True})
    b = build_distiller("ucmkd", s2, copy.deepcopy(teacher), {**params, "fallback": False})
    for d in (a, b):
        shadow = CEShadow.attach(d)
        assert (shadow is not None) == (d is a)
        torch.manual_seed(3)
        opt = torch.optim.AdamW(d.trainable_parameters(), lr=1e-2)
        logs = STRATEGIES.get("standard")(d, opt, 0.01, shadow=shadow).step(batch)    # tight clip: clipping is active
        assert ("ce_fallback" in logs) == (d is a)
    for (n, p), (_, q) in zip(student.named_parameters(), s2.named_parameters()):
        assert torch.equal(p, q), n          # the shadow shares no arithmetic with the student


def test_run_records_both_candidates_and_the_choice(tmp_path):
    from factories import small_config

    from ucmkd.api import run

    cfg = small_config("ucmkd", epochs=3)
    cfg.pairing.label_budget = 5
    res = run(cfg, run_dir=tmp_path / "r")
    assert res["selected"] in ("student", "fallback")
    chosen = res["candidates"][res["selected"]]
    assert res["test_acc"] == chosen["test_acc"] and res["val_acc"] == chosen["val_acc"]
    other = "fallback" if res["selected"] == "student" else "student"
    assert (res["selected"] == "student") == (chosen["val_acc"] >= res["candidates"][other]["val_acc"])
    assert (tmp_path / "r" / "best_fallback.pt").is_file()
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all("fallback_val_acc" in r and "pl_threshold" in r for r in rows)
    cfg.pairing.label_budget = None          # fully labelled: no unlabelled terms, still runs
    res2 = run(cfg)
    assert math.isfinite(res2["test_acc"])


def test_ucmkd_report_tables():
    from ucmkd.report import headline_report

    rows = []
    for seed in range(3):
        for m, acc in [("ce", 0.50), ("dkd", 0.55), ("ucmkd", 0.60), ("ucmkd-joint", 0.49), ("ucmkd-bilevel", 0.5),
                       ("pseudo-label", 0.45), ("ucmkd-no-la", 0.58)]:
            r = {"setting": "s1", "method": m, "seed": seed, "test_acc": acc + 0.01 * seed, "seconds": 1.0,
                 "teacher_test_acc": 0.99}
            if m == "ucmkd":
                r["selected"] = "fallback" if seed == 0 else "student"
                r["candidates"] = {"student": {"test_acc": 0.40, "val_acc": 0.4}}
            rows.append(r)
    md = headline_report(rows, ["s1"], ["dkd", "pseudo-label"], "ce", "ucmkd", ("ucmkd-joint", "ucmkd-bilevel"),
                         "pseudo-label", "ucmkd-no-", "ucmkd-no-gate")
    assert "| fallback chosen |" in md
    line = next(x for x in md.splitlines() if x.startswith("| s1 |"))
    assert "**+10.0" in line and "dkd +5.0" in line and "1/3" in line
    assert "| ucmkd | +10.00 |" in md and "| dkd | +5.00 |" in md
    abl = next(x for x in md.splitlines() if x.startswith("| s1 | +10.0"))
    # no-gate: the distilled candidate (0.40) vs the gated 0.60-0.62, paired by seed; no-la: -2 pp
    assert "-21.0" in abl and "-2.0 [-2.0, -2.0]" in abl


@pytest.mark.slow
def test_ablation_and_stress_suites_load_and_share_full_cells(tmp_path):
    """The ablation suite removes one ingredient per variant and its ucmkd/ce cells are those of
    `full` (same store keys), so copying full's results store reuses them."""
    from ucmkd.bench import builtin_suites, suite_cells, suite_path
    from ucmkd.config import SuiteConfig, load_config

    assert {"ablation", "stress"} <= set(builtin_suites())
    abl = load_config(SuiteConfig, suite_path("ablation"))
    full = load_config(SuiteConfig, suite_path("full"))
    for label, var in abl.variants.items():
        assert var["method"] == "ucmkd" and label.startswith("ucmkd-no-")
        METHODS.get("ucmkd").parse_params(var["params"])
    _, a_cells = suite_cells(abl, tmp_path / "a")
    _, f_cells = suite_cells(full, tmp_path / "f")
    f_keys = {c.store_key for c in f_cells}
    shared = [c for c in a_cells if c.label in ("ce", "ucmkd")]
    assert shared and all(c.store_key in f_keys for c in shared)
    stress = load_config(SuiteConfig, suite_path("stress"))
    assert "ucmkd" in stress.methods and set(stress.settings) == {"weak-teacher", "unpaired", "teacher-imbalance"}


def test_bad_params_and_batches_are_named():
    teacher, student, batch = tiny(8)
    for name, params, field in [("pseudo-label", {"threshold": 1.5}, "threshold"),
                                ("pseudo-label", {"warmup": -0.1}, "warmup"),
                                ("ucmkd", {"w_u": -1.0}, "w_u"),
                                ("ucmkd", {"temperature": 0.0}, "temperature"),
                                ("ucmkd", {"metric": "cos"}, "metric")]:
        with pytest.raises(ConfigError, match=field):
            build_distiller(name, student, teacher if name == "ucmkd" else None, params)
    d = build_distiller("ucmkd", student, teacher, {"n_iter": 10})
    batch.yt = None
    with pytest.raises(DataError, match=r"batch\.yt"):
        d(batch)
    _, _, batch = tiny(8)
    batch.xu = torch.randn(10, 1, 13)                     # wrong unlabelled item shape
    with pytest.raises(DataError, match=r"\[B, 1, 12\]"):
        d(batch)


def test_shadow_retires_only_after_a_clear_lead_in_consecutive_epochs():
    teacher, student, _ = tiny(8)
    d = build_distiller("ucmkd", student, teacher, {"retire_after": 0.2, "retire_z": 3.0, "retire_epochs": 2})
    sh = CEShadow.attach(d)
    # a lead of 0.9 vs 0.6 on n = 100: se = sqrt((0.09 + 0.24) / 100) = 0.0574, 3 se = 0.172 < 0.3
    clear, small = {"val_acc": 0.9, "fallback_val_acc": 0.6}, {"val_acc": 0.7, "fallback_val_acc": 0.6}
    sh.end_epoch(100, 0.1, clear)           # too early: no count
    assert int(sh.gate.lead) == 0 and "fallback" in sh.candidates()
    sh.end_epoch(100, 0.3, clear)
    sh.end_epoch(100, 0.3, small)           # 0.1 < 3 se = 0.19: the run of leads restarts
    assert int(sh.gate.lead) == 0 and "fallback" in sh.candidates()
    sh.end_epoch(100, 0.3, clear)
    out = sh.end_epoch(100, 0.3, clear)
    assert out["shadow_active"] == 0.0 and sh.candidates() == {}
    # retired: no shadow loss, the student is final whatever the shadow's old record says
    _, _, batch = tiny(8)
    assert sh.losses(batch) == {}
    assert sh.select({"student": {"val_acc": 0.5}, "fallback": {"val_acc": 0.9}}, "student") == "student"
    # the gate is checkpointed with the method
    state = d.trainable_state_dict()
    d2 = build_distiller("ucmkd", tiny(8)[1], teacher, {})
    sh2 = CEShadow.attach(d2)
    d2.load_trainable_state_dict(state)
    assert sh2.candidates() == {}


def test_a_retired_shadow_stays_retired_across_resume(tmp_path, monkeypatch):
    """End to end on digits: the shadow retires mid-run (the trainer then validates the student
    only), and a run interrupted right after retirement resumes to the uninterrupted result.

    The retirement is forced, not left to the trajectory (which side of ``retire_z`` a short run
    lands on depends on the CPU's BLAS path): the gate is shown a shadow that validates at 0, so
    the student leads by more than ``retire_z`` standard errors at the first epoch past
    ``retire_after`` (progress 3/6 = 0.5 >= 0.4: epoch 4 of 6). The gate's arithmetic itself is
    pinned by ``test_the_gate_falls_back_only_beyond_noise``."""
    from ucmkd import RunConfig
    from ucmkd.api import prepare, run

    real = CEShadow.end_epoch

    def shadow_at_zero(self, n_val, progress, row):
        return real(self, n_val, progress, {**row, "fallback_val_acc": 0.0} if "fallback_val_acc" in row else row)

    monkeypatch.setattr(CEShadow, "end_epoch", shadow_at_zero)
    cfg = RunConfig()
    cfg.method.name, cfg.optim.epochs, cfg.teacher.epochs = "ucmkd", 6, 3
    cfg.method.params = {"n_iter": 20, "retire_after": 0.4, "retire_z": 1.0, "retire_epochs": 1}
    full = run(cfg, run_dir=tmp_path / "full")
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    retired = [r["epoch"] for r in rows if r.get("shadow_active") == 0.0]
    assert retired == [4], "the shadow should retire once, at the first epoch past retire_after"
    assert all("fallback_val_acc" not in r for r in rows if r["epoch"] > retired[0])
    assert full["selected"] == "student"
    ctx = prepare(cfg)
    ctx.trainer(tmp_path / "cut").fit(stop_after=retired[0])
    resumed = run(cfg, run_dir=tmp_path / "cut")
    for k in ("test_acc", "val_acc", "best_epoch", "selected", "candidates", "diag_fa", "diag_teacher_head_acc"):
        assert resumed[k] == full[k], k


def test_the_gate_falls_back_only_beyond_noise():
    """gate_z = 1: the shadow must validate better by more than one standard error of the
    difference of two accuracies on n items, sqrt((a(1-a) + b(1-b)) / n)."""
    teacher, student, _ = tiny(8)
    d = CEShadow.attach(build_distiller("ucmkd", student, teacher, {"gate_z": 1.0}))
    d.gate.n_val.fill_(270)
    rec = lambda a, b: {"student": {"val_acc": a}, "fallback": {"val_acc": b}}  # noqa: E731
    se = math.sqrt((0.95 * 0.05 + 0.96 * 0.04) / 270)                           # 0.0178
    assert d.select(rec(0.95, 0.95 + 0.9 * se), "student") == "student"
    assert d.select(rec(0.95, 0.96 + 0.02), "student") == "fallback"             # 0.03 > se(0.95, 0.98)
    d.gate.n_val.fill_(20)                                           # tiny validation split
    assert d.select(rec(0.50, 0.60), "student") == "student"                   # se = 0.157
    assert d.select(rec(0.30, 0.69), "student") == "fallback"                  # a chance-level teacher
    strict = CEShadow.attach(build_distiller("ucmkd", tiny(8)[1], teacher, {"gate_z": 0.0}))
    strict.gate.n_val.fill_(270)
    assert strict.select(rec(0.95, 0.951), "student") == "fallback"            # gate_z = 0: any lead
