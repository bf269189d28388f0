"""``.npz`` datasets with ``split`` and ``groups``, and validation by held-out groups (``data.val_by``)."""
import dataclasses

import numpy as np
import pytest
import torch
from sklearn.model_selection import train_test_split

from ucmkd.api import key_config, prepare, run_key
from ucmkd.config import DataConfig, RunConfig, from_dict
from ucmkd.data import load_modality, make_splits
from ucmkd.engine.teacher import build_teacher_model, teacher_key
from ucmkd.errors import ConfigError, DataError

#: ``run_key(RunConfig())`` at commit 029df21, before ``data.val_by`` existed
DEFAULT_RUN_KEY_BEFORE_VAL_BY = "5b269cb990"


def _old_make_splits(y, test_frac, val_frac, seed, split=None, groups=None):
    """The reference: ``make_splits`` as it was before ``val_by`` (commit 029df21), verbatim
    but for the error checks: validation always carved from the training part's items."""
    idx = np.arange(len(y))
    if split is not None:
        split = np.asarray(split).astype(str)
        trval, test = idx[split != "test"], idx[split == "test"]
        if (split == "val").any():
            train, val = idx[split == "train"], idx[split == "val"]
            trval = None
    elif groups is not None:
        ids = np.unique(groups)
        rng = np.random.default_rng(seed)
        n_test = min(len(ids) - 1, max(1, int(round(test_frac * len(ids)))))
        test_ids = rng.choice(ids, size=n_test, replace=False)
        is_test = np.isin(groups, test_ids)
        trval, test = idx[~is_test], idx[is_test]
    else:
        trval, test = train_test_split(idx, test_size=test_frac, random_state=seed, stratify=y)
    if trval is not None:
        counts = np.bincount(y[trval])
        n_val = int(np.ceil(val_frac * len(trval)))
        strat = y[trval] if counts[counts > 0].min() >= 2 and n_val >= (counts > 0).sum() else None
        train, val = train_test_split(trval, test_size=val_frac, random_state=seed + 1, stratify=strat)
    return {k: np.sort(v).tolist() for k, v in (("train", train), ("val", val), ("test", test))}


def _lists(s: dict) -> dict:
    return {k: v.tolist() for k, v in s.items()}


def _group_sets(s: dict, groups) -> dict:
    return {k: set(np.asarray(groups)[v.numpy()].tolist()) for k, v in s.items()}


Y = np.arange(240) % 4
GROUPS = np.repeat(np.arange(12), 20)                # e.g. 12 speakers of 20 clips each
SPLIT = np.where(np.arange(240) < 180, "train", "test")


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("test_frac,val_frac", [(0.25, 0.2), (0.34, 0.1), (0.5, 0.4)])
def test_items_mode_is_the_old_split_exactly(seed, test_frac, val_frac):
    with_val = SPLIT.copy()
    with_val[150:180] = "val"
    for kw in ({}, {"groups": GROUPS}, {"split": SPLIT}, {"split": SPLIT, "groups": GROUPS},
               {"split": with_val}, {"groups": np.repeat(np.arange(2), 120)}):
        old = _old_make_splits(Y, test_frac, val_frac, seed, **kw)
        assert _lists(make_splits(Y, test_frac, val_frac, seed, val_by="items", **kw)) == old, kw
    for kw in ({}, {"split": SPLIT}, {"split": with_val}, {"split": with_val, "groups": GROUPS},
               {"groups": np.repeat(np.arange(2), 120)}):      # auto: no groups, own val, or too few groups
        assert _lists(make_splits(Y, test_frac, val_frac, seed, **kw)) == _old_make_splits(
            Y, test_frac, val_frac, seed, **kw), kw


@pytest.mark.parametrize("val_by", ["groups", "auto"])
@pytest.mark.parametrize("seed", [0, 3])
def test_validation_and_test_hold_out_whole_groups(val_by, seed):
    s = make_splits(Y, 0.25, 0.2, seed, groups=GROUPS, val_by=val_by)
    g = _group_sets(s, GROUPS)
    assert all(g.values())
    assert not (g["train"] & g["val"]) and not (g["train"] & g["test"]) and not (g["val"] & g["test"])
    assert g["train"] | g["val"] | g["test"] == set(range(12))
    assert len(g["test"]) == 3                          # round(0.25 * 12)
    assert len(g["val"]) == 2                           # round(0.2 * 9) of the 9 training groups
    # the same test groups as validation by items: only train/val differ
    items = make_splits(Y, 0.25, 0.2, seed, groups=GROUPS, val_by="items")
    assert s["test"].tolist() == items["test"].tolist()
    assert make_splits(Y, 0.25, 0.2, seed, groups=GROUPS, val_by=val_by)["val"].tolist() == s["val"].tolist()


