"""Checkpoints and the RNG state they carry.

A checkpoint is written atomically (``pnnh.io.atomic_write``), so a kill at any instant leaves
either the old file or the new one. Checkpoints hold only tensors and plain data and load with
``torch.load(weights_only=True)``: opening a checkpoint never runs foreign code.
"""
from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pnnh.io import UnreadableTorchFile, atomic_write, load_torch_file
from pnnh.train.config import ConfigError


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically ``torch.save`` ``state`` to ``path``.

    Serialised in memory first: torch's zip writer reports a failed write (a full disk) as an
    opaque RuntimeError, a plain write of the bytes keeps the OSError that says what happened."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


class CheckpointError(ConfigError):
    """A file given as a checkpoint is missing, unreadable, or not one pnnh wrote."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint saved by ``save_checkpoint`` onto the CPU (tensors and plain data only).

    The one way pnnh opens a checkpoint (resume, export, probe, guide, sweep, ``pnnh.load``), through
    ``pnnh.io.load_torch_file`` (``weights_only=True``: a planted file can do nothing but fail).
    Every failure is a one-line ``CheckpointError`` naming the file.
    """
    try:
        state = load_torch_file(path)
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint {err}") from None
    except UnreadableTorchFile as err:
        raise CheckpointError(f"{path} is not a pnnh checkpoint: {err.reason}") from None
    if not isinstance(state, dict) or "model" not in state:
        found = sorted(map(str, state))[:5] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a pnnh checkpoint: expected a dict with a 'model' entry, found {found}")
    return state


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

