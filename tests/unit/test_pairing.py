"""PairingSampler: modes, label budget, unlabelled pool, stress options, determinism, validation."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from ucmkd.config import DataConfig, PairingConfig, SyntheticConfig
from ucmkd.data import PairingSampler, imbalance_keep, load_modality
from ucmkd.data.corruption import corrupt
from ucmkd.errors import ConfigError, DataError

K = 10


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cfg = DataConfig(mnist1d_samples=600, cache_dir=str(tmp_path_factory.mktemp("pairing-cache")),
                     synthetic=SyntheticConfig(n_items=600))
    return {name: load_modality(name, cfg)
            for name in ("digits/image", "digits/signal", "synthetic/a", "synthetic/b")}


def sampler(data, student="digits/signal", teacher="digits/image", batch_size=32, steps=None, seed=0,
            unlabelled=False, **pairing):
    cfg = PairingConfig(**pairing)
    t = data[teacher] if teacher is not None else None
    return PairingSampler(data[student], t, cfg, batch_size, steps, seed=seed, unlabelled=unlabelled)


def row_indices(x_all: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Index into ``x_all`` of each row of ``rows`` (asserting every row occurs exactly)."""
    a = x_all.flatten(1)
    r = rows.flatten(1)
    eq = (r[:, None, :] == a[None, :, :]).all(-1)   # [B, N]
    assert eq.any(1).all(), "a batch row is not a row of the dataset"
    return eq.float().argmax(1)


def per_class(idx, y) -> np.ndarray:
    return np.bincount(y[torch.as_tensor(idx)].numpy(), minlength=K)


def batches(s, epoch=0):
    return list(s.epoch(epoch))


# --------------------------------------------------------------------------- modes
def test_class_matched_labels_agree(data):
    s = sampler(data, mode="class-matched", label_budget=10, steps=12)
    out = batches(s)
    assert len(out) == len(s) == 12
    for b in out:
        assert b.xs.shape == (32, 1, 40) and b.xt.shape == (32, 1, 8, 8)
        assert torch.equal(b.yt, b.ys)
        assert b.xu is None
        # the teacher rows are real teacher items of the reported labels, from its train split
        ti = row_indices(data["digits/image"].x, b.xt)
        assert torch.equal(data["digits/image"].y[ti], b.yt)


def test_class_matched_teacher_items_come_from_train_split(data):
    s = sampler(data, mode="class-matched", label_budget=None, steps=10, batch_size=64)
    train = set(data["digits/image"].splits["train"].tolist())
    for b in batches(s):
        ti = row_indices(data["digits/image"].x, b.xt)
        assert set(ti.tolist()) <= train


def test_student_batches_come_from_the_labelled_pool(data):
    s = sampler(data, student="synthetic/b", teacher="synthetic/a", label_budget=5, steps=6, batch_size=16)
    lab = set(s.labelled.tolist())
    for b in batches(s):
        si = row_indices(data["synthetic/b"].x, b.xs)
        assert set(si.tolist()) <= lab
        assert torch.equal(data["synthetic/b"].y[si], b.ys)


def test_unpaired_teacher_labels_not_matched(data):
    s = sampler(data, mode="unpaired", label_budget=None, steps=20, batch_size=32)
    out = batches(s)
    ys = torch.cat([b.ys for b in out])
    yt = torch.cat([b.yt for b in out])
    agree = (ys == yt).float().mean().item()
    assert not torch.equal(ys, yt)
    assert agree < 0.25, f"unpaired teacher labels agree with student labels {agree:.0%} of the time"
    # every teacher class shows up: the teacher batch is a draw from the whole teacher pool
    assert len(set(yt.tolist())) == K


