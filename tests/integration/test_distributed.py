"""Data parallelism, run for real: ``torchrun --standalone --nproc_per_node=2`` with the gloo
backend on CPU (tests/support/distributed_workers.py does the work in the processes).

- Two processes compute the gradient one process computes on the same global batch, for a
  student without batch norm (whose statistics are per shard by design), for every method
  with a batch-level term and for ``ce``/``kd``.
- The collectives of ``ucmkd.engine.distributed`` agree with torch.distributed's own, and
  their error paths reach every rank.
- ``ucmkd train`` under torchrun: rank 0 alone writes (teacher cache, checkpoints, metrics,
  result.json, which records the world size) and prints; a run whose processes are all killed
  resumes, through ``ucmkd bench --nproc-per-cell 2`` (each cell in 2 processes launched by
  torch.distributed.run), to exactly the uninterrupted 2-process result.

Every launch runs in a session of its own under a timeout (then SIGTERM, which torchrun passes
to its workers, then SIGKILL), and the processes' collectives time out after 60 s, so a hang
can never stall the suite. Three launches in all (about 30-50 s on 2 busy cores).
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ucmkd.api import load_pair
from ucmkd.config import PairingConfig, RunConfig, SyntheticConfig, save_config
from ucmkd.data import PairingSampler
from ucmkd.engine import Trainer, distributed, load_checkpoint
from ucmkd.errors import ConfigError
from ucmkd.methods import build_distiller
from ucmkd.models import build_classifier

from distributed_workers import GRAD_CASES, step_grads
from factories import small_config
from test_commit import assert_same_run

TESTS = Path(__file__).resolve().parents[1]
SUPPORT = TESTS / "support"
WORKER = str(SUPPORT / "distributed_workers.py")


def launch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python ARGS`` in a session of its own, stopped after ``timeout`` seconds: SIGTERM (on
    which torchrun stops its workers, which run in sessions of their own), then SIGKILL. A
    worker left behind would give up within UCMKD_DIST_TIMEOUT_S in its next collective."""
    path = os.pathsep.join([str(TESTS.parent / "src"), str(SUPPORT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "UCMKD_DIST_TIMEOUT_S": "60"}
    cmd = [sys.executable, *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"{' '.join(args[:6])} did not finish in {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node=2 ARGS`` (the rendezvous
    picks a free port)."""
    return launch("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args)


def _ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, res.stderr[-4000:]
    return res


# --------------------------------------------------------------------------- in one process
def _pair():
    cfg = RunConfig()
    cfg.data.teacher, cfg.data.student = "synthetic/a", "synthetic/b"
    cfg.data.synthetic = SyntheticConfig(n_items=400, num_classes=4)
    return load_pair(cfg)


@pytest.mark.parametrize("pairing", [PairingConfig(), PairingConfig(mode="unpaired", shift_level=0.5, shift_side="both")])
def test_the_shards_of_the_sampler_are_the_one_process_batch(pairing):
    """Rank r of N yields rows [r B/N, (r + 1) B/N) of the very batch one process yields
    (student, teacher, teacher indices, unlabelled), shifted inputs included."""
    student, teacher = _pair()
    kw = dict(batch_size=12, steps_per_epoch=3, seed=5, unlabelled=True)
    one = list(PairingSampler(student, teacher, pairing, **kw).epoch(1))
    shards = [list(PairingSampler(student, teacher, pairing, rank=r, world_size=3, **kw).epoch(1)) for r in range(3)]
    for step, whole in enumerate(one):
        for f in ("xs", "ys", "xt", "yt", "xu", "it"):
            if getattr(whole, f) is None:
                assert all(getattr(sh[step], f) is None for sh in shards), f
                continue
            parts = [getattr(sh[step], f) for sh in shards]
            assert all(len(p) == 4 for p in parts), f
            assert torch.equal(torch.cat(parts), getattr(whole, f)), f"step {step}: {f}"


def test_a_global_batch_the_processes_cannot_share_equally_is_named():
    student, teacher = _pair()
    with pytest.raises(ConfigError, match=r"optim.batch_size: the global batch of 10 .*3 equal shards"):
        PairingSampler(student, teacher, PairingConfig(), batch_size=10, rank=0, world_size=3)
    with pytest.raises(ConfigError, match=r"clamped to the 40 labelled items"):
        PairingSampler(student, teacher, PairingConfig(), batch_size=64, rank=0, world_size=3)


def test_the_collectives_are_the_identity_in_one_process():
    x, y = torch.randn(6, 3, requires_grad=True), torch.arange(6)
    assert distributed.current() is None and distributed.world_size() == 1
    assert distributed.gather(x) is x and distributed.gather(x, y) == (x, y)
    assert distributed.gather_with_grad(x) is x and distributed.local_rows(x) is x
    assert distributed.local_masked_rows(x[y > 2], y > 2) is not None
    assert distributed.init_from_env() is None            # no torchrun environment here
    assert distributed.device_for(None, "cuda") == "cuda"


def test_an_explicit_cuda_index_under_several_processes_is_refused():
    dp = distributed.DataParallel(rank=1, world_size=2, local_rank=1, backend="nccl")
    assert distributed.device_for(dp, "cuda") == "cuda:1" and distributed.device_for(dp, "cpu") == "cpu"
    with pytest.raises(ConfigError, match="every rank on one GPU"):
        distributed.device_for(dp, "cuda:0")


def test_grid_commands_refuse_torchrun_and_a_cell_needs_one_process_at_least(monkeypatch, capsys, tmp_path):
    from ucmkd.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["bench", "quick", "--out", str(tmp_path)]) == 2
    assert "starts its runs itself: launch it without torchrun" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    assert main(["run", "digits", "--quick", "--nproc-per-cell", "0", "--out", str(tmp_path)]) == 2
    assert "nproc_per_cell: expected a value >= 1, got 0" in capsys.readouterr().err


def test_the_fp16_loss_scale_is_committed_so_a_resume_is_exact(tmp_path):
    """The fp16 GradScaler path (CUDA in practice) with a CPU scaler and no autocast: it starts
    at a loss scale of 3e38, so the first steps overflow and are skipped while the scale halves.
    A run resumed after epoch 1 continues with the committed scale (the same weights as the
    uninterrupted run); had the scale not been saved, the resumed run would start again at 3e38
    and skip more steps (the control, with the scale dropped from latest.pt, differs)."""
    import dataclasses

    student_data = dataclasses.replace(_pair()[0], x=_pair()[0].x * 100)   # large gradients

    def trainer(run_dir):
        torch.manual_seed(0)
        model = build_classifier(student_data.input_shape, "vector", 4, width=8, feat_dim=8)
        cfg = RunConfig().optim
        cfg.epochs, cfg.steps_per_epoch, cfg.batch_size = 2, 3, 16
        sampler = PairingSampler(student_data, None, PairingConfig(label_budget=None), 16, 3)
        t = Trainer(build_distiller("ce", model, None), sampler, student_data, cfg, run_dir=run_dir)
        t.strategy.precision.scaler = torch.amp.GradScaler("cpu", init_scale=3e38)
        return t

    def weights(t):
        return [q.detach().clone() for q in t.distiller.student.parameters()]

    ref = trainer(tmp_path / "ref")
    ref.fit()
    assert any(row.get("train_skipped_step", 0) > 0 for row in ref.history)
    first = trainer(tmp_path / "cut")
    first.fit(stop_after=1)
    assert "scaler" in load_checkpoint(tmp_path / "cut" / "latest.pt")["strategy"]
    resumed = trainer(tmp_path / "cut")
    resumed.fit()
    assert resumed.strategy.precision.loss_scale == ref.strategy.precision.loss_scale < 3e38
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), weights(ref)))
    # control: the same resume from a checkpoint without the scale (as before it was committed)
    trainer(tmp_path / "cut2").fit(stop_after=1)
    st = load_checkpoint(tmp_path / "cut2" / "latest.pt")
    st.pop("strategy")
    blind = trainer(None)
    blind.load_state(st)
    blind.fit()
    assert not all(torch.equal(a, b) for a, b in zip(weights(blind), weights(ref)))


# --------------------------------------------------------------------------- one launch, three jobs
def _fit_config(cache_dir: str) -> RunConfig:
    return small_config("ucmkd", 3, cache_dir, **{"teacher.epochs": 4, "optim.steps_per_epoch": 2, "threads": 1})


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One 2-process launch (one start-up) for three jobs: the collectives' checks
    (``collectives``), and

    - the step gradients of every GRAD_CASES entry, with the 1-process reference:
      ``grads`` = (reference, [rank 0's, rank 1's]);
    - an uninterrupted 2-process ucmkd run from an empty cache (rank 0 trains the teacher):
      ``fit`` = (config file, run dir, [(rank, path)] of every atomic write)."""
    root = tmp_path_factory.mktemp("dist")
    grad_cache, out = str(root / "grad-cache"), root / "g"
    ref = {c: step_grads(c, grad_cache) for c in GRAD_CASES}      # trains the teacher into the cache
    cfg_path, writes = root / "run.yaml", root / "writes.txt"
    save_config(_fit_config(str(root / "fit-cache")), cfg_path)
    coll = root / "c"
    res = _ok(torchrun(WORKER, "collectives", str(coll), "+", "grads", grad_cache, str(out),
                       "+", "fit", str(cfg_path), str(root / "U"), str(writes)))
    ranks = [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(2)]
    log = [tuple(line.split(" ", 1)) for line in writes.read_text().splitlines()]
    checks = [torch.load(f"{coll}.rank{r}", weights_only=False) for r in range(2)]
    return {"grads": (ref, ranks), "fit": (cfg_path, root / "U", log, res.stdout), "collectives": checks}


def test_the_collectives_match_torch_distributed_and_report_errors_on_every_rank(launched):
    """gather (one packed collective, any dtypes) = dist.all_gather; gather_with_grad's gradient
    (a non-contiguous input) = torch.distributed.nn.functional.all_gather's; local rows; a value
    that differs between ranks and an error raised on rank 0 reach every rank as a DataError;
    rank 0's buffers; the gradient mean with DDP's semantics."""
    for r, checks in enumerate(launched["collectives"]):
        failed = [name for name, ok in checks.items() if not ok]
        assert not failed and len(checks) == 12, f"rank {r}: {failed}"


@pytest.fixture(scope="module")
def grads(launched):
    return launched["grads"]


@pytest.fixture(scope="module")
def uninterrupted(launched):
    return launched["fit"]


# --------------------------------------------------------------------------- gradients
def _rel_err(g2: list, g1: list) -> float:
    num = sum(float((a - b).norm()) ** 2 for a, b in zip(g2, g1) if b is not None) ** 0.5
    den = sum(float(b.norm()) ** 2 for b in g1 if b is not None) ** 0.5
    assert den > 0
    return num / den


@pytest.mark.parametrize("method", [c for c in GRAD_CASES if GRAD_CASES[c][1] == "fp32"])
def test_two_processes_step_with_the_one_process_gradient(grads, method):
    """Same global batch of 16, shards of 8: the gradient every rank steps with equals the
    1-process gradient to 1e-5 relative (global norm over all parameters). The computations
    differ only in the order of float32 sums (over shards, then across ranks; per-shard matmuls),
    each reordered sum of n terms within n * 2^-24 of the exact one relative to the sum of the
    magnitudes; n <= 16 items x 10 classes or 8 features per reduction gives < 1e-5. A missed
    world-size factor, a wrong shard or a local instead of global batch statistic is off by
    O(1): a gather whose backward keeps each rank's own gradient instead of the sum over ranks
    fails fa-only, ucmkd-joint, mmd and ucmkd here by 17-35 % (ucmkd-bilevel's outer gradient
    is blind to the scale of its inner gradients: AdamW's first step is scale-invariant)."""
    ref, ranks = grads
    g1 = ref[method]["grads"]
    for r, res in enumerate(ranks):
        g2 = res[method]["grads"]
        assert res[method]["batch"] == 8 and ref[method]["batch"] == 16
        assert [g is None for g in g2] == [g is None for g in g1]
        err = _rel_err(g2, g1)
        assert err <= 1e-5, f"rank {r}: relative gradient error {err:.2e}"
    assert all(torch.equal(a, b) for a, b in zip(ranks[0][method]["grads"], ranks[1][method]["grads"])
               if a is not None), "ranks must step with identical (all-reduced) gradients"


@pytest.mark.parametrize("case", [c for c in GRAD_CASES if GRAD_CASES[c][1] == "bf16"])
def test_bf16_under_two_processes_stays_within_bf16_rounding_of_one_process(grads, case):
    """Under bf16 autocast the forwards' products round to bf16 (unit roundoff u = 2^-8), and a
    shard's products are not the whole batch's (other blocking, other rounding): two bf16
    computations agree to bf16 accuracy, not float32's. Bound: 8 u = 2^-5 (a handful of rounded
    products on the path of each gradient, forward and backward, in each of the two
    computations), both against the 1-process bf16 gradient and against the fp32 one (measured:
    0.2-0.3 % and <= 1.8 %). The OT solve stays float32 on both sides."""
    ref, ranks = grads
    base = case.split("@")[0]
    for r, res in enumerate(ranks):
        assert _rel_err(res[case]["grads"], ref[case]["grads"]) <= 2 ** -5, f"rank {r}"
        assert _rel_err(res[case]["grads"], ref[base]["grads"]) <= 2 ** -5, f"rank {r} vs fp32"


def test_the_ucmkd_check_covers_a_partial_confident_mask(grads):
    """The unlabelled terms run with some, not all, items confident, so the per-shard masks and
    the global same-class draws of ucmkd are exercised."""
    ref, ranks = grads
    logs = ref["ucmkd"]["logs"]
    assert 0.0 < logs["pl_mask"] < 1.0 and "kd_u" in logs and "la_u" in logs
    # the logged values are this rank's: their mean over ranks is the 1-process value
    mean = (ranks[0]["ucmkd"]["logs"]["pl_mask"] + ranks[1]["ucmkd"]["logs"]["pl_mask"]) / 2
    assert mean == pytest.approx(logs["pl_mask"], abs=1e-12)


# --------------------------------------------------------------------------- writes, kill, resume
def test_rank_zero_alone_writes_and_prints_and_the_result_records_the_world_size(uninterrupted):
    _, run_dir, writes, stdout = uninterrupted
    printed = json.loads(stdout)            # one JSON document: rank 0's
    assert printed["world_size"] == 2 and printed["key"] == json.loads((run_dir / "result.json").read_text())["key"]
    assert {r for r, _ in writes} == {"0"}, "only rank 0 may write"
    names = [Path(p).name for _, p in writes]
    run = [Path(p).name for _, p in writes if Path(p).parent == run_dir]
    assert names.count("teacher.pt") == 1          # trained by rank 0 while rank 1 waited
    assert run.count("latest.pt") == 3 and run[:2] == ["key.json", "config.yaml"] and run[-1] == "result.json"
    res = json.loads((run_dir / "result.json").read_text())
    assert res["world_size"] == 2 and res["sampler"]["batch_size"] == 16
    assert not list(run_dir.glob(".*.tmp-*"))


def test_a_run_whose_processes_are_all_killed_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path):
    """Rank 0 is SIGKILLed right after epoch 2's commit; torchrun then stops rank 1. The run
    directory, placed as the cell of a one-cell suite, is resumed by ``ucmkd bench
    --nproc-per-cell 2`` (its cell relaunched in 2 processes) and ends bit for bit where the
    uninterrupted run ended; the suite's results row records the 2 processes."""
    import shutil

    import yaml

    cfg_path, ref, _, _ = uninterrupted
    d = tmp_path / "K"
    killed = torchrun(WORKER, "fit", str(cfg_path), str(d), str(tmp_path / "writes.txt"), "2")
    assert killed.returncode != 0
    assert load_checkpoint(d / "latest.pt")["epoch"] == 2 and not (d / "result.json").exists()
    base = yaml.safe_load(cfg_path.read_text())
    suite = {"name": "resume", "out_dir": str(tmp_path / "bench"), "base": base, "methods": ["ucmkd"],
             "baseline": "ucmkd", "method_params": {"ucmkd": base["method"]["params"]}, "seeds": [base["seed"]],
             "settings": {"s": {}}}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    cell = tmp_path / "bench" / "runs" / "s" / "ucmkd" / f"seed{base['seed']}"
    shutil.copytree(d, cell)
    _ok(launch("-m", "ucmkd", "bench", str(tmp_path / "suite.yaml"), "--nproc-per-cell", "2", "--no-progress"))
    assert_same_run(cell, ref)
    assert not list(cell.parent.glob("*.stale-*")), "the killed run must be resumed, not set aside"
    rows = [json.loads(line) for line in (tmp_path / "bench" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["world_size"] == 2
