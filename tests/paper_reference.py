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
