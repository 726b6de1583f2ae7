"""File and text helpers every layer of pnnh may use: atomic writes, JSON lines, CSV, tables.

A write goes to a temporary file in the target's directory, is fsynced, then renamed over
the target with ``os.replace`` (atomic on POSIX), so a kill at any instant leaves either the
old file or the new one, never a torn one. This module imports nothing else of pnnh.
"""
from __future__ import annotations

import contextlib
import csv
import importlib.metadata
import io
import json
import os
import pickle
import platform
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Sequence

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
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.strerror and err.filename is None:
            err.filename = str(path)  # a full disk's error names no file by itself
        raise
    _fsync_dir(path.parent)  # make the rename itself durable


def check_creatable_dir(path: str | Path) -> None:
    """Raise a one-line ``OSError`` unless ``path`` is a directory, or could be made one, that
    this process can write in. Creates nothing, so a command refused here leaves no trace."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        under = f" (so {path} cannot be made)" if existing != path else ""
        raise NotADirectoryError(f"{existing} is a file, not a directory{under}")
    try:  # permissions, a read-only mount and /proc all refuse at the first entry made
        os.rmdir(tempfile.mkdtemp(prefix=".pnnh-write-check-", dir=existing))
    except OSError as err:
        raise OSError(f"cannot create {path}: {err.strerror or err}") from None


class UnreadableTorchFile(ValueError):
    """A torch file that is truncated, of another format, or would run code when unpickled."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def load_torch_file(path: str | Path) -> Any:
    """``torch.load`` of ``path`` onto the CPU, refusing code: the one place pnnh unpickles a torch file
    (checkpoints, DISTS weights). ``weights_only=True`` refuses any pickle that would import or call
    code, so a planted file can do nothing but fail. Raises ``FileNotFoundError`` for a missing file
    and a one-line ``UnreadableTorchFile`` for any other failure."""
    import torch  # not at the top: the command line imports this module and must start fast

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a planted, truncated or foreign file fails in many ways; each means "not ours"
        raise UnreadableTorchFile(path, _load_failure(err)) from None


def _load_failure(err: Exception) -> str:
    """One line saying why ``torch.load`` refused a file (its own messages run over many lines)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if isinstance(err, pickle.UnpicklingError):
        wanted = next((line for line in lines if "global" in line.lower()), None)
        if wanted is not None:
            return f"refused to unpickle it ({wanted})"
        return "truncated or another format (not a torch pickle of tensors and plain data)"
    if isinstance(err, OSError):
        return f"truncated or another format ({err.strerror or err})"
    return f"truncated or another format ({lines[0].split('. ')[0] if lines else type(err).__name__})"


def os_error_line(err: OSError) -> str:
    """``err`` as one line naming the file, without Python's ``[Errno N]`` prefix."""
    if err.strerror and err.filename:
        return f"{err.filename}: {err.strerror}"
    return err.strerror or str(err)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    atomic_write(path, lambda f: f.write(text.encode()))


def write_csv(path: str | Path, rows: Sequence[dict], fields: Sequence[str] | None = None) -> None:
    """Atomically write ``rows`` as CSV with a header; ``fields`` (default: the first row's keys)
    picks and orders the columns, keys outside it are left out."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, list(fields if fields is not None else rows[0]), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_png(path: str | Path, fig: Any, dpi: int = 110, **savefig: Any) -> None:
    """Atomically save the matplotlib figure ``fig`` as a PNG (``savefig``: more ``fig.savefig`` options)."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi, **savefig))


def append_json_line(path: str | Path, record: dict) -> None:
    """Append ``record`` as one JSON line and fsync; a torn last line from a kill is the
    reader's to repair (the trainer rewrites its log from the checkpoint on resume)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        if err.strerror and err.filename is None:
            err.filename = str(path)  # a full disk's error names no file by itself
        raise


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete temporary files a killed ``atomic_write`` left in ``directory``; return them."""
    stale = [p for p in Path(directory).glob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink()
    return stale


def format_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A fixed-width text table: a header, a rule, one line per row (cells formatted by ``str``).

    ``align`` has one character per column, ``<`` (left) or ``>`` (right); default all left.
    """
    body = [[str(cell) for cell in row] for row in rows]
    align = align or "<" * len(header)
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]
    lines = ["  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(line, align, widths)).rstrip()
             for line in (header, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def versions() -> dict[str, Any]:
    """The software and machine a result was produced with, recorded beside every result."""
    import numpy
    import torch

    return {"pnnh": package_version(), "torch": str(torch.__version__), "numpy": numpy.__version__,
            "python": platform.python_version(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def package_version() -> str:
    """pnnh's version as installed (pyproject.toml is the one place it is written)."""
    try:
        return importlib.metadata.version("pnnh")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
