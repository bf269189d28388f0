"""The frozen-teacher output table: served rows equal a live forward, keyed by content."""
import pytest
import torch

from ucmkd.config import DataConfig, PairingConfig, SyntheticConfig
from ucmkd.data import PairingSampler, load_modality
from ucmkd.engine import teacher_outputs as to
from ucmkd.cache import state_digest
from ucmkd.engine.teacher_outputs import TeacherOutputs
from ucmkd.methods import build_distiller
from ucmkd.models import build_classifier


@pytest.fixture()
def setup():
    cfg = DataConfig(synthetic=SyntheticConfig(n_items=300))
    s, t = load_modality("synthetic/b", cfg), load_modality("synthetic/a", cfg)
    torch.manual_seed(0)
    teacher = build_classifier(t.input_shape, t.kind, t.num_classes, width=16, feat_dim=8).eval()
    student = build_classifier(s.input_shape, s.kind, s.num_classes, width=8, feat_dim=8)
    to.clear_memo()
    return s, t, teacher, student


def test_served_rows_equal_a_live_forward(setup):
    s, t, teacher, student = setup
    d = build_distiller("kd", student, teacher)
    d.use_teacher_outputs(TeacherOutputs(teacher, t))
    batch = next(PairingSampler(s, t, PairingConfig(label_budget=5), 16, 1).epoch(0))
    assert batch.it is not None and torch.equal(t.x[batch.it], batch.xt)
    z_live, l_live = teacher(batch.xt, return_features=True)
    z, lg = d.teacher_forward(batch)
    # eval-mode BatchNorm makes each row independent of the batch; the table is built in chunks of
    # other sizes, so rows agree up to float32 rounding of the same sums (|x| ~ 1, d <= 16 terms)
    tol = 64 * torch.finfo(torch.float32).eps * max(1.0, float(l_live.abs().max()))
    assert torch.allclose(z, z_live, atol=tol, rtol=0) and torch.allclose(lg, l_live, atol=tol, rtol=0)


def test_shifted_teacher_batches_are_forwarded_live(setup):
    s, t, teacher, student = setup
    d = build_distiller("kd", student, teacher)
    d.use_teacher_outputs(TeacherOutputs(teacher, t))
    cfg = PairingConfig(label_budget=5, shift_level=0.5, shift_side="teacher")
    batch = next(PairingSampler(s, t, cfg, 16, 1).epoch(0))
    assert batch.it is None
    z, lg = d.teacher_forward(batch)
    assert torch.equal(lg, teacher(batch.xt))


def test_table_is_keyed_by_teacher_weights_and_data(setup):
    s, t, teacher, _ = setup
    a = TeacherOutputs(teacher, t)
    key = a.key()
    assert TeacherOutputs(teacher, t).key() == key
    other = build_classifier(t.input_shape, t.kind, t.num_classes, width=16, feat_dim=8).eval()
    assert state_digest(other.state_dict()) != state_digest(teacher.state_dict()) and TeacherOutputs(other, t).key() != key
    t2 = load_modality("synthetic/a", DataConfig(synthetic=SyntheticConfig(n_items=300, seed=1)))
    assert TeacherOutputs(teacher, t2).key() != key
    # a changed teacher is never served from the old table
    it = t.splits["train"][:4]
    before = a.get(it)[1].clone()
    with torch.no_grad():
        teacher.head.bias.add_(1.0)
    fresh = TeacherOutputs(teacher, t).get(it)[1]
    assert torch.allclose(fresh, before + 1.0, atol=1e-5)


def test_items_outside_the_training_split_are_refused(setup):
    _, t, teacher, _ = setup
    with pytest.raises(IndexError, match="not in its training split"):
        TeacherOutputs(teacher, t).get(t.splits["test"][:2])
