"""Modality datasets: shapes, fixed stratified splits, standardisation, caching, npz loading."""
import dataclasses
import math

import numpy as np
import pytest
import torch

import ucmkd.data.digits as digits_mod
import ucmkd.data.synthetic as synthetic_mod
from ucmkd.config import DataConfig, RunConfig, SyntheticConfig
from ucmkd.data import check_compatible, load_modality, make_splits
from ucmkd.data.digits import mnist1d_cache_path
from ucmkd.errors import ConfigError, DataError

import references as ref

SMALL_SYN = SyntheticConfig(n_items=400)


def small_cfg(tmp_path, **kw) -> DataConfig:
    kw.setdefault("mnist1d_samples", 600)
    kw.setdefault("synthetic", SMALL_SYN)
    return DataConfig(cache_dir=str(tmp_path), **kw)


# (name, kind, input shape)
MODALITIES = [
    ("digits/image", "image", (1, 8, 8)),
    ("digits/signal", "signal", (1, 40)),
    ("synthetic/a", "vector", (SMALL_SYN.dim_a,)),
    ("synthetic/b", "vector", (SMALL_SYN.dim_b + SMALL_SYN.distractors,)),
]


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="module")
def loaded(module_cache):
    cfg = small_cfg(module_cache)
    return {name: load_modality(name, cfg) for name, _, _ in MODALITIES}


# --------------------------------------------------------------------------- built-in modalities
@pytest.mark.parametrize("name,kind,shape", MODALITIES)
def test_builtin_modality_shapes_and_classes(loaded, name, kind, shape):
    d = loaded[name]
    assert d.name == name
    assert d.kind == kind
    assert d.input_shape == shape
    assert d.x.dtype == torch.float32 and d.y.dtype == torch.long
    assert d.x.ndim == 1 + len(shape) and d.x.shape[0] == d.y.shape[0]
    assert d.num_classes == 10
    assert set(d.y.tolist()) == set(range(10))
    assert torch.isfinite(d.x).all()
    assert name in d.describe()


def test_digits_signal_size_follows_config(loaded):
    assert len(loaded["digits/signal"].y) == 600
    assert len(loaded["digits/image"].y) == 1797  # sklearn's load_digits
    assert len(loaded["synthetic/a"].y) == SMALL_SYN.n_items


@pytest.mark.parametrize("name", [m[0] for m in MODALITIES])
def test_splits_disjoint_covering_stratified(loaded, name):
    d = loaded[name]
    n = len(d.y)
    parts = {k: set(v.tolist()) for k, v in d.splits.items()}
    assert set(parts) == {"train", "val", "test"}
    for k, v in d.splits.items():
        assert v.dtype == torch.long
        assert len(parts[k]) == len(v), f"{k} split has duplicate indices"
    assert not parts["train"] & parts["val"]
    assert not parts["train"] & parts["test"]
    assert not parts["val"] & parts["test"]
    assert parts["train"] | parts["val"] | parts["test"] == set(range(n))
    # stratified: every class is in every split, in the overall proportion up to the rounding of
    # counts: test and train+val split stratified (a class's count is the floor or the ceiling of
    # its share, < 1 item off), val from train+val likewise, so every split is < 2 items off
    overall = torch.bincount(d.y, minlength=10).double() / n
    for k, idx in d.splits.items():
        counts = torch.bincount(d.y[idx], minlength=10)
        assert (counts > 0).all(), f"{name}: split {k} misses a class: {counts.tolist()}"
        assert (counts.double() / len(idx) - overall).abs().max() < 2 / len(idx)


@pytest.mark.parametrize("name", [m[0] for m in MODALITIES])
def test_split_sizes_val_carved_from_training_part(loaded, name):
    d = loaded[name]
    n = len(d.y)
    n_test = len(d.splits["test"])
    assert n_test == math.ceil(0.25 * n)
    # the validation split is a val_frac share of the training part (not of the whole set)
    assert len(d.splits["val"]) == math.ceil(0.2 * (n - n_test))
    assert len(d.splits["train"]) == n - n_test - len(d.splits["val"])


