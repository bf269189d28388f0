"""Modalities larger than memory (data.storage): memory-mapped files read lazily give exactly what
the in-memory modality gives (inputs, batches, fingerprints, trained runs), reading only the rows
asked for, and a run trains under an address-space limit smaller than its modality."""
import dataclasses
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import ucmkd
import ucmkd.cache as cache
from ucmkd.api import run, run_key
from ucmkd.cache import array_digest, open_npz_member, write_npz_rows
from ucmkd.config import DataConfig, PairingConfig, RunConfig, SyntheticConfig, load_config
from ucmkd.data import PairingSampler, load_modality
from ucmkd.data import standardize as stdz
from ucmkd.data.lazy import LazyArray, batch_rows
from ucmkd.diagnostics import alignment_diagnostics
from ucmkd.engine import teacher_outputs as to
from ucmkd.engine.trainer import evaluate
from ucmkd.errors import ConfigError, DataError
from ucmkd.models import build_classifier

U = 2.0 ** -24
SYN = SyntheticConfig(n_items=400)


def cfgs(tmp_path, **kw):
    """(in memory, memory-mapped) data configs sharing one cache."""
    base = DataConfig(cache_dir=str(tmp_path / "cache"), synthetic=SYN, mnist1d_samples=300, **kw)
    return dataclasses.replace(base, storage="memory"), dataclasses.replace(base, storage="mmap")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """name -> (in-memory, lazy) modality, for a vector, a signal and an image modality."""
    mem, lazy = cfgs(tmp_path_factory.mktemp("lazy"))
    return {n: (load_modality(n, mem), load_modality(n, lazy)) for n in ("synthetic/b", "synthetic/a",
                                                                        "digits/signal", "digits/image")}


# --------------------------------------------------------------------------- uncompressed .npz, streamed
def test_npz_rows_round_trip_and_memory_map(tmp_path):
    x = np.random.default_rng(0).normal(size=(103, 3, 4)).astype(np.float32)
    p = tmp_path / "a.npz"
    write_npz_rows(p, "x", x.shape, np.float32, (x[a:a + 10] for a in range(0, 103, 10)))
    with np.load(p) as z:                               # an ordinary .npz for numpy
        assert np.array_equal(z["x"], x)
    m = open_npz_member(p, "x")
    assert isinstance(m, np.memmap) and np.array_equal(m, x) and cache.is_file_backed(m)
    assert not cache.is_file_backed(m[5:])             # a slice cannot be reopened from its file
    np.savez(tmp_path / "b.npz", y=np.arange(3), x=x)  # numpy's own writer: mappable too
    assert np.array_equal(open_npz_member(tmp_path / "b.npz", "x"), x)
    np.savez_compressed(tmp_path / "c.npz", x=x)
    assert open_npz_member(tmp_path / "c.npz", "x") is None
    with pytest.raises(DataError, match="no array 'z'"):
        open_npz_member(p, "z")


def test_npz_rows_wrong_count_leaves_no_entry(tmp_path):
    x = np.zeros((10, 2), np.float32)
    path = tmp_path / "e.npz"
    with pytest.raises(DataError, match="got 9 rows for an array of 10"):
        cache.get_or_write(path, lambda tmp: write_npz_rows(tmp, "x", (10, 2), np.float32, [x[:9]]),
                           lambda p: open_npz_member(p, "x"), "test array")
    assert not path.exists() and not list(tmp_path.iterdir())
    with pytest.raises(DataError, match="more than 11 rows"):
        write_npz_rows(tmp_path / "f.npz", "x", (10, 2), np.float32, [x, x[:1]])


