"""Crash-safe files: atomic writes, checkpoints and the RNG state they carry.

A write goes to a temporary file in the target's directory, is fsynced, then renamed over
the target with ``os.replace`` (atomic on POSIX), so a kill at any instant leaves either the
old file or the new one, never a torn one. Checkpoints hold only tensors and plain data and
load with ``torch.load(weights_only=True)``: opening a checkpoint never runs foreign code.
"""
from __future__ import annotations

import contextlib
import os
import random
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np
import torch

TEMP_SUFFIX = ".tmp"
_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: os.umask can only be read by setting it


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(file)`` on a temporary file, then atomically move it to ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes owner-only files; give the usual permissions
    os.close(fd)  # reopened by name so the writer sees a file object with a real .name
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    atomic_write(path, lambda f: f.write(text.encode()))


def append_line(path: str | Path, line: str) -> None:
    """Append one line and fsync; a torn last line from a kill is repaired on resume."""
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete temporary files a killed ``atomic_write`` left in ``directory``; return them."""
    stale = [p for p in Path(directory).glob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink()
    return stale


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


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