def test_unpaired_teacher_batch_independent_of_student_labels(data):
    """Relabelling the student pool (same items, same classes) leaves the teacher batches unchanged."""
    st = data["digits/signal"]
    g = torch.Generator().manual_seed(0)
    relabelled = dataclasses.replace(st, y=st.y[torch.randperm(len(st.y), generator=g)])
    assert not torch.equal(relabelled.y, st.y)
    cfg = PairingConfig(mode="unpaired", label_budget=None)
    a = PairingSampler(st, data["digits/image"], cfg, 32, 8, seed=3)
    b = PairingSampler(relabelled, data["digits/image"], cfg, 32, 8, seed=3)
    for ba, bb in zip(a.epoch(1), b.epoch(1)):
        assert torch.equal(ba.xt, bb.xt) and torch.equal(ba.yt, bb.yt)
        assert torch.equal(ba.xs, bb.xs)
        assert not torch.equal(ba.ys, bb.ys)


def test_class_matched_teacher_batch_follows_student_labels(data):
    """Contrast to the unpaired test: in class-matched mode relabelling moves the teacher batch."""
    st = data["digits/signal"]
    g = torch.Generator().manual_seed(0)
    relabelled = dataclasses.replace(st, y=st.y[torch.randperm(len(st.y), generator=g)])
    cfg = PairingConfig(mode="class-matched", label_budget=None)
    b = next(PairingSampler(relabelled, data["digits/image"], cfg, 32, 1, seed=3).epoch(1))
    assert torch.equal(b.yt, b.ys)


def test_paired_synthetic_true_pairs(data):
    a, bview = data["synthetic/a"], data["synthetic/b"]
    s = sampler(data, student="synthetic/b", teacher="synthetic/a", mode="paired", label_budget=8,
                steps=6, batch_size=20)
    for b in batches(s):
        si = row_indices(bview.x, b.xs)
        ti = row_indices(a.x, b.xt)
        assert torch.equal(bview.pair_id[si], a.pair_id[ti])
        assert torch.equal(b.ys, b.yt)


def test_paired_on_digits_is_a_data_error(data):
    with pytest.raises(DataError, match="pair_id"):
        sampler(data, mode="paired")


def test_paired_with_missing_teacher_pairs(data):
    """Long-tailing the teacher pool removes true partners of some labelled student items."""
    with pytest.raises(DataError, match="no pair in the teacher pool"):
        sampler(data, student="synthetic/b", teacher="synthetic/a", mode="paired", label_budget=None,
                imbalance_rho=50.0, imbalance_side="teacher")