def test_val_frac_changes_only_the_training_part():
    y = np.arange(500) % 10
    a = make_splits(y, 0.25, 0.2, seed=3)
    b = make_splits(y, 0.25, 0.4, seed=3)
    assert torch.equal(a["test"], b["test"])  # test split untouched by val_frac
    trval_a = set(a["train"].tolist()) | set(a["val"].tolist())
    trval_b = set(b["train"].tolist()) | set(b["val"].tolist())
    assert trval_a == trval_b
    assert len(b["val"]) > len(a["val"])


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_make_splits_rejects_bad_fractions(bad):
    y = np.arange(100) % 10
    with pytest.raises(DataError, match="data.test_frac"):
        make_splits(y, bad, 0.2, seed=0)
    with pytest.raises(DataError, match="data.val_frac"):
        make_splits(y, 0.25, bad, seed=0)


@pytest.mark.parametrize("name", ["digits/image", "digits/signal", "synthetic/b"])
def test_splits_fixed_by_split_seed(module_cache, loaded, name):
    d0 = loaded[name]
    again = load_modality(name, small_cfg(module_cache))
    other = load_modality(name, small_cfg(module_cache, split_seed=1))
    for k in ("train", "val", "test"):
        assert torch.equal(d0.splits[k], again.splits[k])
    assert not torch.equal(d0.splits["test"], other.splits["test"])
    assert not torch.equal(d0.splits["val"], other.splits["val"])
    # the data itself is the same; only the split (and hence the standardisation) moves
    assert torch.equal(d0.y, other.y)


def test_splits_do_not_depend_on_run_seed(module_cache):
    from ucmkd.api import load_pair

    data = small_cfg(module_cache)
    splits = []
    for seed in (0, 7):
        # the global RNGs are in different states too, as they would be in two runs
        torch.manual_seed(seed + 100)
        np.random.seed(seed + 100)
        cfg = RunConfig(data=dataclasses.replace(data), seed=seed)
        student, teacher = load_pair(cfg)
        splits.append((student.splits, teacher.splits, student.x, teacher.x))
    (s0, t0, xs0, xt0), (s1, t1, xs1, xt1) = splits
    for k in ("train", "val", "test"):
        assert torch.equal(s0[k], s1[k])
        assert torch.equal(t0[k], t1[k])
    assert torch.equal(xs0, xs1) and torch.equal(xt0, xt1)


# --------------------------------------------------------------------------- standardisation
def assert_standardised(d):
    """The train split has mean 0 and std 1 up to float32 arithmetic: torch sums float32 by
    cascade (pairwise) summation, so the statistics m, s of n numbers are off by at most
    ~(log2 n) eps32 of their magnitudes, and each (x - m) / s adds two roundings; measured in
    float64, |mean| and |std - 1| stay below (log2 n + 4) eps32 (mean|x| + |m|) / s. Vectors are
    standardised per feature (population std, float64 statistics), every other kind globally."""
    xtr, _ = d.split("train")
    x = xtr.double()
    m = torch.as_tensor(d.meta["norm_mean"], dtype=torch.float64)
    s = torch.as_tensor(d.meta["norm_std"], dtype=torch.float64)
    if d.kind == "vector":
        assert d.meta["standardize"] == "per_feature"
        m, s = m.reshape(-1), s.reshape(-1)
        n = x.shape[0]
        bound = (math.log2(n) + 4) * ref.EPS32 * ((x * s + m).abs().mean(0) + m.abs()) / s
        varies = (x * s + m).std(0) > 0           # a constant feature keeps std 1: x - mean = 0
        assert (x.mean(0).abs() <= bound).all()
        assert ((x.std(0, unbiased=False) - 1.0).abs() <= bound)[varies].all()
        return
    assert d.meta["standardize"] == "global"
    m, s = float(m), float(s)
    n = xtr.numel()
    raw_abs = float((x * s + m).abs().mean())
    bound = (math.log2(n) + 4) * ref.EPS32 * (raw_abs + abs(m)) / s
    assert abs(float(x.mean())) <= bound
    assert abs(float(x.std()) - 1.0) <= bound



