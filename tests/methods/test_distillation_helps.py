"""What the library exists for: on a small fixed problem, the default distiller beats plain
cross-entropy, with the distilled student (not its CE shadow) chosen on validation.

The problem: digits signal teacher (1-D CNN, width 32, 8 epochs: 98.5 % test) -> 8x8 image
student, 10 labels per class, 12 epochs of 8 steps, seeds 0 and 1. Measured over seeds 0-5
(``ucmkd`` with the shadow retirement): ucmkd - ce = +3.8, +4.4, +2.4, +5.6, +6.7, +2.9 pp
(mean +4.3, per-seed std 1.6), the student chosen every time. The test asks for a mean of at
least +1.5 pp over two seeds, about two standard errors of that mean below it: internal changes
that keep distillation useful pass, a distiller that does not help fails (the test set has 450
items: 1.5 pp is 7 of them). On a problem this short the gain comes mostly from ucmkd's use of
the unlabelled items (with every teacher term off: +2.9, +5.1, +4.0, +6.4, +4.0, +2.0 pp); the
teacher's own share shows over full-length runs (``ucmkd bench ablation``)."""
import pytest

from ucmkd.api import load_pair, run
from ucmkd.config import RunConfig
from ucmkd.engine import get_teacher

from factories import run_config

MARGIN_PP = 1.5
SEEDS = (0, 1)


def _cfg(method: str, seed: int, cache) -> RunConfig:
    return run_config(method, 12, cache, data=("digits/signal", "digits/image"), seed=seed, **{
        "model.teacher_width": 32, "teacher.epochs": 8, "optim.steps_per_epoch": 8, "pairing.label_budget": 10})


@pytest.mark.slow
def test_ucmkd_beats_ce_on_a_fixed_problem(tmp_path_factory):
    cache = tmp_path_factory.mktemp("helps")
    student, teacher_data = load_pair(_cfg("ce", 0, cache))
    teacher, info = get_teacher(_cfg("ce", 0, cache), teacher_data)
    assert info["test_acc"] > 0.95, "the teacher itself is off; the comparison would mean nothing"
    deltas = []
    for seed in SEEDS:
        acc = {}
        for method in ("ce", "ucmkd"):
            res = run(_cfg(method, seed, cache), student=student, teacher_data=teacher_data, teacher=teacher,
                      teacher_info=info)
            acc[method] = res["test_acc"]
            if method == "ucmkd":
                assert res["selected"] == "student", res["candidates"]
        deltas.append(100 * (acc["ucmkd"] - acc["ce"]))
    mean = sum(deltas) / len(deltas)
    assert mean >= MARGIN_PP, f"ucmkd - ce = {deltas} pp (mean {mean:+.2f}), expected >= +{MARGIN_PP}"
