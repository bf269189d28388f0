"""A dataset's options key only the runs that use it; paths key nothing; user datasets declare
typed options (``register_dataset(options=...)``) validated like every config section."""
from dataclasses import dataclass

import numpy as np
import pytest

from ucmkd.api import run_key
from ucmkd.config import RunConfig, from_dict, ranged
from ucmkd.data import RawModality, load_modality, register_dataset
from ucmkd.data.base import DATASET_OPTIONS, DATASET_READS, DATASETS, dataset_options
from ucmkd.errors import ConfigError

DIGITS = {"teacher": "digits/image", "student": "digits/signal"}


def key(**data) -> str:
    return run_key(from_dict(RunConfig, {"data": data}))


def test_an_unused_datasets_option_leaves_the_key_and_a_used_one_changes_it():
    base = key(**DIGITS)
    assert key(**DIGITS, spoken={"n_mels": 40}) == base            # the spoken digits are not used
    assert key(**DIGITS, synthetic={"noise": 0.9}, av={"frames": 3}) == base
    assert key(**DIGITS, mnist1d_samples=2000) != base              # digits/signal reads it
    spoken = {"teacher": "digits/image", "student": "spoken-digits/audio"}
    assert key(**spoken, spoken={"n_mels": 40}) != key(**spoken)
    assert key(**spoken, mnist1d_samples=2000) == key(**spoken)      # digits/signal not used


def test_paths_key_nothing_and_the_default_config_keeps_its_published_key():
    base = key(**DIGITS)
    assert key(**DIGITS, cache_dir="/elsewhere", roots={"ravdess": "/data/ravdess"}) == base
    assert base == "5b269cb990"      # the key of the default config before this change (stores stay valid)


@dataclass
class ToyOptions:
    n_items: int = ranged(60, 6)
    shift: float = 0.0


@pytest.fixture
def toy():
    """A user dataset family 'toyopt' with typed options (removed again afterwards)."""
    names = ["toyopt/a", "toyopt/b"]

    def build(cfg, view):
        o = dataset_options(cfg, f"toyopt/{view}")
        rng = np.random.default_rng(0 if view == "a" else 1)
        y = np.arange(o.n_items) % 3
        x = (rng.normal(size=(o.n_items, 4)) + y[:, None] + o.shift).astype(np.float32)
        return RawModality(x=x, y=y, classes=["p", "q", "r"], kind="vector", source=f"toyopt/{view}")

    for n in names:
        register_dataset(n, options=ToyOptions)(lambda cfg, v=n[-1]: build(cfg, v))
    yield {"teacher": "toyopt/a", "student": "toyopt/b"}
    for n in names:
        DATASETS._items.pop(n)
        DATASET_READS.pop(n)
    DATASET_OPTIONS.pop("toyopt")


def test_user_dataset_options_are_typed_validated_and_key_only_their_runs(toy):
    cfg = from_dict(RunConfig, {"data": {**toy, "options": {"toyopt": {"n_items": 30}}}}).data
    assert len(load_modality("toyopt/b", cfg).y) == 30
    assert key(**toy, options={"toyopt": {"n_items": 30}}) != key(**toy)
    assert key(**toy, spoken={"n_mels": 40}) == key(**toy)                 # declared: reads no section
    assert key(**DIGITS, options={"toyopt": {"n_items": 30}}) == key(**DIGITS)   # not used by digits runs
    bad = from_dict(RunConfig, {"data": {**toy, "options": {"toyopt": {"n_items": 2}}}}).data
    with pytest.raises(ConfigError, match=r"data\.options\.toyopt\.n_items: expected a value >= 6, got 2"):
        load_modality("toyopt/a", bad)
    typo = from_dict(RunConfig, {"data": {**toy, "options": {"toyopt": {"n_itemz": 2}}}}).data
    with pytest.raises(ConfigError, match=r"unknown field 'data\.options\.toyopt\.n_itemz'"):
        load_modality("toyopt/a", typo)
    unknown = from_dict(RunConfig, {"data": {**toy, "options": {"nosuch": {}}}}).data
    with pytest.raises(ConfigError, match=r"data\.options\.nosuch: no registered dataset family 'nosuch'"):
        load_modality("toyopt/a", unknown)


def test_an_undeclared_user_dataset_keeps_every_section_in_its_key():
    """A builder registered without ``reads`` may read any section: nothing is left out."""
    register_dataset("undeclared/x")(lambda cfg: None)
    try:
        data = {"teacher": "digits/image", "student": "undeclared/x"}
        assert key(**data, spoken={"n_mels": 40}) != key(**data)
    finally:
        DATASETS._items.pop("undeclared/x")
        DATASET_READS.pop("undeclared/x")
