"""Suite-wide setup. The tests live in unit/, methods/ and integration/; the modules they share
(helpers, references, paper_reference, distributed_workers, ot_bits_cases) live in support/,
put on sys.path here so that every test imports them by name (``import references as ref``)."""
import os
import sys
from pathlib import Path

import pytest
import torch

SUPPORT = Path(__file__).resolve().parent / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))

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
