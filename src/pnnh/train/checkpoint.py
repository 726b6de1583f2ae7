"""Checkpoints and the RNG state they carry.

A checkpoint is written atomically (``pnnh.io.atomic_write``), so a kill at any instant leaves
either the old file or the new one. Checkpoints hold only tensors and plain data and load with
``torch.load(weights_only=True)``: opening a checkpoint never runs foreign code.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pnnh.io import atomic_write


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically ``torch.save`` ``state`` to ``path``."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint saved by ``save_checkpoint`` onto the CPU (tensors and plain data only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def run_checkpoint(run_dir: str | Path, names: tuple[str, ...] = ("best.pt", "last.pt")) -> Path | None:
    """The first of ``names`` that is a file in the run directory ``run_dir``, or None."""
    return next((Path(run_dir) / n for n in names if (Path(run_dir) / n).is_file()), None)


def rng_state() -> dict[str, Any]:
    """Every global RNG state a training step may draw from: Python, NumPy, torch CPU and CUDA."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {**np_state, "state": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                                       "pos": np_state["state"]["pos"]}},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by ``rng_state`` (CUDA states only for devices present)."""
    random.setstate(_as_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state({**np_state, "state": {"key": np_state["state"]["key"].numpy().astype(np.uint32),
                                               "pos": np_state["state"]["pos"]}})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def _as_tuples(value: Any) -> Any:
    # random.setstate wants tuples; a round trip through some serialisers yields lists
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value

