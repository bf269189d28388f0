import os

import pytest
import torch

torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: an end-to-end run of a second or more (the fast tests alone: "
                                       "pytest -m 'not slow')")
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped elsewhere (benchmarks/gpu_check.py runs them)")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test uses a private cache dir unless it sets its own (never ~/.cache)."""
    if "UCMKD_CACHE" not in os.environ:
        monkeypatch.setenv("UCMKD_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