# --------------------------------------------------------------------------- indexing
@pytest.mark.parametrize("name", ["synthetic/b", "digits/signal", "digits/image"])
def test_lazy_items_equal_the_in_memory_ones(pairs, name):
    mem, lazy = pairs[name]
    assert isinstance(lazy.x, LazyArray) and not mem.lazy and lazy.lazy
    assert lazy.x.shape == mem.x.shape and lazy.input_shape == mem.input_shape and len(lazy.x) == len(mem.x)
    if mem.meta["standardize"] == "per_feature":     # the same float64 statistics: the same bits
        assert torch.equal(lazy.x[:], mem.x)
    # global: float64 streaming statistics vs torch's float32 ones, equal to a few float32 roundings
    idx = torch.tensor([7, 3, 3, len(mem.x) - 1, 0])
    for key in (5, -1, slice(10, 30, 3), idx, idx.numpy(), [2, 1], torch.arange(len(mem.x)) % 7 == 0):
        got = lazy.x[key]
        assert got.dtype == torch.float32 and got.shape == mem.x[key].shape
        torch.testing.assert_close(got, mem.x[key], rtol=8 * U, atol=8 * U)
    xv, yv = lazy.split("val")
    mv, myv = mem.split("val")
    assert isinstance(xv, LazyArray) and torch.equal(yv, myv)
    torch.testing.assert_close(xv[:], mv, rtol=8 * U, atol=8 * U)
    sub = xv.subset(torch.tensor([4, 1]))
    torch.testing.assert_close(sub[:], mv[[4, 1]], rtol=8 * U, atol=8 * U)
    back = pickle.loads(pickle.dumps(xv))               # DataLoader workers reopen the file
    assert torch.equal(back[:], xv[:])
    with pytest.raises(IndexError, match="out of bounds"):
        lazy.x[torch.tensor([len(mem.x)])]


