"""Data parallelism over processes: ``torchrun`` + ``torch.distributed``, one small module.

A run launched by ``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT) joins the process group described by that environment (:func:`init_from_env`):
backend ``gloo`` on CPU, ``nccl`` on CUDA (one device per local rank). Without torchrun (or with
one process) nothing here does anything, so a single-process run is the code path it always was.

``optim.batch_size`` is the GLOBAL batch: the pairing sampler gives every rank its contiguous
shard of each global batch (rank r holds rows [r b, (r + 1) b), b = B / N), so N processes see
the batches one process sees. Per-item losses (means over a shard) are averaged across ranks
by DDP's gradient all-reduce, which equals their global mean. Batch-level terms (OT, MMD, batch
statistics) need the whole batch: a method gathers it with the collectives below. They act on
the data-parallel group the trainer makes :func:`active` around its training steps; outside
it (evaluation, calibration, teacher training, a single process) they return their input.

(:mod:`ucmkd.collectives`, the bottom layer methods import; re-exported here.)

Engine-side helpers take the :class:`DataParallel` explicitly: :func:`rank_zero_first` (cache
builders), :func:`on_rank_zero` (rank 0 reads or decides, every rank gets the value),
:func:`average_param_grads` (hand-set gradients, which bypass DDP's hooks),
:func:`broadcast_buffers`, :func:`broadcast_object`, :func:`mean_over_ranks`,
:func:`check_same_on_ranks`, :func:`wrap_ddp`.
Every collective adds its payload to :data:`COMM` (bytes each rank passes in), for benchmarks.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import os
from typing import Callable, Iterator, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..collectives import (COMM, DataParallel, _count, _pack, _unpack, active, current, gather,  # noqa: F401
                           gather_with_grad, local_masked_rows, local_rows, reset_comm, world_size)
from ..errors import ConfigError, DataError, UcmkdError

T = TypeVar("T")

#: Seconds a collective may wait (e.g. the other ranks while rank 0 trains a teacher) before the
#: process group gives up; ``UCMKD_DIST_TIMEOUT_S`` overrides it. torchrun tears the whole job
#: down as soon as one rank fails, so a long timeout never keeps a failed job alive.
DEFAULT_TIMEOUT_S = 7200

_PROCESS: Optional[DataParallel] = None    # the group this module joined (or found)
_OWNED = False                             # whether this module initialised it
_ZERO_FIRST = False                        # inside a rank_zero_first block


# --------------------------------------------------------------------------- the process group
def _env_int(name: str) -> int:
    value = os.environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"distributed: environment variable {name}={value!r} is not an integer (torchrun "
                          f"sets RANK, WORLD_SIZE and LOCAL_RANK; launch with torchrun)") from None


def init_from_env(device: str = "cpu") -> Optional[DataParallel]:
    """Join the data-parallel job this process belongs to, once; None for a single process.

    A process group the caller initialised already is used as it is. Otherwise, with
    WORLD_SIZE > 1 in the environment (torchrun), the group is initialised from it
    (``init_method="env://"``): backend nccl when ``device`` is CUDA (after selecting the
    device LOCAL_RANK), gloo otherwise."""
    global _PROCESS, _OWNED
    if _PROCESS is not None:
        return _PROCESS
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() == 1:
            return None
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        _PROCESS = DataParallel(dist.get_rank(), dist.get_world_size(), local, str(dist.get_backend()))
        return _PROCESS
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    if not dist.is_available():
        raise ConfigError("distributed: WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {device!r}, but no CUDA device is available here (use device=cpu)")
        if local >= torch.cuda.device_count():
            raise ConfigError(f"distributed: LOCAL_RANK {local} but this node has {torch.cuda.device_count()} "
                              f"CUDA devices: start at most that many processes per node (--nproc_per_node)")
        torch.cuda.set_device(local)
    backend = "nccl" if cuda else "gloo"
    raw = os.environ.get("UCMKD_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        timeout = datetime.timedelta(seconds=float(raw))
    except ValueError:
        raise ConfigError(f"distributed: UCMKD_DIST_TIMEOUT_S={raw!r} is not a number of seconds") from None
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
    _PROCESS, _OWNED = DataParallel(rank, world, local, backend), True
    atexit.register(shutdown)
    return _PROCESS


def device_for(dp: Optional[DataParallel], device: str) -> str:
    """The device of this rank: ``cuda`` becomes ``cuda:<LOCAL_RANK>``; an explicit ``cuda:k``
    would put every rank of a node on one device and is refused."""
    if dp is None or torch.device(device).type != "cuda":
        return device
    if torch.device(device).index is not None:
        raise ConfigError(f"device: {device!r} under {dp.world_size} processes would put every rank on one GPU; "
                          f"give device=cuda (each rank takes cuda:<LOCAL_RANK>)")
    return f"cuda:{dp.local_rank}"


def shutdown() -> None:
    """Destroy the process group if :func:`init_from_env` created it (the CLI calls this on exit;
    for a script of yours it runs at interpreter exit, registered with ``atexit``).

    The group's worker threads must be gone before the interpreter finalises: a gloo thread
    that drops the last reference to a finished collective's tensor needs the GIL, and a
    thread asking for it during finalisation is killed mid-unwind (``terminate called without
    an active exception``, SIGABRT, seen in 1 of 4-10 exits). So the group is destroyed and the
    garbage that still references it (DDP wrappers in reference cycles) collected, which joins
    its threads while the interpreter is whole. No collective here: a rank that exits on an
    error must not wait for the others."""
    global _PROCESS, _OWNED
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()
    _PROCESS, _OWNED = None, False


# --------------------------------------------------------------------------- engine-side helpers
def barrier(dp: Optional[DataParallel]) -> None:
    if dp is not None:
        dist.barrier()


@contextlib.contextmanager
def rank_zero_first(dp: Optional[DataParallel]) -> Iterator[None]:
    """Run the block on rank 0 first (it builds and writes any cache entry: data, teachers),
    then on the local rank 0 of every other node (a node-local cache; they find a shared one
    complete), then on every other rank (which only read). No two processes write one file.
    Nested inside another such block it is a plain block (the outer one orders the ranks)."""
    global _ZERO_FIRST
    if dp is None or _ZERO_FIRST:
        yield
        return
    phase = 0 if dp.rank == 0 else (1 if dp.local_rank == 0 else 2)
    for _ in range(phase):
        dist.barrier()
    _ZERO_FIRST = True
    try:
        yield
    finally:
        _ZERO_FIRST = False
    for _ in range(phase, 3):
        dist.barrier()


def broadcast_object(dp: Optional[DataParallel], obj):
    """Rank 0's ``obj`` (any picklable value) on every rank."""
    if dp is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank_zero(dp: Optional[DataParallel], fn: Callable[[], T]) -> T:
    """``fn()`` called on rank 0 only, its value given to every rank (what rank 0 reads from
    its disk or decides; the others need no access to that disk). A ucmkd error ``fn`` raises
    is raised on every rank."""
    if dp is None:
        return fn()
    value, err = None, None
    if dp.is_main:
        try:
            value = fn()
        except UcmkdError as e:
            err = e
    value, err = broadcast_object(dp, (value, err))
    if err is not None:
        raise err
    return value