@pytest.mark.parametrize("name", [m[0] for m in MODALITIES])
def test_train_split_standardised(loaded, name):
    d = loaded[name]
    xtr, _ = d.split("train")
    assert_standardised(d)
    # the statistics come from the training split only: val/test are only roughly standard
    assert "norm_mean" in d.meta and "norm_std" in d.meta
    assert np.all(np.asarray(d.meta["norm_std"]) > 0)


def test_standardisation_uses_train_statistics_only(module_cache):
    """Changing the split changes the standardisation statistics (they are not global)."""
    a = load_modality("synthetic/a", small_cfg(module_cache))
    b = load_modality("synthetic/a", small_cfg(module_cache, split_seed=5))
    assert a.meta["norm_mean"] != b.meta["norm_mean"]
    assert_standardised(b)


# --------------------------------------------------------------------------- mnist1d cache
def test_digits_signal_cache_written_and_reused(tmp_path, monkeypatch):
    cfg = small_cfg(tmp_path, mnist1d_samples=300)
    path = mnist1d_cache_path(cfg)
    assert path.parent == tmp_path
    assert not path.exists()
    first = load_modality("digits/signal", cfg)
    assert path.is_file()
    assert str(path) == first.source
    assert not list(tmp_path.glob("*.tmp")), "temporary cache file left behind"

    def boom(*a, **k):
        raise AssertionError("mnist1d regenerated although the cache exists")

    monkeypatch.setattr(digits_mod, "generate_mnist1d", boom)
    second = load_modality("digits/signal", cfg)
    assert torch.equal(first.x, second.x)
    assert torch.equal(first.y, second.y)
    for k in first.splits:
        assert torch.equal(first.splits[k], second.splits[k])
    # another size is another cache file, so it must be generated (and our stub refuses)
    with pytest.raises(AssertionError, match="regenerated"):
        load_modality("digits/signal", small_cfg(tmp_path, mnist1d_samples=320))


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    from ucmkd.data import cache_dir

    monkeypatch.setenv("UCMKD_CACHE", str(tmp_path / "envcache"))
    assert cache_dir(DataConfig()) == tmp_path / "envcache"
    assert (tmp_path / "envcache").is_dir()
    assert cache_dir(DataConfig(cache_dir=str(tmp_path / "explicit"))) == tmp_path / "explicit"


@pytest.mark.parametrize("content", [b"this is not a pickle", b""])
def test_corrupt_mnist1d_cache_is_a_data_error(tmp_path, content):
    cfg = small_cfg(tmp_path, mnist1d_samples=300)
    path = mnist1d_cache_path(cfg)
    path.write_bytes(content)
    with pytest.raises(DataError) as ei:
        load_modality("digits/signal", cfg)
    assert str(path) in str(ei.value)


def test_mnist1d_cache_with_wrong_shape_is_a_data_error(tmp_path):
    import pickle

    cfg = small_cfg(tmp_path, mnist1d_samples=300)
    path = mnist1d_cache_path(cfg)
    path.write_bytes(pickle.dumps({"x": np.zeros((300, 12), np.float32), "y": np.zeros(300, np.int64)}))
    with pytest.raises(DataError) as ei:
        load_modality("digits/signal", cfg)
    assert str(path) in str(ei.value) and "[300, 12]" in str(ei.value)


def test_mnist1d_generation_restores_global_rngs():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    digits_mod.generate_mnist1d(50)
    assert np.random.rand() == expected