def test_reading_a_batch_touches_only_its_rows(pairs, monkeypatch):
    _, lazy = pairs["synthetic/b"]
    import ucmkd.data.lazy as lazy_mod

    reads = []
    orig = lazy_mod.os.preadv

    def spy(fd, buffers, offset):
        reads.append((offset, sum(memoryview(b).nbytes for b in buffers)))
        return orig(fd, buffers, offset)

    monkeypatch.setattr(lazy_mod.os, "preadv", spy)
    monkeypatch.setattr(np.memmap, "__getitem__", lambda *a: pytest.fail("read through the memory map"))
    row, base = 4 * lazy.x.shape[1], lazy.x._file[1]
    got = lazy.x[np.array([310, 12, 57, 12])]
    assert [((o - base) // row, n // row) for o, n in reads] == [(12, 1), (57, 1), (310, 1)]   # each row once
    assert torch.equal(got[1], got[3])
    reads.clear()
    lazy.x[40:48]
    assert [((o - base) // row, n // row) for o, n in reads] == [(40, 8)]                     # one read per run


def test_without_preadv_the_memory_map_gives_the_same_rows(pairs):
    _, lazy = pairs["synthetic/b"]
    fallback = lazy.x.subset(slice(None))
    fallback._file_handle = None                 # a platform without os.preadv
    idx = torch.tensor([9, 2, 2, 300, 31])
    assert torch.equal(fallback[idx], lazy.x[idx]) and torch.equal(fallback[5:60], lazy.x[5:60])


# --------------------------------------------------------------------------- statistics
def test_streaming_global_statistics_equal_float64_to_float32_rounding(pairs):
    """global on a lazy modality: the float64 streaming mean/std (ddof 1) rounded once to float32."""
    _, lazy = pairs["digits/signal"]
    raw = load_modality("digits/signal", DataConfig(mnist1d_samples=300, standardize="none"))
    tr = raw.x[raw.splits["train"]].numpy().astype(np.float64)
    assert lazy.meta["standardize"] == "global"
    # rounding a float64 value to float32 moves it by at most half an ulp <= u |value|
    assert abs(lazy.meta["norm_mean"] - tr.mean()) <= U * abs(tr.mean()) + 1e-12
    assert abs(lazy.meta["norm_std"] - tr.std(ddof=1)) <= U * tr.std(ddof=1)


def test_per_feature_statistics_of_a_lazy_modality_are_bit_identical(pairs):
    mem, lazy = pairs["synthetic/a"]
    assert lazy.meta["norm_mean"] == mem.meta["norm_mean"] and lazy.meta["norm_std"] == mem.meta["norm_std"]
    assert torch.equal(lazy.x[:], mem.x)


def test_lazy_statistics_are_cached_and_check_every_value(tmp_path, monkeypatch):
    x = np.random.default_rng(1).normal(size=(60, 4)).astype(np.float32)
    y = np.arange(60) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    _, lazy = cfgs(tmp_path)
    a = load_modality(f"npz:{tmp_path / 'd.npz'}", lazy)
    assert len(list((tmp_path / "cache" / "stats").glob("*.npz"))) == 1
    monkeypatch.setattr("ucmkd.data.base.fit", lambda *a, **k: pytest.fail("statistics recomputed"))
    b = load_modality(f"npz:{tmp_path / 'd.npz'}", lazy)
    assert torch.equal(a.x[:], b.x[:])
    monkeypatch.undo()
    x[41, 2] = np.nan
    np.savez(tmp_path / "d.npz", x=x, y=y)          # a new file: new statistics, checked again
    with pytest.raises(DataError, match=r"d\.npz.*NaN or inf \(item 41\)"):
        load_modality(f"npz:{tmp_path / 'd.npz'}", lazy)


# --------------------------------------------------------------------------- fingerprints
def test_fingerprint_equals_the_in_memory_one_and_reads_a_bounded_sample(pairs, monkeypatch):
    mem, lazy = pairs["synthetic/b"]
    assert array_digest(lazy.x) == array_digest(mem.x)
    # force the sampled path (arrays above FULL_HASH_BYTES): same chunks, same digest, few bytes read
    monkeypatch.setattr(cache, "FULL_HASH_BYTES", 4096)
    monkeypatch.setattr(cache, "CHUNK_BYTES", 64)
    monkeypatch.setattr(cache, "SAMPLE_CHUNKS", 16)
    read = []
    orig = LazyArray.read_raw
    monkeypatch.setattr(LazyArray, "read_raw", lambda self, pos: read.append(len(pos)) or orig(self, pos))
    d = array_digest(lazy.x)
    assert d == array_digest(mem.x) and d["sampled"]
    row_bytes = 4 * mem.x.shape[1]
    assert sum(read) <= 16 * (64 // row_bytes + 2)      # one or two rows per chunk, never the array


def test_storage_and_workers_stay_out_of_run_keys():
    a, b = RunConfig(), RunConfig()
    b.data.storage, b.data.workers, b.data.prefetch, b.data.mmap_above_mb = "mmap", 3, 4, 1.0
    assert run_key(a) == run_key(b)
    b.data.standardize = "global"
    assert run_key(a) != run_key(b)


# --------------------------------------------------------------------------- storage choice
def test_storage_auto_reads_large_files_lazily_only(tmp_path):
    x = np.random.default_rng(2).normal(size=(200, 8)).astype(np.float32)      # 6.25 KiB
    np.savez(tmp_path / "s.npz", x=x, y=np.arange(200) % 4)
    name = f"npz:{tmp_path / 's.npz'}"
    base = DataConfig(cache_dir=str(tmp_path / "cache"))
    assert not load_modality(name, base).lazy                                  # 2 GiB threshold
    assert load_modality(name, dataclasses.replace(base, mmap_above_mb=0.005)).lazy
    assert not load_modality(name, dataclasses.replace(base, mmap_above_mb=0.01)).lazy
    np.savez_compressed(tmp_path / "c.npz", x=x, y=np.arange(200) % 4)        # not mappable: in memory
    assert not load_modality(f"npz:{tmp_path / 'c.npz'}", dataclasses.replace(base, mmap_above_mb=0.0)).lazy
    # storage=mmap on a compressed file or a builder's in-memory array: written once, mapped
    assert load_modality(f"npz:{tmp_path / 'c.npz'}", dataclasses.replace(base, storage="mmap")).lazy
    with pytest.raises(ConfigError, match=r"data\.storage"):
        load_config(RunConfig, None, ["data.storage=disk"])
    with pytest.raises(ConfigError, match=r"data\.storage"):
        load_modality(name, dataclasses.replace(base, storage="disk"))


# --------------------------------------------------------------------------- readers of data.x
def _batches(s, t, cfg, **kw):
    return list(PairingSampler(s, t, cfg, 24, 3, seed=4, unlabelled=True, **kw).epoch(1))


@pytest.mark.parametrize("preset", [{}, {"shift_level": 0.5, "shift_side": "both"}, {"mode": "paired"}])
def test_sampler_batches_are_identical(pairs, preset):
    (sm, sl), (tm, tl) = pairs["synthetic/b"], pairs["synthetic/a"]
    cfg = PairingConfig(label_budget=5, **preset)
    ref = _batches(sm, tm, cfg)
    for got in (_batches(sl, tl, cfg), _batches(sl, tl, cfg, workers=2, prefetch=1)):
        assert len(got) == len(ref)
        for a, b in zip(ref, got):
            for f in ("xs", "ys", "xt", "yt", "xu", "it"):
                va, vb = getattr(a, f), getattr(b, f)
                assert (va is None and vb is None) or torch.equal(va, vb), f


def test_teacher_table_diagnostics_and_evaluation_read_lazily_the_same(pairs):
    (sm, sl), (tm, tl) = pairs["synthetic/b"], pairs["synthetic/a"]
    torch.manual_seed(0)
    teacher = build_classifier(tm.input_shape, tm.kind, tm.num_classes, width=8, feat_dim=8).eval()
    student = build_classifier(sm.input_shape, sm.kind, sm.num_classes, width=8, feat_dim=8).eval()
    to.clear_memo()
    it = tm.splits["train"][:40]
    a = to.TeacherOutputs(teacher, tm).get(it)
    to.clear_memo()
    b = to.TeacherOutputs(teacher, tl).get(it)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert alignment_diagnostics(student, teacher, sm, tm) == alignment_diagnostics(student, teacher, sl, tl)
    assert evaluate(student, *sm.split("test")) == evaluate(student, *sl.split("test"))


def test_chunks_shrink_for_large_items_only():
    assert batch_rows((10, 1, 40), 1024) == 1024
    assert batch_rows((10, 3, 224, 224), 1024) == 111            # 64 MiB / (3 * 224 * 224 * 4 B)
    assert batch_rows((10, 3, 2048, 2048), 1024) == 1


# --------------------------------------------------------------------------- audio-visual caches
def test_av_decoded_cache_is_memory_mapped(tmp_path):
    from test_av_datasets import AV, make_ravdess

    root = make_ravdess(tmp_path / "root")
    base = DataConfig(cache_dir=str(tmp_path / "cache"), roots={"ravdess": str(root)}, av=AV)
    mem = load_modality("ravdess/visual", base)
    lazy = load_modality("ravdess/visual", dataclasses.replace(base, storage="mmap"))
    (path,) = (tmp_path / "cache" / "av").glob("ravdess-visual-*.npz")
    assert lazy.x.filename == str(path)                            # the decoded cache itself, no copy
    torch.testing.assert_close(lazy.x[:], mem.x, rtol=8 * U, atol=8 * U)
    assert torch.equal(lazy.y, mem.y) and torch.equal(lazy.pair_id, mem.pair_id)
    cfg = load_config(RunConfig, None, [
        f"data.roots.ravdess={root}", "data.teacher=ravdess/audio", "data.student=ravdess/visual",
        f"data.cache_dir={tmp_path / 'cache'}", f"data.av.image_size={AV.image_size}", f"data.av.frames={AV.frames}",
        "data.storage=mmap", "data.workers=1", "method.name=kd", "model.teacher_width=4", "model.student_width=4",
        "model.teacher_feat_dim=8", "model.student_feat_dim=8", "optim.epochs=2", "optim.steps_per_epoch=2",
        "optim.batch_size=6", "optim.warmup_epochs=0", "teacher.epochs=1", "teacher.batch_size=6",
        "teacher.warmup_epochs=0", "pairing.label_budget=null"])
    res = run(cfg)
    assert res["epochs"] == 2 and 0.0 <= res["test_acc"] <= 1.0


# --------------------------------------------------------------------------- larger than the memory limit
N_BIG, D_BIG = 49152, 4096          # 768 MiB of float32
HEADROOM_MB = 192

CHILD = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from ucmkd.api import run
    from ucmkd.config import RunConfig, load_config

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    overrides, nbytes, headroom = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    cfg = load_config(RunConfig, None, overrides)
    base, rss0 = status("VmData"), status("VmRSS")
    limit = base + headroom
    assert limit < nbytes, f"the data segment limit {limit} must be below the modality's {nbytes} bytes"
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    try:                                   # the limit bites: the modality cannot be materialised
        np.ones(nbytes // 4, np.float32)
        raise SystemExit("allocation above the limit succeeded")
    except MemoryError:
        pass
    res = run(cfg)
    peak = status("VmHWM")         # this process image's peak RSS (ru_maxrss would include the parent's)
    print(json.dumps({"result": {k: res[k] for k in KEYS}, "limit": limit, "rss0": rss0, "peak": peak}))
""")
KEYS = ["test_acc", "val_acc", "best_epoch", "last_test_acc", "candidates", "teacher_test_acc", "key",
        "diag_fa", "diag_teacher_head_acc", "diag_student_acc"]


def _big_modality(path: Path) -> None:
    """[N_BIG, D_BIG] features of 4 classes with per-column scales 1e-2..1e2, written in blocks
    (the writer of ``benchmarks/data_memory.py``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("data_memory", Path(__file__).parents[2] / "benchmarks" / "data_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.write_modality(path, N_BIG, D_BIG)


def test_training_on_a_modality_larger_than_the_memory_limit(tmp_path):
    """A run on a 768 MiB memory-mapped modality in a process whose data segment (RLIMIT_DATA:
    heap and every private writable mapping, what a materialised modality would need; a read-only
    file mapping is not counted) may grow only 192 MiB above its post-import size gives exactly
    the in-memory run's result.json numbers (and run key); its peak RSS grows by far less than
    the modality (batches are read with preadv; the statistics pass unmaps what it read)."""
    big, small = tmp_path / "big.npz", tmp_path / "teacher.npz"
    _big_modality(big)
    rng = np.random.default_rng(1)
    ty = np.arange(800) % 4
    np.savez(small, x=(rng.normal(size=(4, 6))[ty] * 2 + rng.normal(size=(800, 6))).astype(np.float32), y=ty)
    overrides = [f"data.student=npz:{big}", f"data.teacher=npz:{small}", f"data.cache_dir={tmp_path / 'cache'}",
                 "data.test_frac=0.04", "data.val_frac=0.04", "method.name=kd", "optim.epochs=2",
                 "optim.steps_per_epoch=3", "optim.warmup_epochs=0", "teacher.epochs=2", "model.student_width=8",
                 "threads=1"]
    ref = run(load_config(RunConfig, None, overrides + ["data.storage=memory"]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(ucmkd.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", f"KEYS = {KEYS!r}\n" + CHILD,
                          json.dumps(overrides + ["data.storage=mmap"]), str(N_BIG * D_BIG * 4),
                          str(HEADROOM_MB * 2 ** 20)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    child = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"modality {N_BIG * D_BIG * 4 >> 20} MiB, RLIMIT_DATA {child['limit'] >> 20} MiB, RSS after imports "
          f"{child['rss0'] >> 20} MiB, peak {child['peak'] >> 20} MiB")      # pytest -s shows it
    assert child["result"] == json.loads(json.dumps({k: ref[k] for k in KEYS}))
    assert ref["val_acc"] > 0.5                                     # it learned (chance: 1/4)
    assert child["peak"] - child["rss0"] < N_BIG * D_BIG * 4 / 2
