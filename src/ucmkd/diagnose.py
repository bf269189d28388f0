"""``ucmkd diagnose``: will unpaired distillation pay off here, and why, before a full run.

The paper's bound (student error <= teacher error + feature alignment + label alignment) names
what to measure; :func:`diagnose` measures each part on short probes, in a small fraction of
one ``ucmkd`` run's time, and predicts the gain of ``ucmkd`` over ``ce``:

1. **Checks**: the two modalities' label sets (a mismatch is a DataError naming the classes),
   and the class balance of the student's labelled items, its training pool and the teacher's
   pool after the pairing options (largest/smallest class, and the total variation between the
   teacher pool's and the student pool's class priors).
2. **Teacher**: trained or taken from the cache exactly as ``ucmkd train`` would (its
   validation accuracy; the test split is never read by a probe).
3. **CE probe and learning curve**: ``ce`` on the run's labelled items (its label budget and
   seed) for a fraction ``probe_epochs`` of the run's epochs (same steps per epoch, batch and
   learning rate), scored on one half B of the validation split: the CE student's accuracy at the
   label budget. On its features, a closed-form linear classifier fitted on the labelled items,
   then on them plus the other validation half A, both scored on B: how much better the student
   gets with more labels, which bounds what ``ucmkd``'s pseudo-labels and teacher terms can add.
4. **Alignment probe** on the CE probe's features: a least-squares linear map P of the
   labelled items' features onto the teacher's class means of their labels (closed form, the
   "brief alignment"), then on the validation split (:func:`ucmkd.diagnostics.alignment_diagnostics`):
   the class-wise OT cost between P z and the teacher's features (FA), the frozen teacher
   head's accuracy on P z, the TV between the teacher head's and the probe head's predictions
   (LA), and the accuracy of their averaged vote (what ``ucmkd``'s pseudo-labels start from).
5. **Prediction**: a ridge regression on features of these probes (:class:`GainModel`), whose
   coefficients ship with the package (``diagnose_model.json``), fitted only on runs of
   validation seeds (100+) by ``benchmarks/diagnose_validation.py``; the interval is the 80 %
   quantile of its leave-one-setting-out errors on those runs. Verdict: *teacher too weak*
   when the teacher does not beat the CE probe by 2 pp (and the probe is below 95 %), else
   *distil* when the predicted gain is at least 1 pp, else *do not bother*.

Time: everything after the teacher is ready (a cached teacher costs a load); ``seconds`` is the
whole call, ``teacher_seconds`` the part spent getting the teacher.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

from .config import SUPERVISED, RunConfig, from_dict, to_dict
from .errors import DataError
from .gain_model import COEFFICIENTS_FILE, GainModel, features_of  # noqa: F401  (diagnose's names)

PROBE_EPOCHS = 0.125         # fraction of the run's epochs the CE probe trains
PROBE_VERSION = 5            # bumped when the probes change (keys stored probe results)
PROBE_ITEMS = 256            # validation items per modality for the alignment probe's OT
WEAK_MARGIN = 2.0            # pp: a teacher must beat the CE probe by this much ...
CEILING = 95.0               # ... unless the probe is already this accurate (%)
MIN_GAIN = 1.0               # pp: predicted gains below this are not worth a run


@dataclass
class Diagnosis:
    """What :func:`diagnose` found (accuracies in [0, 1], counts, OT costs in cosine units)."""

    teacher: str
    student: str
    label_budget: Optional[int]
    num_classes: int
    n_labelled: int
    n_unlabelled: int
    n_teacher_pool: int
    labelled_balance: float          # largest / smallest class among the labelled student items
    student_balance: float           # the same over the student's training pool
    teacher_balance: float           # the same over the teacher's pool (after the pairing options)
    prior_tv: float                  # TV between the teacher pool's and the student pool's class priors
    teacher_val_acc: float
    ce_val_acc: float                # the CE probe at the label budget (validation half B)
    linear_val_acc: float            # a linear classifier on its features, fitted on the labelled items (half B)
    more_labels_val_acc: float       # the same with validation half A's labels added (half B)
    n_more_labels: int               # the items of half A
    ce_probe_steps: int              # steps of the CE probe
    fa: float                        # OT cost between aligned probe features and teacher features
    fa_classwise: float              # the same per class, averaged
    teacher_head_acc: float          # frozen teacher head on the aligned probe features (validation)
    la_tv: float                     # TV(teacher head, probe head) on validation items
    vote_acc: float                  # accuracy of the averaged teacher-head / probe-head vote
    seconds: float = 0.0
    teacher_seconds: float = 0.0
    teacher_cached: bool = True
    predicted_gain: Optional[float] = None    # pp
    interval: Optional[tuple] = None          # pp
    verdict: Optional[str] = None
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """The diagnosis as a Markdown table, read at a glance."""
        pct = lambda v: f"{100 * v:.1f} %"  # noqa: E731
        budget = "all items labelled" if self.label_budget is None else f"{self.label_budget} labels per class"
        head = (f"ucmkd diagnose: {self.teacher} -> {self.student}, {budget} "
                f"({self.seconds:.1f} s; teacher {'from the cache' if self.teacher_cached else 'trained'}"
                f"{'' if self.teacher_cached else f' in {self.teacher_seconds:.0f} s'})")
        rows = [
            ("label sets", f"identical, {self.num_classes} classes", ""),
            ("student items", f"{self.n_labelled} labelled, {self.n_unlabelled} unlabelled",
             "no unlabelled pool: ucmkd's pseudo-labels cannot help" if self.n_unlabelled == 0 else ""),
            ("class balance, largest:smallest", f"labelled {self.labelled_balance:.1f}, student pool "
             f"{self.student_balance:.1f}, teacher pool {self.teacher_balance:.1f}",
             f"prior TV {self.prior_tv:.2f}" + (" (long-tailed pool)" if max(self.teacher_balance, self.student_balance) > 3 else "")),
            ("teacher accuracy (val)", pct(self.teacher_val_acc), ""),
            ("CE student at the label budget (probe, val)", pct(self.ce_val_acc), f"{self.ce_probe_steps} steps"),
            ("learning curve: linear probe at the budget -> with more labels (val)",
             f"{pct(self.linear_val_acc)} -> {pct(self.more_labels_val_acc)}",
             f"+{self.n_more_labels} labelled validation items: "
             f"{100 * (self.more_labels_val_acc - self.linear_val_acc):+.1f} pp"),
            ("headroom: teacher - CE probe", f"{100 * (self.teacher_val_acc - self.ce_val_acc):+.1f} pp", ""),
            ("FA: class-wise OT cost (aligned probe features)", f"{self.fa_classwise:.2f}",
             f"global {self.fa:.2f}; 0 = each class on the teacher's"),
            ("teacher head on aligned student features (val)", pct(self.teacher_head_acc), "bound's teacher term, transferred"),
            ("LA: TV(teacher head, student head)", f"{self.la_tv:.2f}", "0 = same predictions"),
            ("teacher-guided vote (val)", pct(self.vote_acc), "where ucmkd's pseudo-labels start"),
        ]
        if self.predicted_gain is not None:
            lo, hi = self.interval
            rows.append(("predicted gain of ucmkd over ce", f"{self.predicted_gain:+.1f} pp [{lo:+.1f}, {hi:+.1f}]",
                         "80 % interval"))
        if self.verdict is not None:
            rows.append(("**verdict**", f"**{self.verdict}**", self.reason))
        lines = [head, "", "| check | value | note |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
        return "\n".join(lines)


# --------------------------------------------------------------------------- alignment helpers
def least_squares_map(z: torch.Tensor, y: torch.Tensor, zt: torch.Tensor, yt: torch.Tensor, num_classes: int,
                      ridge: float = 1e-3) -> torch.nn.Linear:
    """Linear map P: d_s -> d_t (an ``nn.Linear``) minimising ``sum_i |P z_i - mu_T(y_i)|^2 +
    ridge * n * v * |W|^2`` (mu_T(c): mean teacher feature of class c over ``zt`` [M, d_t], ``yt`` [M];
    v: the mean squared centred student feature value, so the penalty follows the features' scale),
    for student features ``z`` [n, d_s] with labels ``y`` [n]; solved in closed form in float64
    (features centred, so the bias is not penalised). Classes absent from ``zt`` are skipped."""
    z64, zt64 = z.detach().double(), zt.detach().double()
    mu = torch.zeros(num_classes, zt.shape[1], dtype=torch.float64)
    have = torch.zeros(num_classes, dtype=torch.bool)
    for c in range(num_classes):
        sel = yt == c
        if sel.any():
            mu[c], have[c] = zt64[sel].mean(0), True
    keep = have[y]
    if not keep.any():
        raise DataError("alignment probe: no labelled student item has a class present in the teacher pool")
    x, t = z64[keep], mu[y[keep]]
    xm, tm = x.mean(0), t.mean(0)
    xc, tc = x - xm, t - tm
    a = xc.T @ xc + ridge * len(x) * max(float(xc.pow(2).mean()), 1e-12) * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(a, xc.T @ tc)                        # [d_s, d_t]
    lin = torch.nn.Linear(z.shape[1], zt.shape[1])
    with torch.no_grad():
        lin.weight.copy_(w.T.float())
        lin.bias.copy_((tm - xm @ w).float())
    return lin.requires_grad_(False)


def ridge_classifier(z: torch.Tensor, y: torch.Tensor, num_classes: int, ridge: float = 1e-2):
    """Closed-form linear classifier: features ``z`` [n, d] standardised with their own mean and
    (population) std, one-hot targets of ``y`` [n], weights ``argmin |[Z 1] W - Y|^2 + ridge * n *
    |W|^2`` in float64. Returns a function mapping features [m, d] to scores [m, K]."""
    z = z.detach().double()
    mean, std = z.mean(0), z.std(0, unbiased=False).clamp_min(1e-6)

    def design(x):
        return torch.cat([(x.detach().double() - mean) / std, torch.ones(len(x), 1, dtype=torch.float64)], 1)

    a = design(z)
    target = torch.nn.functional.one_hot(y, num_classes).double()
    w = torch.linalg.solve(a.T @ a + ridge * len(a) * torch.eye(a.shape[1], dtype=torch.float64), a.T @ target)
    return lambda x: design(x) @ w


def _accuracy(scores, z: torch.Tensor, y: torch.Tensor) -> float:
    return float((scores(z).argmax(1) == y).double().mean())


def _balance(y: np.ndarray, k: int) -> float:
    counts = np.bincount(y, minlength=k)
    present = counts[counts > 0]
    return float(present.max() / present.min()) if len(present) else math.nan


def _prior(y: np.ndarray, k: int) -> np.ndarray:
    c = np.bincount(y, minlength=k).astype(np.float64)
    return c / max(1.0, c.sum())


# --------------------------------------------------------------------------- the probes
def probe_config(cfg: RunConfig, probe_epochs: float = PROBE_EPOCHS) -> RunConfig:
    """The CE probe's config: ``cfg`` with method ``ce`` on every training item it is given (no
    label budget), no augmentation, and ``probe_epochs`` of its epochs (at least 2; warm-up at
    most a third of them)."""
    d = to_dict(cfg)
    epochs = max(2, int(round(probe_epochs * cfg.optim.epochs)))
    d.update(method={"name": SUPERVISED, "params": {}}, pairing={"label_budget": None}, augment={}, logging={},
             recipe=None)
    d["optim"]["epochs"] = epochs
    d["optim"]["warmup_epochs"] = min(cfg.optim.warmup_epochs, epochs // 3)
    return from_dict(RunConfig, d)


def ce_probe(pcfg: RunConfig, data, train_idx: np.ndarray, eval_idx: np.ndarray):
    """(model in eval mode, validation accuracy on ``eval_idx``, steps): ``ce`` trained with the
    probe config on the labelled items ``train_idx`` of ``data`` (best epoch on ``eval_idx``; the
    test split is never read): an ordinary run of ``pcfg`` on a view of ``data`` whose splits are
    those items, in this process."""
    from dataclasses import replace

    from .assembly import prepare

    view = replace(data, splits={"train": torch.as_tensor(np.sort(train_idx)), "val": torch.as_tensor(eval_idx),
                                 "test": torch.as_tensor(eval_idx[:1])})
    ctx = prepare(pcfg, student=view, single_process=True)
    trainer = ctx.trainer(desc=f"ce probe {data.name}")
    fit = trainer.fit()
    trainer.restore_best()
    return ctx.model.eval(), float(fit.val_acc), int(trainer.step_count)


def diagnose(cfg: RunConfig, student=None, teacher_data=None, teacher=None, teacher_info=None,
             predict: bool = True, model: Optional["GainModel"] = None, probe_epochs: float = PROBE_EPOCHS,
             progress: bool = False) -> Diagnosis:
    """Diagnose the setting of ``cfg`` (module docstring): checks, teacher, probes and, with
    ``predict``, the predicted gain of ``ucmkd`` over ``ce`` and a verdict (``model``: a
    :class:`GainModel`, default the shipped one). Data and teacher may be passed in as for
    :func:`ucmkd.run`."""
    from .assembly import load_pair, sampler_for
    from .checks import check_data
    from .data import check_compatible
    from .diagnostics import alignment_diagnostics
    from .engine import apply_threads, evaluate, get_teacher
    from .engine.teacher import teacher_dir

    t0 = time.time()
    apply_threads(cfg.threads)
    if predict and model is None:
        model = GainModel.load()                 # a missing coefficients file fails before any work
    if student is None or teacher_data is None:
        s, t = load_pair(cfg)
        student = student if student is not None else s
        teacher_data = teacher_data if teacher_data is not None else t
    check_data(student, "student")
    check_data(teacher_data, "teacher_data")
    check_compatible(student, teacher_data)      # label sets: a DataError names the classes
    t1 = time.time()
    cached = (teacher is not None or cfg.teacher.checkpoint is not None
              or (teacher_dir(cfg, teacher_data) / "teacher.pt").is_file())
    if teacher is None:
        teacher, teacher_info = get_teacher(cfg, teacher_data, progress=progress)
    teacher.eval()
    t_val = (teacher_info or {}).get("val_acc")
    if t_val is None:
        t_val = evaluate(teacher, *teacher_data.split("val"))[0]
    teacher_seconds = time.time() - t1
    k = student.num_classes
    sampler = sampler_for(cfg, student, teacher_data, unlabelled=True, require_unlabelled=False)   # the run's draw
    sy, ty = student.y.numpy(), teacher_data.y.numpy()
    pool = np.concatenate([sampler.labelled, sampler.unlabelled_pool])
    # the validation split in two halves: A adds labels to the learning-curve probe, B scores both
    val = student.splits["val"].numpy()
    perm = np.random.default_rng([cfg.seed, 7]).permutation(val)
    half_a, half_b = np.sort(perm[: len(perm) // 2]), np.sort(perm[len(perm) // 2:])
    pcfg = probe_config(cfg, probe_epochs)
    probe, ce_acc, steps = ce_probe(pcfg, student, sampler.labelled, half_b)
    with torch.no_grad():
        lab, ia, ib = (torch.as_tensor(i) for i in (sampler.labelled, half_a, half_b))
        zl, za, zb = (probe.features(student.x[i]) for i in (lab, ia, ib))
        yl, ya, yb = (student.y[i] for i in (lab, ia, ib))
        # the learning curve, in the probe's feature space: a closed-form linear classifier on the
        # labelled items, then with half A's labels added, both scored on half B
        lin_acc = _accuracy(ridge_classifier(zl, yl, k), zb, yb)
        more_acc = _accuracy(ridge_classifier(torch.cat([zl, za]), torch.cat([yl, ya]), k), zb, yb)
        tr = teacher_data.splits["train"]
        tr = tr[torch.randperm(len(tr), generator=torch.Generator().manual_seed(cfg.seed))[:512]]
        pmap = least_squares_map(zl, yl, teacher.features(teacher_data.x[tr]), teacher_data.y[tr], k)
        diag = alignment_diagnostics(probe, teacher, student, teacher_data, projector=pmap, max_items=PROBE_ITEMS,
                                     seed=cfg.seed, device=cfg.device)
        xv, yv = student.split("val")
        z, logits = probe(xv, return_features=True)
        vote = 0.5 * (logits.softmax(1) + teacher.head(pmap(z)).softmax(1))
        vote_acc = float((vote.argmax(1) == yv).float().mean())
    d = Diagnosis(
        teacher=cfg.data.teacher, student=cfg.data.student, label_budget=cfg.pairing.label_budget, num_classes=k,
        n_labelled=int(len(sampler.labelled)), n_unlabelled=int(len(sampler.unlabelled_pool)),
        n_teacher_pool=int(len(sampler.teacher_pool)), labelled_balance=_balance(sy[sampler.labelled], k),
        student_balance=_balance(sy[pool], k), teacher_balance=_balance(ty[sampler.teacher_pool], k),
        prior_tv=float(0.5 * np.abs(_prior(ty[sampler.teacher_pool], k) - _prior(sy[pool], k)).sum()),
        teacher_val_acc=float(t_val), ce_val_acc=ce_acc, linear_val_acc=lin_acc, more_labels_val_acc=more_acc,
        n_more_labels=len(half_a),
        ce_probe_steps=steps,
        fa=diag["fa"], fa_classwise=diag["fa_classwise"], teacher_head_acc=diag["teacher_head_acc"],
        la_tv=diag["la_tv"], vote_acc=vote_acc, teacher_seconds=teacher_seconds, teacher_cached=cached)
    if predict:
        pred, lo, hi = model.predict(features_of(d.to_dict()))
        d.predicted_gain, d.interval = pred, (lo, hi)
        d.verdict, d.reason = verdict(d)
    d.seconds = time.time() - t0
    return d


def verdict(d: Diagnosis) -> tuple[str, str]:
    """(verdict, reason) of the module docstring."""
    head = 100 * (d.teacher_val_acc - d.ce_val_acc)
    lo, hi = d.interval
    if head < WEAK_MARGIN and 100 * d.ce_val_acc < CEILING:
        return "teacher too weak", (f"the teacher ({100 * d.teacher_val_acc:.1f} %) does not beat the CE probe "
                                    f"({100 * d.ce_val_acc:.1f} %) by {WEAK_MARGIN:.0f} pp; ucmkd's own use of the "
                                    f"unlabelled items may still add {d.predicted_gain:+.1f} pp (interval {lo:+.1f} to "
                                    f"{hi:+.1f}), and its CE fallback guards against a harmful teacher")
    if d.predicted_gain >= MIN_GAIN:
        return "distil", f"predicted +{d.predicted_gain:.1f} pp over ce (interval {lo:+.1f} to {hi:+.1f})"
    return "do not bother", (f"predicted {d.predicted_gain:+.1f} pp over ce, below {MIN_GAIN:.0f} pp"
                             + (f"; ce is already at {100 * d.ce_val_acc:.1f} %" if 100 * d.ce_val_acc >= CEILING else ""))


__all__ = ["Diagnosis", "diagnose", "GainModel", "features_of", "least_squares_map", "probe_config", "verdict",
           "COEFFICIENTS_FILE"]
