"""Mixed precision (optim.precision): autocast around the forwards in both strategies, the OT
solve kept in float32, fp16 refused on CPU, and bf16 training close to fp32."""
import pytest
import torch

from factories import small_config
from ucmkd.api import build_student, load_pair
from ucmkd.config import RunConfig, load_config
from ucmkd.data import PairingSampler
from ucmkd.data.pairing import Batch
from ucmkd.engine import Trainer, get_teacher, seed_everything
from ucmkd.engine.precision import Precision
from ucmkd.engine.strategies import STRATEGIES
from ucmkd.errors import ConfigError
from ucmkd.losses.ot import FeatureAlignmentLoss
from ucmkd.methods import build_distiller
from ucmkd.methods.fa_only import FullPrecisionFA
from ucmkd.models import build_classifier


def test_fp16_is_refused_on_cpu_and_unknown_precisions_are_named():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        Precision("fp16", "cpu")
    cfg = small_config("ce")
    cfg.optim.precision = "fp16"
    student, _ = load_pair(cfg)
    d = build_distiller("ce", build_student(cfg, student), None)
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        Trainer(d, PairingSampler(student, None, cfg.pairing, 16, 2), student, cfg.optim)
    with pytest.raises(ConfigError, match="optim.precision: unknown value 'fp8'"):
        load_config(RunConfig, None, ["optim.precision=fp8"])


def test_ot_solve_stays_float32_under_autocast():
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(32, 16, generator=g).bfloat16()
    zt = torch.randn(40, 16, generator=g).bfloat16()
    fa = FullPrecisionFA(metric="cosine", eps=0.1, n_iter=50, backend="pot")
    plain = FeatureAlignmentLoss(metric="cosine", eps=0.1, n_iter=50, backend="pot")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = fa(zs, zt)
        unprotected = plain(zs, zt)
    outside = plain(zs, zt)           # no autocast: ot.py promotes the bf16 inputs to float32
    assert inside.dtype == torch.float32 and torch.equal(inside, outside)
    assert not torch.equal(unprotected, outside)   # autocast alone would redo the solve in bf16


@pytest.mark.parametrize("method", ["ce", "ucmkd-joint", "ucmkd-bilevel"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_both_strategies_run_the_forwards_under_the_precision(method, precision):
    torch.manual_seed(0)
    teacher = build_classifier((6,), "vector", 3, width=8, feat_dim=8).eval()
    student = build_classifier((5,), "vector", 3, width=8, feat_dim=8)
    d = build_distiller(method, student, None if method == "ce" else teacher, {"n_iter": 10} if method != "ce" else {})
    seen = []
    student.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    strat = STRATEGIES.get(d.strategy)(d, torch.optim.AdamW(d.trainable_parameters(), lr=1e-3), 5.0,
                                       Precision(precision, "cpu"))
    logs = strat.step(Batch(torch.randn(8, 5), torch.randint(0, 3, (8,)), torch.randn(8, 6)))
    assert seen and set(seen) == {torch.bfloat16 if precision == "bf16" else torch.float32}
    assert all(v == v for v in logs.values())
    assert student.head.weight.dtype == torch.float32   # parameters stay float32


def _fit(method, precision):
    cfg = small_config(method, epochs=8)
    cfg.optim.precision = precision
    cfg.optim.steps_per_epoch = 6
    student, teacher_data = load_pair(cfg)
    teacher, _ = get_teacher(cfg, teacher_data)
    seed_everything(0)
    d = build_distiller(method, build_student(cfg, student), teacher, cfg.method.params)
    sampler = PairingSampler(student, teacher_data, cfg.pairing, cfg.optim.batch_size, cfg.optim.steps_per_epoch)
    return Trainer(d, sampler, student, cfg.optim).fit().history[-1]


@pytest.mark.parametrize("method", ["ce", "ucmkd-joint", "ucmkd-bilevel"])
def test_bf16_training_lands_within_bf16_rounding_of_fp32(method):
    """48 steps on the 4-class synthetic problem, fp32 vs bf16 from the same seed. bf16 keeps
    float32 weights and optimiser state; only the forwards round, by <= 2^-8 = 0.4 % per
    operation, ~4 matmul layers deep: ~1.6 % on the logits. So the last epoch's mean training
    losses agree to 5 % and the validation loss (evaluated in float32) to 2 %; the test
    accuracies (100 items) to 5 points."""
    a, b = _fit(method, "fp32"), _fit(method, "bf16")
    losses = [k for k in a if k.startswith("train_")]
    assert losses
    for k in losses:
        assert b[k] == pytest.approx(a[k], rel=0.05), k
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=0.02)
    assert abs(b["test_acc"] - a["test_acc"]) <= 0.05


def test_fp16_scaler_logic_of_the_standard_strategy_on_cpu():
    """The GradScaler path (CUDA fp16 in practice) run with a CPU scaler and no autocast:
    power-of-two scaling is exact, so the step equals the unscaled one; a scale that overflows
    (3e38 times a loss > 1.2) skips the step (weights unchanged) and lowers the scale."""
    finals = []
    for scale in (None, 2.0 ** 10, 3e38):
        torch.manual_seed(0)
        student = build_classifier((5,), "vector", 3, width=8, feat_dim=8)
        d = build_distiller("ce", student, None)
        prec = Precision("fp32")
        if scale is not None:
            prec.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        before = [q.detach().clone() for q in student.parameters()]
        g = torch.Generator().manual_seed(1)
        logs = STRATEGIES.get("standard")(d, torch.optim.AdamW(d.trainable_parameters(), lr=1e-2), 5.0, prec).step(
            Batch(100 * torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)))
        finals.append(([q.detach() for q in student.parameters()], before, logs, prec))
    assert all(torch.equal(a, b) for a, b in zip(finals[0][0], finals[1][0]))
    after, before, logs, prec = finals[2]
    assert logs["skipped_step"] == 1.0 and all(torch.equal(a, b) for a, b in zip(after, before))
    assert prec.loss_scale < 3e38