def test_three_groups_are_enough_two_are_not():
    groups = np.repeat(np.arange(3), 80)
    for frac in (0.1, 0.9):                             # at least one group each, whatever the fractions
        g = _group_sets(make_splits(Y, frac, frac, 0, groups=groups, val_by="groups"), groups)
        assert [len(g[k]) for k in ("train", "val", "test")] == [1, 1, 1]
    two = np.repeat(np.arange(2), 120)
    with pytest.raises(DataError) as ei:
        make_splits(Y, 0.25, 0.2, 0, groups=two, val_by="groups", where="voices.npz")
    msg = str(ei.value)
    assert "voices.npz" in msg and "data.val_by=groups" in msg and "at least 3 groups" in msg and "got 2" in msg
    with pytest.raises(DataError, match=r"mine: data.val_by=groups needs group ids"):
        make_splits(Y, 0.25, 0.2, 0, val_by="groups", where="mine")
    with pytest.raises(ConfigError, match=r"data.val_by: unknown value 'speakers'"):
        make_splits(Y, 0.25, 0.2, 0, groups=GROUPS, val_by="speakers")
    with pytest.raises(ConfigError, match=r"data.val_by: unknown value 'speakers'; choose one of auto, items, groups"):
        from_dict(RunConfig, {"data": {"val_by": "speakers"}})


def test_a_split_with_groups_carves_validation_by_groups_from_its_train_part():
    s = make_splits(Y, 0.25, 0.2, 0, split=SPLIT, groups=GROUPS, val_by="groups")
    assert s["test"].tolist() == list(range(180, 240))             # the file's own test split
    g = _group_sets(s, GROUPS)
    assert not (g["train"] & g["val"]) and g["train"] | g["val"] == set(range(9))
    assert len(g["val"]) == 2                                      # round(0.2 * 9)
    assert _lists(make_splits(Y, 0.25, 0.2, 0, split=SPLIT, groups=GROUPS)) == _lists(s)   # auto: groups
    # the test groups may also be training groups (the file's choice); one train group is too few
    one = np.where(SPLIT == "train", 0, np.arange(240) % 5)
    with pytest.raises(DataError, match=r"at least 2 groups, one each for validation and training .* got 1"):
        make_splits(Y, 0.25, 0.2, 0, split=SPLIT, groups=one, val_by="groups")
    assert _lists(make_splits(Y, 0.25, 0.2, 0, split=SPLIT, groups=one)) == _old_make_splits(Y, 0.25, 0.2, 0, SPLIT)


def test_the_datasets_own_validation_split_wins():
    own = SPLIT.copy()
    own[:20] = "val"                                               # group 0
    s = make_splits(Y, 0.25, 0.2, 0, split=own, groups=GROUPS, val_by="groups")
    assert s["val"].tolist() == list(range(20)) and s["test"].tolist() == list(range(180, 240))


# --------------------------------------------------------------------------- .npz fields
def _write(path, n=240, **arrays):
    rng = np.random.default_rng(0)
    y = np.arange(n) % 4
    base = {"x": (rng.normal(size=(n, 6)) + y[:, None]).astype(np.float32), "y": y,
            "classes": np.array(["a", "b", "c", "d"])}
    np.savez(path, **{**base, **arrays})
    return path


def _cfg(tmp_path, **kw) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "cache"), **kw)


def test_npz_groups_are_held_out_whole(tmp_path):
    speakers = np.array([f"spk{g:02d}" for g in GROUPS])
    d = load_modality(f"npz:{_write(tmp_path / 'g.npz', groups=speakers)}", _cfg(tmp_path))
    g = _group_sets(d.splits, speakers)
    assert not (g["train"] & g["val"]) and not (g["train"] & g["test"]) and not (g["val"] & g["test"])
    assert len(g["test"]) == 3 and len(g["val"]) == 2 and d.meta["val_by"] == "groups"
    # strings or integers in the same order: the same splits
    ints = load_modality(f"npz:{_write(tmp_path / 'i.npz', groups=GROUPS)}", _cfg(tmp_path))
    assert _lists(ints.splits) == _lists(d.splits)
    items = load_modality(f"npz:{_write(tmp_path / 'g.npz', groups=speakers)}", _cfg(tmp_path, val_by="items"))
    assert _lists(items.splits) == _old_make_splits(Y, 0.25, 0.2, 0, groups=speakers)
    assert items.meta["val_by"] == "items"