def test_no_teacher_yields_student_only_batches(data):
    s = sampler(data, teacher=None, label_budget=None, batch_size=50)
    n_train = len(data["digits/signal"].splits["train"])
    assert len(s) == -(-n_train // 50)
    assert s.teacher_pool is None and s.summary()["teacher_pool"] is None
    seen = []
    for b in batches(s):
        assert b.xt is None and b.yt is None
        seen.append(row_indices(data["digits/signal"].x, b.xs))
    # one pass covers every training item (steps_per_epoch=None: ceil(n / B) batches)
    assert set(torch.cat(seen).tolist()) == set(data["digits/signal"].splits["train"].tolist())


def test_batch_size_clamped_to_labelled_pool(data):
    s = sampler(data, label_budget=2, batch_size=500)
    assert s.batch_size == 2 * K
    assert s.summary()["labelled"] == 2 * K
    assert all(b.xs.shape[0] == 2 * K for b in batches(s))


# --------------------------------------------------------------------------- label budget / unlabelled
@pytest.mark.parametrize("k", [1, 7])
def test_label_budget_exact_per_class(data, k):
    st = data["digits/signal"]
    s = sampler(data, label_budget=k)
    assert (per_class(s.labelled, st.y) == k).all()
    train = set(st.splits["train"].tolist())
    lab, unl = set(s.labelled.tolist()), set(s.unlabelled_pool.tolist())
    assert len(lab) == k * K
    assert not lab & unl
    assert lab | unl == train
    assert s.summary()["unlabelled"] == len(train) - k * K


def test_label_budget_none_uses_whole_train_split(data):
    st = data["digits/signal"]
    s = sampler(data, label_budget=None)
    assert set(s.labelled.tolist()) == set(st.splits["train"].tolist())
    assert len(s.unlabelled_pool) == 0


def test_label_budget_depends_on_run_seed_only(data):
    a, b, c = (sampler(data, label_budget=5, seed=sd) for sd in (0, 0, 1))
    assert np.array_equal(a.labelled, b.labelled)
    assert not np.array_equal(a.labelled, c.labelled)


def test_unlabelled_batches_from_unlabelled_pool_only(data):
    st = data["synthetic/b"]
    s = sampler(data, student="synthetic/b", teacher="synthetic/a", label_budget=5, unlabelled=True,
                steps=10, batch_size=24)
    unl = set(s.unlabelled_pool.tolist())
    for b in batches(s):
        assert b.xu is not None and b.xu.shape == b.xs.shape
        ui = row_indices(st.x, b.xu)
        assert set(ui.tolist()) <= unl


def test_unlabelled_requested_but_pool_empty(data):
    with pytest.raises(DataError, match="unlabelled"):
        sampler(data, label_budget=None, unlabelled=True)


# --------------------------------------------------------------------------- marginal mismatch
@pytest.mark.parametrize("r", [0.3, 0.7])
def test_mismatch_synthetic_disjoint_pairs(data, r):
    a, bview = data["synthetic/a"], data["synthetic/b"]
    s = sampler(data, student="synthetic/b", teacher="synthetic/a", label_budget=None, mismatch_ratio=r)
    s_ids = set(bview.pair_id[torch.as_tensor(s.labelled)].tolist())
    t_ids = set(a.pair_id[torch.as_tensor(s.teacher_pool)].tolist())
    assert not s_ids & t_ids, "student and teacher pools share true pairs"
    ns, nt = per_class(s.labelled, bview.y), per_class(s.teacher_pool, a.y)
    n_c = per_class(bview.splits["train"], bview.y)
    assert (ns + nt == n_c).all()   # together they cover each class pool
    share = ns / (ns + nt)
    assert np.all(np.abs(share - r) <= 0.5 / n_c + 1e-9), share
    # batches still work and stay class-matched
    for b in batches(s)[:3]:
        assert torch.equal(b.ys, b.yt)


def test_mismatch_with_budget_keeps_unlabelled_out_of_teacher(data):
    a, bview = data["synthetic/a"], data["synthetic/b"]
    s = sampler(data, student="synthetic/b", teacher="synthetic/a", label_budget=3, mismatch_ratio=0.5)
    student_side = np.concatenate([s.labelled, s.unlabelled_pool])
    assert not set(bview.pair_id[torch.as_tensor(student_side)].tolist()) & \
        set(a.pair_id[torch.as_tensor(s.teacher_pool)].tolist())
    assert (per_class(s.labelled, bview.y) == 3).all()


def test_mismatch_digits_without_pairs(data):
    st, te = data["digits/signal"], data["digits/image"]
    r = 0.3
    s = sampler(data, label_budget=None, mismatch_ratio=r, steps=4)
    ns = per_class(s.labelled, st.y)
    nt = per_class(s.teacher_pool, te.y)
    n_s = per_class(st.splits["train"], st.y)
    n_t = per_class(te.splits["train"], te.y)
    assert np.array_equal(ns, np.maximum(1, np.round(r * n_s)).astype(int))
    assert np.array_equal(nt, np.maximum(1, np.round((1 - r) * n_t)).astype(int))
    for b in batches(s):
        assert torch.equal(b.ys, b.yt)
        ti = row_indices(te.x, b.xt)
        assert set(ti.tolist()) <= set(s.teacher_pool.tolist())


def test_mismatch_depends_on_seed(data):
    a = sampler(data, student="synthetic/b", teacher="synthetic/a", label_budget=None, mismatch_ratio=0.5, seed=0)
    b = sampler(data, student="synthetic/b", teacher="synthetic/a", label_budget=None, mismatch_ratio=0.5, seed=1)
    assert not np.array_equal(a.labelled, b.labelled)


# --------------------------------------------------------------------------- imbalance
def test_imbalance_keep_profile():
    keep = imbalance_keep(K, 10.0)
    assert keep.shape == (K,)
    assert keep[0] == 1.0 and keep[-1] == pytest.approx(0.1, rel=1e-15)    # (1/rho)^0, (1/rho)^1
    assert np.all(np.diff(keep) < 0)
    # known answers: K = 3, rho = 4 keeps 1, 1/2, 1/4 (powers of two: exact)
    assert imbalance_keep(3, 4.0).tolist() == [1.0, 0.5, 0.25]
    assert imbalance_keep(K, 1.0).tolist() == [1.0] * K


@pytest.mark.parametrize("rho", [5.0, 50.0])
def test_imbalance_teacher_side(data, rho):
    te = data["digits/image"]
    s = sampler(data, label_budget=5, imbalance_rho=rho, imbalance_side="teacher")
    got = np.array([len(p) for p in s.teacher_by_class])
    n_c = per_class(te.splits["train"], te.y)
    expected = np.maximum(1, np.round(imbalance_keep(K, rho) * n_c)).astype(int)
    assert np.array_equal(got, expected)
    assert np.array_equal(per_class(s.teacher_pool, te.y), got)
    assert got[-1] < got[0]
    # the student side is untouched
    assert (per_class(s.labelled, data["digits/signal"].y) == 5).all()
    for b in batches(s)[:3]:
        assert torch.equal(b.ys, b.yt)


@pytest.mark.parametrize("rho", [4.0, 100.0])
def test_imbalance_student_side(data, rho):
    k = 20
    s = sampler(data, label_budget=k, imbalance_rho=rho, imbalance_side="student")
    got = per_class(s.labelled, data["digits/signal"].y)
    expected = np.maximum(1, np.round(imbalance_keep(K, rho) * k)).astype(int)
    assert np.array_equal(got, expected)
    assert got.min() >= 1 and got[0] == k and got[-1] < k
    # the teacher pool is untouched
    te = data["digits/image"]
    assert set(s.teacher_pool.tolist()) == set(te.splits["train"].tolist())


# --------------------------------------------------------------------------- domain shift
def shift_pair(data, side, level=0.5, **kw):
    clean = sampler(data, label_budget=5, steps=3, seed=4, **kw)
    shifted = sampler(data, label_budget=5, steps=3, seed=4, shift_level=level, shift_side=side, **kw)
    return batches(clean, 2), batches(shifted, 2)


def test_shift_student_side(data):
    clean, shifted = shift_pair(data, "student")
    for c, s in zip(clean, shifted):
        assert torch.equal(c.ys, s.ys)
        assert s.xs.shape == c.xs.shape
        assert not torch.allclose(c.xs, s.xs)
        assert torch.equal(c.xt, s.xt)


def test_shift_teacher_side(data):
    clean, shifted = shift_pair(data, "teacher")
    for c, s in zip(clean, shifted):
        assert torch.equal(c.xs, s.xs)
        assert s.xt.shape == c.xt.shape
        assert not torch.allclose(c.xt, s.xt)
        assert torch.equal(c.yt, s.yt)


def test_shift_both_sides_and_unlabelled(data):
    clean = sampler(data, label_budget=5, steps=2, seed=4, unlabelled=True)
    shifted = sampler(data, label_budget=5, steps=2, seed=4, unlabelled=True, shift_level=0.8, shift_side="both")
    for c, s in zip(clean.epoch(0), shifted.epoch(0)):
        assert not torch.allclose(c.xs, s.xs)
        assert not torch.allclose(c.xt, s.xt)
        assert not torch.allclose(c.xu, s.xu)


def test_shift_level_zero_leaves_inputs_clean(data):
    st, te = data["digits/signal"], data["digits/image"]
    s = sampler(data, label_budget=5, steps=3, shift_level=0.0, shift_side="both")
    for b in batches(s):
        row_indices(st.x, b.xs)   # asserts every row is an unmodified dataset row
        row_indices(te.x, b.xt)


@pytest.mark.parametrize("shape,kind", [((6, 1, 8, 8), "image"), ((6, 1, 40), "signal"), ((6, 12), "vector")])
def test_corrupt_shapes_and_determinism(shape, kind):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    a = corrupt(x, kind, 0.7, torch.Generator().manual_seed(11))
    b = corrupt(x, kind, 0.7, torch.Generator().manual_seed(11))
    c = corrupt(x, kind, 0.7, torch.Generator().manual_seed(12))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.allclose(a, x)
    assert torch.isfinite(a).all()
    assert corrupt(x, kind, 0.0, torch.Generator().manual_seed(11)) is x
    x_before = x.clone()
    corrupt(x, kind, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(x, x_before), "corrupt modified its input in place"


def test_corrupt_strength_grows_with_level():
    x = torch.zeros(2000, 1, 40)
    weak = corrupt(x, "signal", 0.1, torch.Generator().manual_seed(0))
    strong = corrupt(x, "signal", 0.9, torch.Generator().manual_seed(0))
    # the sample std of n Gaussian draws has a relative standard error 1 / sqrt(2 n): 6 of them
    rel = 6 / math.sqrt(2 * x.numel())
    assert float(weak.std()) == pytest.approx(0.05 + 0.2 * 0.1, rel=rel)
    assert float(strong.std()) == pytest.approx(0.05 + 0.2 * 0.9, rel=rel)


# --------------------------------------------------------------------------- determinism
def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for a, b in zip(xs, ys):
        for f in ("xs", "ys", "xt", "yt", "xu"):
            va, vb = getattr(a, f), getattr(b, f)
            assert (va is None) == (vb is None)
            if va is not None:
                assert torch.equal(va, vb), f


@pytest.mark.parametrize("pairing", [
    {"mode": "class-matched"},
    {"mode": "unpaired", "shift_level": 0.5, "shift_side": "both"},
])
def test_epochs_deterministic(data, pairing):
    kw = dict(label_budget=6, steps=5, seed=9, unlabelled=True, **pairing)
    a, b = sampler(data, **kw), sampler(data, **kw)
    assert_same_batches(batches(a, 3), batches(b, 3))
    # the order of calls doesn't matter: epoch 3 after epoch 0 is still epoch 3
    batches(b, 0)
    assert_same_batches(batches(a, 3), batches(b, 3))
    e3, e4 = batches(a, 3), batches(a, 4)
    assert any(not torch.equal(x.xs, y.xs) for x, y in zip(e3, e4))
    other_seed = batches(sampler(data, **{**kw, "seed": 10}), 3)
    assert any(not torch.equal(x.xs, y.xs) for x, y in zip(e3, other_seed))


def test_epoch_does_not_touch_global_rng(data):
    s = sampler(data, label_budget=6, steps=3, shift_level=0.5, shift_side="both")
    torch.manual_seed(0)
    np.random.seed(0)
    expected = (torch.rand(1), np.random.rand())
    torch.manual_seed(0)
    np.random.seed(0)
    batches(s, 0)
    assert torch.equal(torch.rand(1), expected[0]) and np.random.rand() == expected[1]


def test_batch_to_device(data):
    b = next(sampler(data, label_budget=3, steps=1).epoch(0))
    moved = b.to("cpu")
    assert torch.equal(moved.xs, b.xs) and moved.xu is None


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("fields,name", [
    ({"mode": "bogus"}, "pairing.mode"),
    ({"label_budget": 0}, "pairing.label_budget"),
    ({"mismatch_ratio": 1.5}, "pairing.mismatch_ratio"),
    ({"mismatch_ratio": 0.0}, "pairing.mismatch_ratio"),
    ({"imbalance_rho": 0.5}, "pairing.imbalance_rho"),
    ({"imbalance_side": "x"}, "pairing.imbalance_side"),
    ({"shift_side": "sideways"}, "pairing.shift_side"),
    ({"shift_level": 1.5}, "pairing.shift_level"),
    ({"mode": "paired", "mismatch_ratio": 0.5}, "pairing.mismatch_ratio"),
])
def test_invalid_pairing_configs(data, fields, name):
    with pytest.raises(ConfigError) as ei:
        sampler(data, student="synthetic/b", teacher="synthetic/a", **fields)
    assert name in str(ei.value)
    if fields.get("mode") == "paired":
        assert "pairing.mode" in str(ei.value)


def test_sampler_rejects_incompatible_modalities(data):
    with pytest.raises(DataError, match="label sets differ"):
        sampler(data, student="digits/signal", teacher="synthetic/a")