def check_same_on_ranks(dp: Optional[DataParallel], value, what: str) -> None:
    """A DataError naming the ranks whose ``value`` (a small JSON-able value, e.g. a content key)
    differs from rank 0's: every rank must train on the same ``what``."""
    if dp is None:
        return
    every = [None] * dp.world_size
    dist.all_gather_object(every, value)
    odd = [r for r, v in enumerate(every) if v != every[0]]
    if odd:
        raise DataError(f"{what} differs between the processes: rank 0 has {every[0]!r}, rank {odd[0]} has "
                        f"{every[odd[0]]!r}; every node must see the same data (e.g. one shared cache directory)")


def mean_over_ranks(dp: Optional[DataParallel], values: dict) -> dict:
    """{name: mean over ranks} of per-rank floats; a name a rank lacks counts as 0 there
    (e.g. a term that only some shards produced in a step)."""
    if dp is None:
        return values
    every = [None] * dp.world_size
    dist.all_gather_object(every, values)
    names = list(dict.fromkeys(k for d in every for k in d))
    return {k: sum(d.get(k, 0.0) for d in every) / dp.world_size for k in names}


def sum_over_ranks(dp: Optional[DataParallel], values: Sequence[float], device="cpu") -> list[float]:
    """The sums over ranks of a few numbers (float64, one all-reduce; the same on every rank)."""
    if dp is None:
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    _count("all_reduce", [t])
    dist.all_reduce(t)
    return t.tolist()


