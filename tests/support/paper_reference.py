"""Independent references of the paper methods' training steps, written in plain PyTorch from
the documented semantics (docs/reproduction.md), the obvious way: modules deep-copied per batch,
``torch.optim`` optimisers, ``torch.optim.lr_scheduler`` for the schedule, POT for the
transport. Nothing here calls ucmkd's strategies, losses or schedules. Used by the tests and by
``benchmarks/recipe_fidelity.py``.

``p`` below is a plain dict of the documented settings, e.g. ``{"lr": 1e-4, "inner_lr": 1e-5,
"label_smoothing": 0.0, "metric": "l2", ...}``.
"""
import contextlib
import copy

import ot
import torch
import torch.nn.functional as F


def cost(zs, zt, metric):
    """Ground cost [B, M] as the scripts' pairwise_ot_cost writes it (no truncation: equal widths)."""
    if metric == "cosine":
        return 1.0 - F.normalize(zs, dim=1) @ F.normalize(zt, dim=1).T
    if metric == "chordal":
        return torch.cdist(F.normalize(zs, dim=1), F.normalize(zt, dim=1))
    return torch.cdist(zs, zt, p=2.0 if metric == "l2" else 1.0)


def fa(zs, zt, p):
    """POT's entropic transport cost <P, C> with uniform marginals, autodiff through Sinkhorn."""
    zs, zt = zs.to(torch.promote_types(zs.dtype, torch.float32)), zt.to(torch.promote_types(zt.dtype, torch.float32))
    a = torch.full((zs.shape[0],), 1.0 / zs.shape[0], dtype=zs.dtype)
    b = torch.full((zt.shape[0],), 1.0 / zt.shape[0], dtype=zs.dtype)
    return ot.sinkhorn2(a, b, cost(zs, zt, p["metric"]), reg=p["eps"], numItermax=p["n_iter"])


def ce(logits, y, smoothing=0.0, reduction="mean"):
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y,
                           label_smoothing=smoothing, reduction=reduction)


def la(s_logits, t_logits, y, teacher_grad=True):
    """mean_i [-log p_S(y_i) + kappa_i log p_T(y_i)], kappa = p_T(y) detached; with
    teacher_grad False the teacher head's logits are constants (the AVE script's no_grad)."""
    if not teacher_grad:
        t_logits = t_logits.detach()
    f = torch.promote_types(s_logits.dtype, torch.float32)
    log_ps = F.log_softmax(s_logits.to(f), 1).gather(1, y[:, None]).squeeze(1)
    log_pt = F.log_softmax(t_logits.to(f), 1).gather(1, y[:, None]).squeeze(1)
    return (-log_ps + log_pt.detach().exp() * log_pt).mean()


def autocast(precision):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def outer_optimizer(params, p):
    """The scripts' outer optimiser with the epoch-0 learning rate of their schedule: torch's
    LinearLR(start_factor=min_lr/lr, total_iters=warmup) chained with CosineAnnealingLR in a
    SequentialLR (read back from the scheduler, not computed here)."""
    params = list(params)
    if p["optimizer"] == "adamw":
        opt = torch.optim.AdamW(params, lr=p["lr"], weight_decay=p["weight_decay"])
    else:
        opt = torch.optim.SGD(params, lr=p["lr"], momentum=p["momentum"])
    lr_schedule(opt, p)
    return opt


def lr_schedule(opt, p):
    """The scripts' per-epoch schedule on ``opt`` (its lr is set to epoch 0's value)."""
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=p["min_lr"] / p["lr"], end_factor=1.0,
                                             total_iters=p["warmup_epochs"])
    main = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p["epochs"] - p["warmup_epochs"],
                                                      eta_min=p["min_lr"])
    return torch.optim.lr_scheduler.SequentialLR(opt, [warm, main], milestones=[p["warmup_epochs"]])


def _clip_step(opt, params, clip):
    torch.nn.utils.clip_grad_norm_([q for q in params if q.grad is not None], clip)
    opt.step()


def ce_step(student, opt, batch, p):
    """CE only (the scripts' ce baseline)."""
    opt.zero_grad()
    with autocast(p.get("precision")):
        logits = student(batch.xs)
    ce(logits, batch.ys).backward()
    _clip_step(opt, list(student.parameters()), p["clip"])


def joint_step(student, projector, teacher, opt, batch, p):
    """The scripts' "sumall" step: CE + w_fa FA + w_la LA, clip, optimiser step."""
    opt.zero_grad()
    with autocast(p.get("precision")):
        with torch.no_grad():
            zt = teacher.encoder(batch.xt)
        zs = student.encoder(batch.xs)
        logits = student.head(zs)
        zp = projector(zs)
        t_logits = teacher.head(zp)
    loss = ce(logits, batch.ys) + p["w_fa"] * fa(zp, zt, p) + p["w_la"] * la(logits, t_logits, batch.ys,
                                                                              p["la_teacher_grad"])
    loss.backward()
    _clip_step(opt, list(student.parameters()) + list(projector.parameters()), p["clip"])


