"""The bilevel strategy matches a plain deepcopy-based reference of the paper's step."""
import copy

import pytest
import torch
import torch.nn.functional as F

from ucmkd.data.pairing import Batch
from ucmkd.engine.strategies import BilevelStrategy
from ucmkd.methods import build_distiller
from ucmkd.models import build_classifier


def reference_bilevel_step(student, projector, teacher, outer_opt, batch, p, fa):
    """The paper's step written the obvious way: deepcopy the student per batch."""
    s2 = copy.deepcopy(student)
    proj2 = copy.deepcopy(projector)
    s2.train()
    params2 = list(s2.parameters()) + list(proj2.parameters())
    inner = torch.optim.AdamW(params2, lr=p.inner_lr, weight_decay=p.inner_wd)
    with torch.no_grad():
        zt = teacher.encoder(batch.xt)
    for _ in range(p.n1):
        inner.zero_grad(set_to_none=True)
        fa(proj2(s2.encoder(batch.xs)), zt).backward()
        inner.step()
    for _ in range(p.n2):
        inner.zero_grad(set_to_none=True)
        with torch.no_grad():
            z = s2.encoder(batch.xs)
        F.cross_entropy(s2.head(z), batch.ys, label_smoothing=p.label_smoothing).backward()
        inner.step()
    inner.zero_grad(set_to_none=True)
    F.cross_entropy(s2(batch.xs), batch.ys, label_smoothing=p.label_smoothing).backward()
    outer_opt.zero_grad(set_to_none=True)
    originals = list(student.parameters()) + list(projector.parameters())
    for q, q2 in zip(originals, params2):
        q.grad = None if q2.grad is None else q2.grad.clone()
    torch.nn.utils.clip_grad_norm_([q for q in originals if q.grad is not None], 5.0)
    outer_opt.step()
    with torch.no_grad():
        for b, b2 in zip(student.buffers(), s2.buffers()):
            b.copy_(b2)


@pytest.mark.parametrize("student_feat,n1,n2", [(8, 1, 1), (6, 2, 3)])
def test_bilevel_step_matches_deepcopy_reference(student_feat, n1, n2):
    torch.manual_seed(0)
    teacher = build_classifier((1, 8, 8), "image", 4, width=4, feat_dim=8).eval()
    student = build_classifier((1, 12), "signal", 4, width=4, feat_dim=student_feat)
    params = {"n1": n1, "n2": n2, "inner_lr": 1e-2, "inner_wd": 0.05, "n_iter": 20}
    d = build_distiller("ucmkd-bilevel", student, teacher, params)
    ref_student = copy.deepcopy(student)
    ref_proj = copy.deepcopy(d.extra["projector"]) if "projector" in d.extra else torch.nn.Identity()
    opt = torch.optim.AdamW(d.trainable_parameters(), lr=1e-2, weight_decay=0.05)
    ref_opt = torch.optim.AdamW(list(ref_student.parameters()) + list(ref_proj.parameters()), lr=1e-2,
                                weight_decay=0.05)
    strat = BilevelStrategy(d, opt, clip_norm=5.0)
    d.train()
    ref_student.train()
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        batch = Batch(torch.randn(16, 1, 12, generator=g), torch.randint(0, 4, (16,), generator=g),
                      torch.randn(16, 1, 8, 8, generator=g))
        strat.step(batch)
        reference_bilevel_step(ref_student, ref_proj, teacher, ref_opt, batch, d.params, d.fa)
    for (n, a), b in zip(student.named_parameters(), ref_student.parameters()):
        assert torch.allclose(a, b, atol=1e-6), n
    for (n, a), b in zip(student.named_buffers(), ref_student.buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), n
    for a, b in zip(d.extra.parameters(), ref_proj.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    # the step really moved the weights and the BN statistics
    fresh = build_classifier((1, 12), "signal", 4, width=4, feat_dim=student_feat)
    assert not torch.allclose(fresh.head.weight, student.head.weight)
    assert int(student.encoder.stages[0][1].num_batches_tracked) == 3 * (n1 + n2 + 1)


def test_bilevel_does_not_deepcopy(monkeypatch):
    torch.manual_seed(0)
    teacher = build_classifier((4,), "vector", 3, width=8, feat_dim=8).eval()
    student = build_classifier((5,), "vector", 3, width=8, feat_dim=8)
    d = build_distiller("ucmkd-bilevel", student, teacher, {"n_iter": 5})

    def forbidden(*a, **k):
        raise AssertionError("deepcopy called in the bilevel step")

    monkeypatch.setattr(copy, "deepcopy", forbidden)
    strat = BilevelStrategy(d, torch.optim.AdamW(d.trainable_parameters()), 5.0)
    logs = strat.step(Batch(torch.randn(8, 5), torch.randint(0, 3, (8,)), torch.randn(8, 4)))
    assert set(logs) == {"fa_inner", "head_inner", "outer_ce_ls"}
    assert teacher.head.weight.grad is None
