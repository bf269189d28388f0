"""Atomic, full-state checkpoints."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..cache import save_torch
from ..errors import DataError


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically (:func:`ucmkd.cache.save_torch`)."""
    save_torch(state, path)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint; a missing or unreadable file raises :class:`DataError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None


def rng_state() -> dict:
    """The process's random generators: torch (CPU, and every CUDA device once CUDA is in use),
    NumPy's and Python's global ones."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": cuda}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def apply_threads(threads) -> None:
    """The run's ``threads`` setting: torch's intra-op thread count for this process (None: leave
    torch's default, one per core, or what the caller set, e.g. a grid worker's 1). Every path
    that trains applies it where a run is prepared (:func:`ucmkd.api.prepare`, the teacher
    cache, ``diagnose``); :meth:`ucmkd.engine.Trainer.runtime` records what a run trained with."""
    if threads:
        torch.set_num_threads(int(threads))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
