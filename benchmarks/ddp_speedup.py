"""Speed-up of data parallelism on this machine: ``ucmkd`` at global batch 256, 1 process x 1
thread against ``torchrun --nproc_per_node=2`` x 1 thread each, and the communication per step.

    UCMKD_CACHE=/tmp/ucmkd-cache python benchmarks/ddp_speedup.py [--repeats 5] [--epochs 4]

The runs are timed in the middle of training, where a real run spends its time: a
60-epoch run is first trained for ``--from-epoch`` epochs in one process (untimed; by then
ucmkd's calibrated pseudo-labels are on, as for the remaining ~90 % of the run: in the first
epochs its unlabelled terms pause), and every timed run resumes a copy of that checkpoint (the
world size is not part of a run's key: 2 processes resume the 1-process run on the same global
batches). Each repeat runs both variants back to back, alternating which goes first
(interleaved, so a change in the machine's load hits both alike); the speed-up is the median
over repeats of the per-repeat ratio of training time per step (1 process / 2 processes). A
variant's time is rank 0's wall time of ``Trainer.fit`` over ``--epochs`` epochs after one
warm-up epoch: the training steps plus the per-epoch validation, calibration, synchronisation
and commit (process start, data loading and the teacher are excluded).

Communication per step (2 processes) is counted separately, in an untimed pass: the payload of
ucmkd's own collectives (:data:`ucmkd.engine.distributed.COMM`: gathers of the global batch's
teacher outputs and labels, of the student features with their gradient, of the unlabelled
probabilities) and of DDP's bucketed gradient all-reduce (a communication hook that counts each
bucket), in bytes each rank contributes per training step.

Setting: digits, image teacher -> signal student (the default digits models), 50 labels per
class (500 labelled items, so a batch of 256 is not clamped), ucmkd with its defaults.

``--student-width W`` trains a wider student (the default is 16 channels; the work per item
grows about as W^2) to show how the speed-up follows the share of the step that splits.

``--breakdown`` times the training step alone (16 steps from the same checkpoint, process CPU
time and wall time per step, 1 process and rank 0 of 2) for ucmkd, without its OT term (``w_fa:
0``), without its unlabelled terms and with its CE shadow retired: what a step costs, and which
part does not shrink with the shard.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()


def config(epochs: int = 60):
    from ucmkd.config import RunConfig

    cfg = RunConfig()
    cfg.model.student_width = int(os.environ.get("UCMKD_BENCH_WIDTH", cfg.model.student_width))
    cfg.method.name = "ucmkd"
    cfg.optim.batch_size = 256
    cfg.optim.epochs = epochs
    cfg.pairing.label_budget = 50
    cfg.threads = 1
    return cfg


def _counting_hook(state, bucket):
    """DDP communication hook: the default all-reduce (mean), counting the bucket's bytes."""
    import torch.distributed as dist

    buf = bucket.buffer()
    state["bytes"] += buf.numel() * buf.element_size()
    state["buckets"] += 1
    return dist.all_reduce(buf.div_(dist.get_world_size()), async_op=True).get_future().then(lambda f: f.value()[0])


def worker(out: str, epochs: int, run_dir: str) -> None:
    from ucmkd.api import prepare
    from ucmkd.engine import distributed

    torch.set_num_threads(1)
    cfg = config()
    ctx = prepare(cfg)
    dp = ctx.dist
    trainer = ctx.trainer(Path(run_dir))
    start = trainer.fit(stop_after=0).epochs       # resumes the checkpoint (trains nothing)
    trainer.fit(stop_after=start + 1)              # warm-up epoch (teacher table, first calls)
    distributed.barrier(dp)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.fit(stop_after=start + 1 + epochs)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    steps = epochs * len(ctx.sampler)
    res = {"world_size": ctx.world_size, "seconds": seconds, "steps": steps, "ms_per_step": 1000 * seconds / steps,
           "cpu_ms_per_step": 1000 * cpu / steps, "val_acc": trainer.history[-1]["val_acc"], "from_epoch": start,
           "pl_mask": trainer.history[-1].get("train_pl_mask")}
    if dp is not None:                              # untimed pass: count the communication of one epoch
        counted = prepare(cfg).trainer(Path(run_dir))
        state = {"bytes": 0, "buckets": 0}
        counted.strategy.model.register_comm_hook(state, _counting_hook)
        counted.fit(stop_after=0)
        distributed.reset_comm()
        counted.fit(stop_after=counted.epoch + 1)
        n = len(ctx.sampler)
        res["comm_per_step"] = {"ddp_allreduce": state["bytes"] / n, "ddp_buckets": state["buckets"] / n,
                                **{k: v / n for k, v in distributed.COMM.items()}}
        res["comm_note"] = ("bytes each rank passes per training step; gather/gather_grad/all_reduce/broadcast "
                            "also include the once-per-epoch evaluation and buffer syncs, divided by the steps")
    if dp is None or dp.is_main:
        Path(out).write_text(json.dumps(res))
    distributed.shutdown()


BREAKDOWN = {"ucmkd": {}, "ucmkd, w_fa 0 (no OT)": {"w_fa": 0.0}, "ucmkd, unlabelled off": {"unlabelled": False},
             "ucmkd, shadow retired": {}}


