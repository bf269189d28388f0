"""Worker of the multi-process tests (tests/integration/test_distributed.py), run by torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/support/distributed_workers.py TASK ... [+ TASK ...]

(tasks separated by ``+`` run one after the other in the same processes: one start-up for all)

- ``grads CACHE OUT``: for every case of :data:`GRAD_CASES` (a method, under fp32 or bf16),
  one training step on the first global batch of :func:`grad_config` with a student without
  batch norm (:func:`no_bn_student`); every rank saves the gradients it steps with to
  ``OUT.rank<r>``.
- ``collectives OUT``: the helpers of :mod:`ucmkd.engine.distributed` against torch.distributed's
  own collectives (the library is the oracle) and their error paths; every rank saves
  ``{check: bool}`` to ``OUT.rank<r>``.
- ``fit CONFIG RUN_DIR WRITES [KILL_AFTER_EPOCH]``: ``ucmkd train --config CONFIG --run-dir
  RUN_DIR`` (the CLI's own ``main``); every atomic write is logged to WRITES as ``<rank>
  <path>``; with KILL_AFTER_EPOCH, rank 0 SIGKILLs itself right after that epoch's commit
  (torchrun then stops the other rank: every process of the run is killed).

Imported by the tests too: :func:`grad_config`, :func:`no_bn_student` and :func:`step_grads`
give the single-process reference.
"""
from __future__ import annotations

import os
import signal
import sys

import torch
from torch import nn

from ucmkd.config import RunConfig
from ucmkd.models import Classifier

from factories import SMALL_TEACHER, run_config

#: method -> params of the gradient-equality check (no warm-up ramp, so that every term counts
#: at the first step; ucmkd: a fixed pseudo-label threshold below the largest class probability
#: of some items, so that the confident mask is partial and differs between the shards)
GRAD_METHODS = {
    "ce": {},
    "kd": {},
    "fa-only": {"n_iter": 20},
    "ucmkd-joint": {"n_iter": 20},
    "mmd": {},
    "ucmkd": {"n_iter": 20, "precision": 0.0, "threshold": 0.36, "warmup": 0.0},
    "ucmkd-bilevel": {"n_iter": 20, "inner_lr": 1e-2},
}

#: case -> (method, precision, params over GRAD_METHODS'): every method in fp32 (the OT methods'
#: defaults: autodiff gradient for the paper's, envelope for ucmkd), fa-only with the envelope
#: gradient, the paper's and the default method in bf16
GRAD_CASES = {**{m: (m, "fp32", {}) for m in GRAD_METHODS},
              "fa-only@envelope": ("fa-only", "fp32", {"grad": "envelope"}),
              **{f"{m}@bf16": (m, "bf16", {}) for m in ("ucmkd-joint", "ucmkd", "ucmkd-bilevel")}}


def grad_config(method: str, cache_dir: str, precision: str = "fp32", params: dict | None = None) -> RunConfig:
    """4-class synthetic problem, global batch 16 (8 per rank on 2 ranks), 10 labels per class."""
    return run_config(method, None, cache_dir, data="synthetic", layers=(SMALL_TEACHER,), threads=1, **{
        "optim.batch_size": 16, "optim.steps_per_epoch": 2, "optim.clip_norm": 0.0, "optim.precision": precision,
        "method.params": {**GRAD_METHODS[method], **(params or {})}})


def no_bn_student(input_dim: int, num_classes: int) -> Classifier:
    """An MLP student without batch norm (feature width 6, so the OT methods add a projector to
    the teacher's 8), initialised from a fixed seed."""
    torch.manual_seed(123)
    enc = nn.Sequential(nn.Linear(input_dim, 16), nn.Tanh(), nn.Linear(16, 6))
    return Classifier(enc, 6, num_classes, (input_dim,), name="student[no-bn]")


def step_grads(case: str, cache_dir: str) -> dict:
    """{"grads": [gradient of every trainable parameter], "logs": the step's logs} of one step on
    the first batch (this rank's shard under torchrun) in ``case`` of :data:`GRAD_CASES`, as the
    strategy steps with them."""
    from ucmkd.api import load_pair, prepare
    from ucmkd.engine import distributed

    method, precision, params = GRAD_CASES[case]
    cfg = grad_config(method, cache_dir, precision, params)
    s, t = load_pair(cfg)          # generated in memory: no cache file
    ctx = prepare(cfg, student=s, teacher_data=t, student_model=no_bn_student(s.input_shape[0], s.num_classes))
    trainer = ctx.trainer()
    strategy, seen = trainer.strategy, {}
    step = strategy._clip_and_step

    def capture(where):
        seen["grads"] = [None if q.grad is None else q.grad.detach().clone()
                         for q in ctx.distiller.trainable_parameters()]
        return step(where)

    strategy._clip_and_step = capture
    ctx.distiller.train()
    batch = next(iter(ctx.sampler.epoch(0)))
    with distributed.active(ctx.dist):
        logs = strategy.step(batch)
    return {"grads": seen["grads"], "logs": logs, "batch": len(batch.ys)}


