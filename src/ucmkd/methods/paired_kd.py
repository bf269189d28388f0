"""Paired-data oracle: vanilla KD (Hinton et al., 2015) on the TRUE cross-modal pairs."""
from __future__ import annotations

from .base import register_method
from .kd import KD


@register_method("paired-kd")
class PairedKD(KD):
    """Exactly :class:`~ucmkd.methods.kd.KD` (T = 4, alpha = 0.9), but ``needs_pairs``: a run
    is rejected unless ``pairing.mode: paired``, so each teacher logit comes from the student
    item's true pair (datasets with ``pair_id``, e.g. ``synthetic/a``/``synthetic/b``). The upper
    reference for what instance pairs would buy."""

    needs_pairs = True