# --------------------------------------------------------------------------- synthetic
def test_synthetic_views_are_paired(loaded):
    a, b = loaded["synthetic/a"], loaded["synthetic/b"]
    assert a.pair_id is not None and b.pair_id is not None
    assert torch.equal(a.pair_id, torch.arange(len(a.y)))
    assert torch.equal(a.pair_id, b.pair_id)
    assert torch.equal(a.y, b.y)  # item i of view A and item i of view B share a label
    assert a.classes == b.classes == [f"c{i}" for i in range(10)]
    check_compatible(a, b)
    # the same labels give the same splits, so true pairs fall into the same split
    for k in ("train", "val", "test"):
        assert torch.equal(a.splits[k], b.splits[k])


def test_synthetic_views_carry_class_signal(loaded):
    """View A is close to linear in the latent: class means are well separated."""
    a = loaded["synthetic/a"]
    means = torch.stack([a.x[a.y == c].mean(0) for c in range(10)])
    within = torch.stack([a.x[a.y == c].std(0).mean() for c in range(10)]).mean()
    between = torch.pdist(means).mean()
    assert between > within


def test_synthetic_distractors_add_dimensions(tmp_path):
    syn = dataclasses.replace(SMALL_SYN, distractors=5, dim_b=12)
    b = load_modality("synthetic/b", small_cfg(tmp_path, synthetic=syn))
    assert b.input_shape == (12 + 5,)
    none = load_modality("synthetic/b", small_cfg(tmp_path, synthetic=dataclasses.replace(syn, distractors=0)))
    assert none.input_shape == (12,)
    a = load_modality("synthetic/a", small_cfg(tmp_path, synthetic=dataclasses.replace(syn, dim_a=7)))
    assert a.input_shape == (7,)


@pytest.mark.parametrize("knob,value", [("noise", 2.0), ("nonlinearity", 0.0), ("seed", 1)])
def test_synthetic_knobs_change_view_b(tmp_path, loaded, knob, value):
    base = loaded["synthetic/b"]
    syn = dataclasses.replace(SMALL_SYN, **{knob: value})
    other = load_modality("synthetic/b", small_cfg(tmp_path, synthetic=syn))
    assert other.input_shape == base.input_shape
    assert not torch.allclose(other.x, base.x)


def test_synthetic_same_seed_same_data(tmp_path, loaded):
    synthetic_mod._views.cache_clear()  # regenerate, don't just hit the memo
    for name in ("synthetic/a", "synthetic/b"):
        again = load_modality(name, small_cfg(tmp_path))
        assert torch.equal(again.x, loaded[name].x)
        assert torch.equal(again.y, loaded[name].y)
        assert torch.equal(again.pair_id, loaded[name].pair_id)


def test_loaded_data_does_not_alias_the_generator_cache(tmp_path):
    """Editing one loaded modality in place must not leak into later loads or the other view."""
    cfg = small_cfg(tmp_path)
    a = load_modality("synthetic/a", cfg)
    b = load_modality("synthetic/b", cfg)
    y_before = b.y.clone()
    a.y[:5] = (a.y[:5] + 1) % 10
    a.pair_id[:5] = -1
    assert torch.equal(b.y, y_before)
    again = load_modality("synthetic/a", cfg)
    assert torch.equal(again.y, y_before)
    assert torch.equal(again.pair_id, torch.arange(len(again.y)))


@pytest.mark.parametrize("change", [{"n_items": 5}, {"num_classes": 1}, {"noise": -1.0}])
def test_synthetic_invalid_knobs(tmp_path, change):
    syn = dataclasses.replace(SMALL_SYN, **change)
    with pytest.raises(DataError, match="data.synthetic"):
        load_modality("synthetic/a", small_cfg(tmp_path, synthetic=syn))


