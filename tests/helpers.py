"""Small shared fixtures for the method tests (importable: pytest puts tests/ on sys.path)."""
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