def _grads(cache_dir: str, out: str) -> None:
    from ucmkd.engine import distributed

    res = {c: step_grads(c, cache_dir) for c in GRAD_CASES}
    torch.save(res, f"{out}.rank{distributed.init_from_env().rank}")


def _collectives(out: str) -> None:
    import warnings

    import torch.distributed as dist
    import torch.distributed.nn.functional as dnn

    from ucmkd.engine import distributed
    from ucmkd.errors import DataError

    dp = distributed.init_from_env()
    r, n = dp.rank, dp.world_size
    g = torch.Generator().manual_seed(10 + r)
    x, k, m = torch.randn(3, 2, generator=g), torch.randint(0, 9, (3,), generator=g), torch.rand(3, generator=g) > 0.5
    res = {}
    with distributed.active(dp):
        gx, gk, gm = distributed.gather(x, k, m)
        for name, mine, got in (("float", x, gx), ("int64", k, gk), ("bool", m, gm)):
            ref = [torch.empty_like(mine) for _ in range(n)]
            dist.all_gather(ref, mine)
            res[f"gather {name}"] = torch.equal(got, torch.cat(ref))
        w = torch.arange(6.0 * n).reshape(3 * n, 2)
        a = x.clone().requires_grad_(True)
        (distributed.gather_with_grad(a.t().contiguous().t()) * w).sum().backward()   # a non-contiguous view
        b = x.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)          # deprecated in 2.13: the oracle still
            (torch.cat(dnn.all_gather(b)) * w).sum().backward()
        res["gather_with_grad = torch.distributed.nn.functional.all_gather"] = torch.equal(a.grad, b.grad)
        res["local_rows"] = torch.equal(distributed.local_rows(gx), x)
        res["local_masked_rows"] = torch.equal(distributed.local_masked_rows(gx[gm], gm), x[m])
    try:
        distributed.check_same_on_ranks(dp, r, "the rank")
        res["check_same_on_ranks names the odd rank"] = False
    except DataError as e:
        res["check_same_on_ranks names the odd rank"] = "rank 1 has 1" in str(e)
    distributed.check_same_on_ranks(dp, "same", "a value")

    def fails():
        raise DataError("rank 0 found a problem")

    try:
        distributed.on_rank_zero(dp, fails)
        res["on_rank_zero raises rank 0's error everywhere"] = False
    except DataError as e:
        res["on_rank_zero raises rank 0's error everywhere"] = str(e) == "rank 0 found a problem"
    res["on_rank_zero gives rank 0's value"] = distributed.on_rank_zero(dp, lambda: ("v", r)) == ("v", 0)
    bn = torch.nn.BatchNorm1d(3)
    bn.running_mean.fill_(float(r))
    bn.num_batches_tracked.fill_(r + 5)
    distributed.broadcast_buffers(dp, [bn])
    res["broadcast_buffers"] = bool((bn.running_mean == 0).all()) and int(bn.num_batches_tracked) == 5
    params = [torch.zeros(2), torch.zeros(3)]
    grads = [torch.full((2,), float(r + 1)), None if r == 0 else torch.ones(3)]
    avg = distributed.average_param_grads(dp, params, grads)
    res["average_param_grads: mean, None counted as 0"] = (torch.equal(avg[0], torch.full((2,), 1.5)) and
                                                           torch.equal(avg[1], torch.full((3,), 0.5)))
    res["average_param_grads: None everywhere stays None"] = distributed.average_param_grads(
        dp, params, [grads[0], None])[1] is None
    torch.save(res, f"{out}.rank{r}")


def _fit(config: str, run_dir: str, writes: str, kill_after: int | None) -> None:
    import ucmkd.cache as cache
    from ucmkd.cli import main as cli
    from ucmkd.engine import Trainer

    rank = int(os.environ["RANK"])
    orig = cache._replace

    def logged(tmp, path):
        orig(tmp, path)
        with open(writes, "a") as f:
            f.write(f"{rank} {path}\n")

    cache._replace = logged
    if kill_after is not None:
        commit = Trainer._commit

        def commit_then_die(self, improved):
            commit(self, improved)
            if self.writer and self.epoch == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

        Trainer._commit = commit_then_die
    if cli(["train", "--no-progress", "--config", config, "--run-dir", run_dir]) != 0:
        sys.exit(2)
    cache._replace = orig


def main(argv: list[str]) -> None:
    from ucmkd.engine import distributed

    torch.set_num_threads(1)
    tasks, cur = [], []
    for a in argv + ["+"]:
        if a == "+":
            tasks.append(cur)
            cur = []
        else:
            cur.append(a)
    for task, *args in tasks:
        if task == "grads":
            _grads(*args)
        elif task == "collectives":
            _collectives(*args)
        elif task == "fit":
            _fit(args[0], args[1], args[2], int(args[3]) if len(args) > 3 else None)
        else:
            sys.exit(f"unknown task {task!r}")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