# --------------------------------------------------------------------------- npz
def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_npz_loads(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 5)).astype(np.float32)
    y = np.arange(120) % 3
    p = write_npz(tmp_path / "ok.npz", x=x, y=y, classes=np.array(["cat", "dog", "fox"]))
    d = load_modality(f"npz:{p}", small_cfg(tmp_path))
    assert d.name == f"npz:{p}"
    assert d.kind == "vector" and d.input_shape == (5,)
    assert d.classes == ["cat", "dog", "fox"]
    assert torch.equal(d.y, torch.as_tensor(y, dtype=torch.long))
    assert d.pair_id is None
    assert str(p) in d.source
    assert_standardised(d)
    # standardisation is an affine map of the raw inputs (per feature for vectors): undone within
    # the roundings of (x - m) / s and back (4 of them, each eps32 of |x| + |m|)
    raw = torch.as_tensor(x).double()
    m = torch.as_tensor(d.meta["norm_mean"], dtype=torch.float64)
    sd = torch.as_tensor(d.meta["norm_std"], dtype=torch.float64)
    if m.ndim:
        m, sd = m.reshape(-1), sd.reshape(-1)
    err = (d.x.double() * sd + m - raw).abs()
    assert (err <= 4 * ref.EPS32 * (raw.abs() + m.abs())).all()


def test_npz_kind_pair_id_and_default_classes(tmp_path):
    x = np.random.default_rng(1).normal(size=(60, 1, 4, 4)).astype(np.float32)
    y = np.arange(60) % 4
    p = write_npz(tmp_path / "img.npz", x=x, y=y, pair_id=np.arange(60) + 1000)
    d = load_modality(f"npz:{p}", small_cfg(tmp_path))
    assert d.kind == "image" and d.input_shape == (1, 4, 4)
    assert d.classes == ["0", "1", "2", "3"]
    assert torch.equal(d.pair_id, torch.arange(60) + 1000)
    s = write_npz(tmp_path / "sig.npz", x=x[:, :, 0, :], y=y, kind=np.array("signal"))
    assert load_modality(f"npz:{s}", small_cfg(tmp_path)).kind == "signal"


def test_npz_missing_file(tmp_path):
    p = tmp_path / "absent.npz"
    with pytest.raises(DataError) as ei:
        load_modality(f"npz:{p}", small_cfg(tmp_path))
    assert str(p) in str(ei.value)


def test_npz_missing_labels(tmp_path):
    p = write_npz(tmp_path / "nolabels.npz", x=np.zeros((10, 3), np.float32))
    with pytest.raises(DataError) as ei:
        load_modality(f"npz:{p}", small_cfg(tmp_path))
    assert "'y'" in str(ei.value) and str(p) in str(ei.value)


def test_npz_non_integer_labels(tmp_path):
    p = write_npz(tmp_path / "floaty.npz", x=np.zeros((10, 3), np.float32), y=np.linspace(0, 1, 10))
    with pytest.raises(DataError) as ei:
        load_modality(f"npz:{p}", small_cfg(tmp_path))
    assert "integer" in str(ei.value) and str(p) in str(ei.value)


def test_npz_not_an_npz(tmp_path):
    p = tmp_path / "junk.npz"
    p.write_bytes(b"definitely not a zip archive")
    with pytest.raises(DataError) as ei:
        load_modality(f"npz:{p}", small_cfg(tmp_path))
    assert str(p) in str(ei.value)


@pytest.mark.parametrize("arrays,match", [
    ({"x": np.zeros((20, 3)), "y": np.arange(20) % 10}, "labels must lie in 0..2"),   # more labels than classes
    ({"x": np.zeros((20, 3)), "y": np.arange(19) % 3}, "labels must have shape"),
    ({"x": np.full((20, 3), np.nan), "y": np.arange(20) % 3}, "NaN"),
    ({"x": np.zeros(20), "y": np.arange(20) % 3}, "field 'x'"),
])
def test_npz_invalid_contents(tmp_path, arrays, match):
    arrays = dict(arrays)
    arrays.setdefault("classes", np.array(["a", "b", "c"]))
    p = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=match) as ei:
        load_modality(f"npz:{p}", small_cfg(tmp_path))
    assert str(p) in str(ei.value)