def bilevel_step(student, projector, teacher, opt, batch, p):
    """The scripts' bilevel step with a deep copy and a fresh torch.optim.AdamW per batch; the
    projector (where widths differ) is trained by the inner FA steps and keeps their update."""
    s2, pr2 = copy.deepcopy(student), copy.deepcopy(projector)
    s2.train()
    inner = torch.optim.AdamW(list(s2.parameters()) + list(pr2.parameters()), lr=p["inner_lr"],
                              weight_decay=p["inner_wd"])
    with torch.no_grad(), autocast(p.get("precision")):
        zt = teacher.encoder(batch.xt)
    for _ in range(p["n1"]):
        inner.zero_grad()
        with autocast(p.get("precision")):
            zs = pr2(s2.encoder(batch.xs))
        fa(zs, zt, p).backward()
        inner.step()
    for _ in range(p["n2"]):
        inner.zero_grad()
        with autocast(p.get("precision")):
            with torch.no_grad():
                z = s2.encoder(batch.xs)
            logits = s2.head(z)
        ce(logits, batch.ys, p["label_smoothing"]).backward()
        inner.step()
    inner.zero_grad()
    with autocast(p.get("precision")):
        logits = s2(batch.xs)
    ce(logits, batch.ys, p["label_smoothing"]).backward()
    opt.zero_grad()
    originals = list(student.parameters()) + list(projector.parameters())
    for q, q2 in zip(originals, list(s2.parameters()) + list(pr2.parameters())):
        q.grad = None if q2.grad is None else q2.grad.clone()
    _clip_step(opt, originals, p["clip"])
    with torch.no_grad():
        for b, b2 in zip(student.buffers(), s2.buffers()):
            b.copy_(b2)
        for q, q2 in zip(projector.parameters(), pr2.parameters()):
            q.copy_(q2)


# --------------------------------------------------------------------------- the recipes
#: What docs/reproduction.md documents for each recipe (read from the authors' run.sh,
#: main_overlap_tag.py and utils/helper.py per dataset), written out here independently of the
#: recipe YAML files: the tests check that the recipes produce exactly these steps.
_COMMON = {"clip": 5.0, "eps": 0.1, "n_iter": 100, "w_fa": 1.0, "w_la": 1.0, "n1": 1, "n2": 1, "inner_wd": 0.05}
DOCUMENTED = {
    "paper-ave": {**_COMMON, "optimizer": "adamw", "lr": 1e-4, "weight_decay": 1e-5, "epochs": 30, "warmup_epochs": 5,
                  "min_lr": 1e-5, "batch_size": 32, "metric": "l2",
                  "ucmkd-joint": {"la_teacher_grad": False},
                  "ucmkd-bilevel": {"inner_lr": 1e-5, "label_smoothing": 0.0, "precision": "bf16"},
                  "ce": {"precision": "bf16"},
                  "teacher": {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.05, "epochs": 20, "batch_size": 32,
                              "decay": "cosine", "min_lr": 1e-6, "precision": "bf16"}},
    "paper-cremad": {**_COMMON, "optimizer": "sgd", "momentum": 0.9, "lr": 1e-2, "weight_decay": 0.0, "epochs": 100,
                     "warmup_epochs": 5, "min_lr": 1e-5, "batch_size": 64, "metric": "cosine",
                     "ucmkd-joint": {"la_teacher_grad": True},
                     "ucmkd-bilevel": {"inner_lr": 1e-5, "label_smoothing": 0.0},
                     "ce": {},
                     "teacher": {"optimizer": "sgd", "lr": 1e-2, "weight_decay": 0.0, "epochs": 100, "batch_size": 64,
                                 "decay": "poly", "min_lr": 1e-4, "precision": "fp32"}},
    "paper-ravdess": {**_COMMON, "optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.05, "epochs": 100,
                      "warmup_epochs": 10, "min_lr": 1e-6, "batch_size": 64, "metric": "cosine",
                      "ucmkd-joint": {"la_teacher_grad": True},
                      "ucmkd-bilevel": {"inner_lr": 5e-5, "label_smoothing": 0.1},
                      "ce": {},
                      "teacher": {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.05, "epochs": 20, "batch_size": 64,
                                  "decay": "cosine", "min_lr": 1e-6, "precision": "fp32"}},
}


