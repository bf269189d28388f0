"""The alignment diagnostics measure what they claim."""
import math

import torch

from ucmkd.config import DataConfig, SyntheticConfig
from ucmkd.data import load_modality
from ucmkd.diagnostics import alignment_diagnostics
from ucmkd.engine.trainer import evaluate
from ucmkd.models import build_classifier


def _trained_classifier(data, epochs=60):
    torch.manual_seed(0)
    m = build_classifier(data.input_shape, data.kind, data.num_classes, width=16, feat_dim=8)
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    x, y = data.split("train")
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    return m.eval()


def test_diagnostics_on_self_and_on_random_student():
    cfg = DataConfig(synthetic=SyntheticConfig(n_items=400, num_classes=4))
    a = load_modality("synthetic/a", cfg)
    teacher = _trained_classifier(a)
    # the teacher "distilled into itself": perfectly aligned features and heads
    self_diag = alignment_diagnostics(teacher, teacher, a, a, split="val")
    acc, _ = evaluate(teacher, *a.split("val"))
    assert self_diag["la_tv"] == 0.0       # the same head on the same features: identical logits
    # the same count over the same items: float32 k / n vs float64 k / n, one rounding apart
    assert math.isclose(self_diag["teacher_head_acc"], acc, abs_tol=float(torch.finfo(torch.float32).eps))
    assert self_diag["teacher_head_acc"] > 0.6
    # an untrained student of the other view: worse on every quantity
    b = load_modality("synthetic/b", cfg)
    torch.manual_seed(1)
    rand = build_classifier(b.input_shape, b.kind, b.num_classes, width=16, feat_dim=8)
    rand_diag = alignment_diagnostics(rand, teacher, b, a, split="val")
    assert rand_diag["fa_classwise"] > self_diag["fa_classwise"]
    assert rand_diag["teacher_head_acc"] < self_diag["teacher_head_acc"]
    assert rand_diag["la_tv"] > 0.05


def test_diagnostics_undefined_without_projector():
    cfg = DataConfig(synthetic=SyntheticConfig(n_items=200, num_classes=3))
    a, b = load_modality("synthetic/a", cfg), load_modality("synthetic/b", cfg)
    t = build_classifier(a.input_shape, a.kind, 3, width=8, feat_dim=8)
    s = build_classifier(b.input_shape, b.kind, 3, width=8, feat_dim=6)
    d = alignment_diagnostics(s, t, b, a)
    assert math.isnan(d["fa"]) and 0.0 <= d["student_acc"] <= 1.0
    d2 = alignment_diagnostics(s, t, b, a, projector=torch.nn.Linear(6, 8))
    assert math.isfinite(d2["fa"])
