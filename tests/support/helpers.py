"""Small shared fixtures for the method tests (importable: tests/conftest.py puts tests/support on sys.path)."""
import math

import torch

from ucmkd.data.pairing import Batch
from ucmkd.models import build_classifier


def tiny(student_feat=8):
    """Image teacher (d_t = 8, 3 classes), signal student (d_s = ``student_feat``), one batch of 10
    with class-matched labels and an unlabelled batch."""
    torch.manual_seed(0)
    teacher = build_classifier((1, 8, 8), "image", 3, width=4, feat_dim=8)
    student = build_classifier((1, 12), "signal", 3, width=4, feat_dim=student_feat)
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (10,), generator=g)
    batch = Batch(torch.randn(10, 1, 12, generator=g), y, torch.randn(10, 1, 8, 8, generator=g), y,
                  torch.randn(10, 1, 12, generator=g))
    return teacher, student, batch


def check_contract(d, batch) -> dict:
    """The Distiller contract, on one batch: [B, K] logits and finite scalar losses; one training
    step (the method's own strategy) moves the student, whose encoder gets a gradient; the
    teacher stays frozen (eval mode, no gradient, state unchanged). Returns the step's logs."""
    from ucmkd.engine.strategies import STRATEGIES

    d.train()
    teacher = d.teacher
    if teacher is not None:
        assert not teacher.training, "teacher must stay in eval mode"
        t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    out = d(batch)
    assert out.logits.shape == (batch.xs.shape[0], d.student.num_classes)
    assert out.losses, "no loss"
    assert all(torch.is_tensor(v) and v.dim() == 0 and math.isfinite(float(v.detach())) for v in out.losses.values())
    s_before = {k: v.clone() for k, v in d.student.state_dict().items()}
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.1)
    logs = STRATEGIES.get(d.strategy)(d, opt, 5.0).step(batch)
    assert logs and all(math.isfinite(v) for v in logs.values())
    grads = [p.grad for p in d.student.encoder.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads), "no gradient reached the student"
    assert any(not torch.equal(v, s_before[k]) for k, v in d.student.state_dict().items()), "the step moved nothing"
    if teacher is not None:
        assert all(p.grad is None for p in teacher.parameters()), "teacher received a gradient"
        assert not teacher.training
        for k, v in teacher.state_dict().items():
            assert torch.equal(v, t_before[k]), f"teacher {k} changed"
    return logs