def step_worker(out: str, run_dir: str) -> None:
    """Time 16 training steps (after 2 warm-up steps) of every BREAKDOWN variant, from the
    weights and state of the checkpoint in ``run_dir`` (the shadow of the last variant retired,
    as ucmkd retires it once the student leads it clearly)."""
    from ucmkd.api import prepare
    from ucmkd.engine import distributed, load_checkpoint

    torch.set_num_threads(1)
    res = {}
    state = load_checkpoint(Path(run_dir) / "latest.pt")
    for name, params in BREAKDOWN.items():
        cfg = config()
        cfg.method.params = params
        ctx = prepare(cfg)
        trainer = ctx.trainer()
        trainer.config_hash = ""                 # another variant's checkpoint: same modules, other params
        trainer.load_state(state)
        if "retired" in name:
            ctx.distiller.extra["gate"].active.fill_(False)
        batches = list(ctx.sampler.epoch(trainer.epoch))
        trainer.distiller.train()
        trainer.distiller.progress = trainer.epoch / cfg.optim.epochs
        with distributed.active(ctx.dist):
            for b in batches[:2]:
                trainer.strategy.step(b)
            distributed.barrier(ctx.dist)
            c0, t0 = time.process_time(), time.perf_counter()
            for b in batches + batches:
                trainer.strategy.step(b)
        res[name] = {"cpu_ms": 1000 * (time.process_time() - c0) / 16, "wall_ms": 1000 * (time.perf_counter() - t0) / 16}
    dp = distributed.init_from_env()
    if dp is None or dp.is_main:
        Path(out).write_text(json.dumps(res))
    distributed.shutdown()


def breakdown(base: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        got = {w: _launch(w, 0, Path(tmp) / f"b{w}.json", "--step-worker", str(base)) for w in (1, 2)}
    print(f"load {load()}\n\n| variant | 1 process: CPU ms/step (wall) | rank 0 of 2: CPU ms/step (wall) | CPU ratio |")
    print("|---|---|---|---|")
    for name in BREAKDOWN:
        a, b = got[1][name], got[2][name]
        print(f"| {name} | {a['cpu_ms']:.1f} ({a['wall_ms']:.1f}) | {b['cpu_ms']:.1f} ({b['wall_ms']:.1f}) | "
              f"{a['cpu_ms'] / b['cpu_ms']:.2f}x |")


def _launch(world: int, epochs: int, out: Path, mode: str = "--worker", run_dir: str = "") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    src = str(HERE.parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    args = [str(HERE), mode, str(out), "--epochs", str(epochs), "--run-dir", run_dir]
    if world == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *args]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=1800)
    return json.loads(out.read_text())


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--step-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--breakdown", action="store_true", help="time the training step of ucmkd variants instead")
    ap.add_argument("--epochs", type=int, default=4, help="timed epochs per run (8 steps each)")
    ap.add_argument("--from-epoch", type=int, default=8, help="epochs trained (untimed) before the timed ones")
    ap.add_argument("--run-dir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--student-width", type=int, default=None, help="model.student_width (default 16)")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    if a.student_width:
        os.environ["UCMKD_BENCH_WIDTH"] = str(a.student_width)     # read by config(), in every process
    if a.worker:
        return worker(a.worker, a.epochs, a.run_dir)
    if a.step_worker:
        return step_worker(a.step_worker, a.run_dir)
    from ucmkd.api import prepare

    torch.set_num_threads(1)
    ctx = prepare(config())                        # teacher and data into the cache, untimed
    rows, ratios = [], []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        ctx.trainer(base).fit(stop_after=a.from_epoch)     # the checkpoint every timed run resumes
        if a.breakdown:
            return breakdown(base)
        for rep in range(a.repeats):
            order = (1, 2) if rep % 2 == 0 else (2, 1)
            got = {}
            for w in order:
                before = load()
                run_dir = Path(tmp) / f"r{rep}-w{w}"
                shutil.copytree(base, run_dir)
                got[w] = _launch(w, a.epochs, Path(tmp) / f"r{rep}-w{w}.json", run_dir=str(run_dir))
                got[w]["load"] = before
            ratios.append(got[1]["ms_per_step"] / got[2]["ms_per_step"])
            rows.append(got)
            print(f"repeat {rep}: 1 process {got[1]['ms_per_step']:.1f} ms/step (cpu {got[1]['cpu_ms_per_step']:.1f}, "
                  f"load {got[1]['load']}), 2 processes {got[2]['ms_per_step']:.1f} ms/step (rank 0 cpu "
                  f"{got[2]['cpu_ms_per_step']:.1f}, load {got[2]['load']}), speed-up {ratios[-1]:.2f}x", flush=True)
    comm = rows[-1][2]["comm_per_step"]
    print(f"\nucmkd, digits image->signal, student width {config().model.student_width}, global batch 256, "
          f"1 thread per process, {a.epochs} timed epochs "
          f"x {rows[0][1]['steps'] // a.epochs} steps after epoch {rows[0][1]['from_epoch'] + 1} of 60 (confident "
          f"pseudo-label fraction {rows[0][1]['pl_mask']:.2f}), {a.repeats} interleaved repeats")
    print(f"median ms/step: 1 process {statistics.median(r[1]['ms_per_step'] for r in rows):.1f}, "
          f"2 processes {statistics.median(r[2]['ms_per_step'] for r in rows):.1f}")
    print(f"speed-up (median of per-repeat ratios): {statistics.median(ratios):.2f}x "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
    cpu = statistics.median(r[1]["cpu_ms_per_step"] / r[2]["cpu_ms_per_step"] for r in rows)
    print(f"CPU time per step, 1 process / rank 0 of 2 (the speed-up with a free core per process, before "
          f"waiting on each other): {cpu:.2f}x")
    total = sum(v for k, v in comm.items() if k != "ddp_buckets")
    print("communication per step and rank (bytes): " + ", ".join(
        f"{k} {v:,.0f}" for k, v in comm.items() if k != "ddp_buckets") + f"; total {total:,.0f} "
        f"({comm['ddp_buckets']:.0f} DDP bucket(s) per step)")


if __name__ == "__main__":
    main()
