"""Semi-supervised terms on unlabelled student items (shared by ``pseudo-label`` and ``ucmkd``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def confident_targets(probs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels and their confidence mask from class probabilities ``probs`` [B, K]
    (no gradient): (labels [B] int64, mask [B] bool = max prob >= ``threshold``)."""
    if probs.dim() != 2:
        raise ValueError(f"confident_targets: probs must be [B, K], got {list(probs.shape)}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"confident_targets: threshold must be in [0, 1], got {threshold}")
    conf, labels = probs.detach().max(dim=1)
    return labels, conf >= threshold


def masked_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_i mask_i * CE(logits_i, labels_i) / B: the pseudo-label loss, normalised by the whole
    batch (as in FixMatch), so it fades when few items are confident. logits [B, K]."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits, labels, reduction="none")
    return (ce * mask.to(ce.dtype)).sum() / logits.shape[0]


def ramp(progress: float, warmup: float) -> float:
    """Weight in [0, 1]: linear from 0 to 1 over the first ``warmup`` fraction of training."""
    return 1.0 if warmup <= 0 else min(1.0, max(0.0, progress) / warmup)


class PriorAlignment(nn.Module):
    """Label-distribution alignment of pseudo-label probabilities (as in ReMixMatch):
    q = normalise(p * prior / mean_p), with mean_p a running mean of the student's predicted
    class distribution on unlabelled items and ``prior`` the class frequencies of the labels
    given (e.g. the teacher's label counts). It stops pseudo-labels collapsing onto a few classes.
    """

    def __init__(self, num_classes: int, momentum: float = 0.999):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean_p", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("threshold", torch.tensor(1.0))   # set by validation calibration

    @torch.no_grad()
    def align(self, probs: torch.Tensor, prior_counts: torch.Tensor, update: bool = True) -> torch.Tensor:
        """probs [B, K] -> aligned probs [B, K]; ``update``: also update the running mean;
        prior_counts [K]."""
        if update:
            self.mean_p.mul_(self.momentum).add_((1 - self.momentum) * probs.mean(0))
        prior = prior_counts.to(probs.dtype)
        prior = prior / prior.sum() if prior.sum() > 0 else torch.full_like(prior, 1.0 / len(prior))
        q = probs * (prior / self.mean_p.clamp(min=1e-6))[None, :]
        return q / q.sum(1, keepdim=True).clamp(min=1e-12)


def fixmatch_unlabelled_loss(logits_weak: torch.Tensor, logits_strong: torch.Tensor,
                             threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FixMatch's unlabelled term (Sohn et al., 2020): hard pseudo-labels from the weak view's
    probabilities (no gradient) where max p >= ``threshold``, cross-entropy of the strong view
    on them, summed over confident items / B_u. logits_* [B_u, K]. Returns (loss, mask [B_u])."""
    yhat, mask = confident_targets(logits_weak.detach().softmax(1), threshold)
    return masked_ce(logits_strong, yhat, mask), mask


class FreeMatchThreshold(nn.Module):
    """FreeMatch's self-adaptive thresholds (Wang et al., ICLR 2023), as buffers (checkpointed):
    global tau (EMA of the mean max confidence, eq. 6), local p_model [K] (EMA of the mean class
    probability, eq. 7) and label_hist [K] (EMA of the histogram of pseudo-labels, for the
    fairness term); all start at 1/K. The threshold of class c is
    tau * p_model[c] / max(p_model) (eq. 8-9)."""

    def __init__(self, num_classes: int, momentum: float = 0.999):
        super().__init__()
        self.momentum = momentum
        k = num_classes
        self.register_buffer("tau", torch.tensor(1.0 / k))
        self.register_buffer("p_model", torch.full((k,), 1.0 / k))
        self.register_buffer("label_hist", torch.full((k,), 1.0 / k))

    @torch.no_grad()
    def update(self, probs: torch.Tensor) -> None:
        """EMA update from the weak view's probabilities ``probs`` [B_u, K]."""
        m = self.momentum
        conf, labels = probs.max(dim=1)
        hist = torch.bincount(labels, minlength=probs.shape[1]).to(probs.dtype) / len(labels)
        self.tau.mul_(m).add_((1 - m) * conf.mean())
        self.p_model.mul_(m).add_((1 - m) * probs.mean(0))
        self.label_hist.mul_(m).add_((1 - m) * hist)

    def class_thresholds(self) -> torch.Tensor:
        """tau_t(c) = tau * MaxNorm(p_model)(c), [K]."""
        return self.tau * self.p_model / self.p_model.max()

    @torch.no_grad()
    def mask(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pseudo-labels [B_u], mask [B_u] bool = max p >= tau_t(argmax p)) of ``probs`` [B_u, K]."""
        conf, labels = probs.max(dim=1)
        return labels, conf >= self.class_thresholds()[labels]


def freematch_fairness(logits_strong: torch.Tensor, mask: torch.Tensor, p_model: torch.Tensor,
                       label_hist: torch.Tensor) -> torch.Tensor:
    """FreeMatch's self-adaptive fairness term (eq. 11): L_f = -H(SumNorm(p_model / label_hist),
    SumNorm(p_bar / h_bar)) = sum_c a_c log b_c, with p_bar [K] the mean strong-view probability
    and h_bar [K] the normalised histogram of strong-view predictions over the confident items
    (``mask`` [B_u]); classes absent from h_bar get b_c = 0 (log clamped at 1e-12). Minimising it
    raises the cross-entropy, i.e. spreads the average prediction over the classes (the authors'
    reading, microsoft/Semi-supervised-learning#182). 0 when no item is confident."""
    if not bool(mask.any()):
        return logits_strong.sum() * 0.0
    probs = logits_strong[mask].softmax(1)
    k = probs.shape[1]
    h_bar = torch.bincount(probs.detach().argmax(1), minlength=k).to(probs.dtype)
    h_bar = h_bar / h_bar.sum()
    p_bar = probs.mean(0)
    ratio = torch.where(h_bar > 0, p_bar / h_bar.clamp(min=1e-12), torch.zeros_like(p_bar))
    b = ratio / ratio.sum()
    a = p_model / label_hist
    a = (a / a.sum()).to(probs.dtype)
    return (a * torch.log(b.clamp(min=1e-12))).sum()