# --------------------------------------------------------------------------- registry / compatibility
def test_unknown_dataset_lists_known(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_modality("nope/x", small_cfg(tmp_path))
    msg = str(ei.value)
    assert "nope/x" in msg
    for name, _, _ in MODALITIES:
        assert name in msg


def test_check_compatible_rejects_different_label_sets(tmp_path):
    x = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    y = np.arange(60) % 3
    pa = write_npz(tmp_path / "animals.npz", x=x, y=y, classes=np.array(["cat", "dog", "fox"]))
    pb = write_npz(tmp_path / "birds.npz", x=x, y=y, classes=np.array(["cat", "dog", "owl"]))
    a = load_modality(f"npz:{pa}", small_cfg(tmp_path))
    b = load_modality(f"npz:{pb}", small_cfg(tmp_path))
    with pytest.raises(DataError) as ei:
        check_compatible(a, b)
    msg = str(ei.value)
    assert a.name in msg and b.name in msg
    assert "fox" in msg and "owl" in msg
    assert "'cat'" not in msg.split(":")[-1]  # shared classes are not reported as differing


def test_check_compatible_rejects_reordered_classes(tmp_path):
    x = np.zeros((30, 2), np.float32) + np.arange(30)[:, None]
    y = np.arange(30) % 3
    pa = write_npz(tmp_path / "abc.npz", x=x, y=y, classes=np.array(["a", "b", "c"]))
    pb = write_npz(tmp_path / "cba.npz", x=x, y=y, classes=np.array(["c", "b", "a"]))
    a = load_modality(f"npz:{pa}", small_cfg(tmp_path))
    b = load_modality(f"npz:{pb}", small_cfg(tmp_path))
    with pytest.raises(DataError, match="different order"):
        check_compatible(a, b)


def test_check_compatible_digits_vs_synthetic(loaded):
    with pytest.raises(DataError) as ei:
        check_compatible(loaded["digits/signal"], loaded["synthetic/a"])
    msg = str(ei.value)
    assert "digits/signal" in msg and "synthetic/a" in msg
    check_compatible(loaded["digits/signal"], loaded["digits/image"])  # same label space: fine


def test_predefined_and_group_held_out_splits():
    import numpy as np
    import pytest

    from ucmkd.data.base import make_splits
    from ucmkd.errors import DataError

    y = np.arange(60) % 3
    split = np.array(["train"] * 45 + ["test"] * 15)
    s = make_splits(y, 0.25, 0.2, 0, split=split)
    assert set(s["test"].tolist()) == set(range(45, 60))
    assert set(s["train"].tolist()) | set(s["val"].tolist()) == set(range(45)) and len(s["val"]) == 9
    with_val = split.copy()
    with_val[:5] = "val"
    s2 = make_splits(y, 0.25, 0.2, 0, split=with_val)
    assert s2["val"].tolist() == list(range(5))
    with pytest.raises(DataError, match="unknown split name 'dev'"):
        make_splits(y, 0.25, 0.2, 0, split=np.array(["dev"] * 60))
    groups = np.repeat(np.arange(6), 10)      # e.g. 6 voices
    g = make_splits(y, 0.34, 0.2, 0, groups=groups)
    test_groups = set(groups[g["test"].numpy()])
    train_groups = set(groups[np.concatenate([g["train"].numpy(), g["val"].numpy()])])
    assert test_groups and not (test_groups & train_groups)   # held-out voices
    assert len(test_groups) == 2
    assert make_splits(y, 0.34, 0.2, 0, groups=groups)["test"].tolist() == g["test"].tolist()
    with pytest.raises(DataError, match="at least 2 groups"):
        make_splits(y, 0.3, 0.2, 0, groups=np.zeros(60))


def test_validation_too_small_to_stratify_falls_back_to_random():
    import numpy as np

    from ucmkd.data.base import make_splits

    y = np.arange(40) % 10          # 10 classes, 4 items each
    groups = np.repeat(np.arange(4), 10)
    s = make_splits(y, 0.25, 0.2, 0, groups=groups, val_by="items")   # val = 6 items < 10 classes
    assert len(s["val"]) == 6 and len(s["train"]) == 24 and len(s["test"]) == 10
