"""The CUDA paths: mixed precision (bf16; fp16 with its gradient scaler, checkpointed), the nccl
collectives in one process, pinned-memory batch reading and the device of the teacher-output
table. They run only where CUDA is available (``pytest -m cuda``; ``benchmarks/gpu_check.py``
runs them with the GPU cost tables) and are skipped everywhere else, CI included.

The problem is the 4-class synthetic one of ``factories.SYNTHETIC`` (MLP encoders: cuBLAS matmuls give
the same result run after run, so resumed and uninterrupted runs can be compared exactly)."""
import socket

import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _cfg(tmp_path, method="ce", precision="fp32", **fields):
    """The synthetic run on CUDA; ``fields``: dotted overrides."""
    from factories import run_config

    ucmkd = {"method.params": {"n_iter": 20}} if method.startswith("ucmkd") else {}
    return run_config(method, 6, tmp_path / "cache", data="synthetic", device="cuda", **{
        "teacher.epochs": 5, "teacher.batch_size": 32, "optim.steps_per_epoch": 6, "optim.batch_size": 32,
        "optim.precision": precision, **ucmkd, **fields})


def _last(res: dict) -> dict:
    import json
    from pathlib import Path

    rows = [json.loads(x) for x in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]


# bf16 rounds each operation by <= 2^-8, fp16 by <= 2^-11; ~4 matmul layers deep the logits move by
# ~1.6 % (bf16) and ~0.2 % (fp16): the last epoch's mean training losses agree to 5 % and 1 %, the
# float32-evaluated validation losses to 2 % and 0.5 % (test_precision's arithmetic, on the GPU).
TOL = {"bf16": (0.05, 0.02), "fp16": (0.01, 0.005)}


@pytest.mark.parametrize("method", ["ce", "ucmkd-joint", "ucmkd"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_lands_within_its_rounding_of_fp32(tmp_path, method, precision):
    import ucmkd

    ref = ucmkd.run(_cfg(tmp_path, method), run_dir=tmp_path / "fp32")
    low = ucmkd.run(_cfg(tmp_path, method, precision), run_dir=tmp_path / precision)
    assert low["runtime"]["device"].startswith("cuda") and low["runtime"]["precision"] == precision
    a, b = _last(ref), _last(low)
    rel_train, rel_val = TOL[precision]
    losses = [k for k in a if k.startswith("train_") and k in b]
    assert losses
    for k in losses:
        assert b[k] == pytest.approx(a[k], rel=rel_train, abs=1e-4), k
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=rel_val)


def test_fp16_scaler_state_is_checkpointed_and_a_resumed_run_is_exact(tmp_path):
    import ucmkd
    from ucmkd.api import prepare
    from ucmkd.engine import load_checkpoint

    cfg = _cfg(tmp_path, "ce", "fp16")
    full = ucmkd.run(cfg, run_dir=tmp_path / "full")
    ctx = prepare(cfg)
    ctx.trainer(tmp_path / "cut").fit(stop_after=2)
    state = load_checkpoint(tmp_path / "cut" / "latest.pt")["strategy"]
    assert "scaler" in state and float(state["scaler"]["scale"]) > 0
    resumed = ucmkd.run(cfg, run_dir=tmp_path / "cut")
    for k in ("test_acc", "val_acc", "best_epoch", "candidates"):
        assert resumed[k] == full[k], k


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nccl_collectives_in_one_process():
    """Every collective of :mod:`ucmkd.engine.distributed` on an nccl group of one process (nccl
    moves CUDA tensors only: a helper that packs a CPU tensor fails here, not on a user's cluster).
    With one rank each is the identity."""
    import torch.distributed as dist

    from ucmkd.engine import distributed as D

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        dp = D.DataParallel(0, 1, 0, "nccl")
        x = torch.randn(5, 3, device="cuda")
        y = torch.arange(5, device="cuda")
        with D.active(dp):
            gx, gy = D.gather(x, y)
            assert torch.equal(gx, x) and torch.equal(gy, y)
            z = x.clone().requires_grad_()
            D.gather_with_grad(z).sum().backward()
            assert torch.equal(z.grad, torch.ones_like(z))
        assert D.sum_over_ranks(dp, [1.0, 2.5], device="cuda") == [1.0, 2.5]
        p = nn.Parameter(torch.randn(4, device="cuda"))
        g = torch.randn(4, device="cuda")
        avg = D.average_param_grads(dp, [p, p], [g, None])
        assert torch.equal(avg[0], g) and avg[1] is None
        bn = nn.BatchNorm1d(4).cuda()
        bn.running_mean.fill_(0.5)
        D.broadcast_buffers(dp, [bn])
        assert torch.equal(bn.running_mean, torch.full((4,), 0.5, device="cuda"))
        assert D.mean_over_ranks(dp, {"a": 2.0}) == {"a": 2.0}
        assert D.broadcast_object(dp, {"k": 1}) == {"k": 1}
        D.check_same_on_ranks(dp, "key", "the data")
        D.barrier(dp)
    finally:
        dist.destroy_process_group()


def test_pinned_memory_reading_of_lazy_batches(tmp_path):
    """Lazy modalities read by a DataLoader process on a CUDA run: pinned host batches, moved to
    the GPU by the trainer; the run records one reading process on the CUDA device."""
    import ucmkd
    from ucmkd.api import prepare

    cfg = _cfg(tmp_path, "kd", **{"data.storage": "mmap", "data.workers": 1})
    ctx = prepare(cfg)
    assert ctx.sampler.pin_memory and ctx.sampler.reader_workers == 1
    batch = next(iter(ctx.sampler.epoch(0)))
    assert batch.xs.is_pinned() and batch.xt.is_pinned()
    res = ucmkd.run(cfg, run_dir=tmp_path / "run")
    assert res["runtime"]["data_workers"] == 1 and res["runtime"]["device"].startswith("cuda")


def test_the_teacher_output_table_lives_on_the_run_device(tmp_path):
    from ucmkd.api import prepare

    ctx = prepare(_cfg(tmp_path, "kd"))
    table = ctx.distiller.teacher_outputs
    assert table is not None and table.device.type == "cuda"
    feats, logits = table.get(table.data.splits["train"][:4].to("cuda"))
    assert feats.device.type == "cuda" and logits.device.type == "cuda"