def documented(recipe, method):
    """The flat settings dict of ``recipe`` for ``method``."""
    doc = DOCUMENTED[recipe]
    return {**{k: v for k, v in doc.items() if not isinstance(v, dict)}, **doc[method]}


def teacher_lrs(recipe):
    """The teacher's per-epoch learning rates as the scripts set them: CosineAnnealingLR(T_max =
    epochs, eta_min) for AdamW teachers; adjust_lr's 1e-4 + (lr - 1e-4) (1 - e/100)^0.9 for
    the CREMA-D SGD teacher."""
    t = DOCUMENTED[recipe]["teacher"]
    if t["decay"] == "poly":
        return [t["min_lr"] + (t["lr"] - t["min_lr"]) * (1 - e / 100) ** 0.9 for e in range(t["epochs"])]
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=t["lr"])
    return _read_lrs(opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t["epochs"], eta_min=t["min_lr"]),
                     t["epochs"])


def _read_lrs(opt, sched, epochs):
    """The lr of each of ``epochs`` epochs under ``sched``, stepped once per epoch."""
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def student_lrs(recipe):
    """The student's per-epoch learning rates read back from torch's SequentialLR."""
    p = DOCUMENTED[recipe]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=p["lr"])
    return _read_lrs(opt, lr_schedule(opt, p), p["epochs"])


def tiny_models(dtype, k=4, feat=8):
    """A frozen image teacher (cnn2d, 8x8) and a Linear-ReLU-BN-Linear student on 12-d inputs,
    both with ``feat``-d features (no parameter whose gradient is zero up to rounding)."""
    from torch import nn

    from ucmkd.models import Classifier, build_classifier

    torch.manual_seed(0)
    teacher = build_classifier((1, 8, 8), "image", k, width=4, feat_dim=feat).to(dtype).eval()
    enc = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, feat))
    return teacher, Classifier(enc, feat, k, (1, 12), name="student").to(dtype)


def tiny_batch(dtype, n=32, k=4, seed=0):
    from ucmkd.data.pairing import Batch

    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    return Batch(torch.randn(n, 1, 12, generator=g, dtype=dtype), y, torch.randn(n, 1, 8, 8, generator=g, dtype=dtype), y)


STEPS = {"ce": ce_step, "ucmkd-joint": joint_step, "ucmkd-bilevel": bilevel_step}


def pinned_step(recipe, method, dtype=torch.float64, precision=None, overrides=()):
    """One training step of ``method`` under ``recipe`` (epoch 0, through ucmkd's config, optimiser,
    schedule and strategy) and of the reference above under the documented settings, from the
    same weights and batch. ``precision`` overrides the recipe's (None: the recipe's own);
    ``overrides`` (``key=value`` strings) change the ucmkd side only (to show a wrong setting shows).
    Returns max over parameter tensors of ||dW_ucmkd - dW_ref|| / ||dW_ref||."""
    from ucmkd.engine.precision import Precision
    from ucmkd.engine.strategies import STRATEGIES
    from ucmkd.engine.trainer import build_optimizer, scheduled_lr
    from ucmkd.methods import build_distiller
    from ucmkd.recipes import recipe_config

    over = ([] if precision is None else [f"optim.precision={precision}"]) + list(overrides)
    cfg = recipe_config(recipe, method, over)
    teacher, student = tiny_models(dtype)
    ref_student = copy.deepcopy(student)
    w0 = [q.detach().clone() for q in student.parameters()]
    d = build_distiller(cfg.method.name, student, None if method == "ce" else teacher, cfg.method.params).to(dtype)
    opt = build_optimizer(d.trainable_parameters(), cfg.optim)
    for g in opt.param_groups:
        g["lr"] = scheduled_lr(cfg.optim, 0, 10)
    d.train()
    STRATEGIES.get(d.strategy)(d, opt, cfg.optim.clip_norm, Precision(cfg.optim.precision)).step(tiny_batch(dtype))

    p = documented(recipe, method)
    p["precision"] = precision or p.get("precision", "fp32")
    ref_opt = outer_optimizer(ref_student.parameters(), p)
    ref_student.train()
    step = STEPS[method]
    args = (ref_student, ref_opt, tiny_batch(dtype), p) if method == "ce" else \
        (ref_student, torch.nn.Identity(), teacher, ref_opt, tiny_batch(dtype), p)
    step(*args)
    worst = 0.0
    for (n, a), b, w in zip(student.named_parameters(), ref_student.parameters(), w0):
        da, db = (a.detach() - w).double(), (b.detach() - w).double()
        if not float(db.norm()) > 0:
            raise AssertionError(f"{recipe} {method}: the reference step did not move {n}")
        worst = max(worst, float((da - db).norm() / db.norm()))
    return worst