def test_npz_split_is_honoured(tmp_path):
    split = np.array(["train"] * 150 + ["val"] * 30 + ["test"] * 60)
    d = load_modality(f"npz:{_write(tmp_path / 's.npz', split=split)}", _cfg(tmp_path))
    assert d.splits["train"].tolist() == list(range(150))
    assert d.splits["val"].tolist() == list(range(150, 180))
    assert d.splits["test"].tolist() == list(range(180, 240))
    assert d.meta["val_by"] == "split"
    # the training statistics are those of the file's train split
    assert torch.allclose(d.x[:150].double().mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("name,suggestion", [("group", "groups"), ("labels", None)])
def test_npz_unknown_array_is_named(tmp_path, name, suggestion):
    p = _write(tmp_path / "typo.npz", **{name: GROUPS})
    with pytest.raises(DataError) as ei:
        load_modality(f"npz:{p}", _cfg(tmp_path))
    msg = str(ei.value)
    assert str(p) in msg and f"unknown array {name!r}" in msg
    assert "known fields: x, y, classes, pair_id, kind, augment, split, groups" in msg
    assert (f"did you mean {suggestion!r}" in msg) == (suggestion is not None)


@pytest.mark.parametrize("arrays,match", [
    ({"split": np.array(["train"] * 200 + ["dev"] * 40)}, r"field 'split': unknown split name 'dev'"),
    ({"split": np.zeros(240, np.int64)}, r"field 'split' must hold strings train/val/test, got dtype int64"),
    ({"split": np.array(["train"] * 239)}, r"field 'split' must have shape \[N\]=\[240\]"),
    ({"groups": np.linspace(0, 1, 240)}, r"field 'groups' must hold group ids .*got dtype float64"),
    ({"groups": GROUPS.reshape(120, 2)}, r"field 'groups' must have shape \[N\]=\[240\].*got \[120, 2\]"),
    ({"pair_id": np.linspace(0, 1, 240)}, r"field 'pair_id' must hold integer ids"),
])
def test_npz_bad_split_or_groups_name_the_file_and_field(tmp_path, arrays, match):
    p = _write(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=match) as ei:
        load_modality(f"npz:{p}", _cfg(tmp_path))
    assert str(p) in str(ei.value)


def test_npz_val_by_groups_with_two_groups_names_the_file(tmp_path):
    p = _write(tmp_path / "two.npz", groups=np.repeat([5, 9], 120))
    with pytest.raises(DataError) as ei:
        load_modality(f"npz:{p}", _cfg(tmp_path, val_by="groups"))
    assert str(p) in str(ei.value) and "data.val_by=groups" in str(ei.value)
    assert load_modality(f"npz:{p}", _cfg(tmp_path)).meta["val_by"] == "items"     # auto: too few, by items


# --------------------------------------------------------------------------- keys
def _run_cfg(tmp_path, student: str, val_by: str = "auto") -> RunConfig:
    return from_dict(RunConfig, {
        "data": {"teacher": f"npz:{_write(tmp_path / 'teacher.npz')}", "student": student,
                 "cache_dir": str(tmp_path / "cache"), "val_by": val_by},
        "method": {"name": "ce"}, "optim": {"epochs": 1, "steps_per_epoch": 1, "batch_size": 16},
        "model": {"teacher_width": 8, "student_width": 8, "teacher_feat_dim": 8, "student_feat_dim": 8}})


def _run_content_key(cfg: RunConfig) -> str:
    """The run directory's content key, with one fixed untrained teacher (nothing trains)."""
    student, teacher_data = load_modality(cfg.data.student, cfg.data), load_modality(cfg.data.teacher, cfg.data)
    torch.manual_seed(0)
    teacher = build_teacher_model(cfg, teacher_data)
    return prepare(cfg, student=student, teacher_data=teacher_data, teacher=teacher, teacher_info={}).key


def test_keys_without_groups_are_unchanged(tmp_path):
    assert run_key(RunConfig()) == DEFAULT_RUN_KEY_BEFORE_VAL_BY
    assert "val_by" not in key_config(RunConfig())["data"]
    items = RunConfig()
    items.data = dataclasses.replace(items.data, val_by="items")
    assert run_key(items) != run_key(RunConfig())      # spelled out: a key of its own
    plain = f"npz:{_write(tmp_path / 'plain.npz')}"
    a, b = _run_cfg(tmp_path, plain), _run_cfg(tmp_path, plain, "items")
    da, db = load_modality(plain, a.data), load_modality(plain, b.data)
    assert _lists(da.splits) == _lists(db.splits) == _old_make_splits(Y, 0.25, 0.2, 0)
    assert da.fingerprint == db.fingerprint and teacher_key(a, da) == teacher_key(a, db)
    assert _run_content_key(a) == _run_content_key(_run_cfg(tmp_path, plain))
    d = load_modality("digits/image", DataConfig())
    assert _lists(d.splits) == _old_make_splits(d.y.numpy(), 0.25, 0.2, 0)


def test_changed_splits_change_the_teacher_cache_and_run_keys(tmp_path):
    grouped = f"npz:{_write(tmp_path / 'grouped.npz', groups=GROUPS)}"
    auto, items = _run_cfg(tmp_path, grouped), _run_cfg(tmp_path, grouped, "items")
    da, di = load_modality(grouped, auto.data), load_modality(grouped, items.data)
    assert da.splits["val"].tolist() != di.splits["val"].tolist()
    assert da.fingerprint["content"] != di.fingerprint["content"]
    assert teacher_key(auto, da) != teacher_key(items, di)       # a teacher of this data: another cache entry
    assert run_key(auto) == run_key(_run_cfg(tmp_path, grouped, "auto"))
    ka, ki = _run_content_key(auto), _run_content_key(items)
    assert ka != ki and ka == _run_content_key(_run_cfg(tmp_path, grouped))