def average_param_grads(dp: Optional[DataParallel], params: Sequence[torch.Tensor],
                        grads: Sequence[Optional[torch.Tensor]]) -> list:
    """The mean over ranks of the gradients ``grads`` of ``params`` (as DDP averages), in one
    all-reduce. A gradient that is None on a rank counts as zero there (zeros of the
    parameter's shape travel in its place); one that is None on every rank stays None, as a
    single process would leave it (AdamW then skips the parameter)."""
    if dp is None:
        return list(grads)
    filled = [torch.zeros_like(q) if g is None else g for q, g in zip(params, grads)]
    none_here = [g is None for g in grads]
    flags = torch.tensor([0.0 if n else 1.0 for n in none_here], dtype=filled[0].dtype, device=filled[0].device)
    flat = torch.cat([flags] + [g.reshape(-1) for g in filled])
    _count("all_reduce", [flat])
    dist.all_reduce(flat)
    flat /= dp.world_size
    out, off = [], len(filled)
    for g, f in zip(filled, flat[:len(filled)].tolist()):
        n = g.numel()
        out.append(flat[off:off + n].view_as(g) if f > 0 else None)
        off += n
    return out


def broadcast_buffers(dp: Optional[DataParallel], modules: Sequence[nn.Module]) -> None:
    """Copy rank 0's buffers of ``modules`` (batch-norm running statistics, running class
    statistics, calibrated thresholds) to every rank, in one broadcast: what DDP's
    ``broadcast_buffers`` does before every forward, done where the buffers are read."""
    if dp is None:
        return
    bufs = [b for m in modules for b in m.buffers()]
    if not bufs:
        return
    flat = _pack(bufs)
    _count("broadcast", [flat])
    dist.broadcast(flat, src=0)
    with torch.no_grad():
        for b, v in zip(bufs, _unpack(flat.view(1, -1), bufs)):
            b.copy_(v[0])


class TrainableView(nn.Module):
    """The distiller's trainable modules (``student``, ``extra``) as one module, whose forward is
    the distiller's: what DDP wraps, so the frozen teacher is never part of it (its weights are
    neither broadcast nor given gradient hooks; torchdistill's ``wrap_model`` rule)."""

    def __init__(self, distiller: nn.Module, shadow=None):
        super().__init__()
        self.student = distiller.student
        self.extra = distiller.extra
        object.__setattr__(self, "_distiller", distiller)    # not a submodule
        self.shadow = shadow

    def forward(self, batch):
        """The distiller's output, with the losses of the trainer's CE shadow (if any) added."""
        out = self._distiller(batch)
        if self.shadow is not None:
            out.losses.update(self.shadow.losses(batch))
        return out


def wrap_ddp(distiller: nn.Module, dp: DataParallel, shadow=None) -> nn.Module:
    """``DistributedDataParallel`` over the distiller's trainable modules (:class:`TrainableView`).

    ``find_unused_parameters``: a method may leave a trainable module out of a step (a term
    whose weight is 0, a branch a batch does not take), which DDP must then be told; the
    per-step cost is one walk of the autograd graph. Buffers are not broadcast before every
    forward: the trainer broadcasts rank 0's once per epoch, before they are read
    (:func:`broadcast_buffers`)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    view = TrainableView(distiller, shadow)
    device = next(iter(view.parameters())).device
    ids = [device.index] if device.type == "cuda" else None
    # PyTorch 2.13 renamed broadcast_buffers (now a deprecation warning) to forward_sync_buffers
    sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    return DistributedDataParallel(view, device_ids=ids, find_unused_parameters=True, **{sync: False})


__all__ = ["DataParallel", "init_from_env", "device_for", "shutdown", "active", "current", "world_size", "gather",
           "gather_with_grad", "local_rows", "local_masked_rows", "barrier", "rank_zero_first", "broadcast_object",
           "on_rank_zero", "check_same_on_ranks",
           "mean_over_ranks", "average_param_grads", "broadcast_buffers", "wrap_ddp", "TrainableView", "COMM",
           "reset_comm"]
