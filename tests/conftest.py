"""Fixtures shared by the test modules: Debian's Fashion-MNIST and an isolated data environment."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# No test reaches the Hugging Face Hub: huggingface_hub reads this once, when pnnh imports it.
os.environ["HF_HUB_OFFLINE"] = "1"

from datafiles import FASHION, FASHION_FILES  # noqa: E402
from pnnh.data import load_dataset  # noqa: E402


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    """Debian's Fashion-MNIST; a failure on CI, a skip elsewhere, when it is missing."""
    missing = [f for f in FASHION_FILES if not (FASHION / f).is_file()]
    if missing:
        msg = f"Fashion-MNIST files {missing} missing in {FASHION}: apt-get install dataset-fashion-mnist"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return FASHION


@pytest.fixture(scope="session")
def fashion(fashion_dir):
    return load_dataset("fashion-mnist", data_dir=fashion_dir)


@pytest.fixture(scope="session", autouse=True)
def layout_cache(tmp_path_factory):
    """One measured-layout cache (pnnh.train.speed) for the session, outside the user's home:
    each CNN shape the tests train is timed once, not once per test."""
    os.environ["PNNH_LAYOUT_CACHE"] = str(tmp_path_factory.mktemp("layout") / "layout.json")
    yield Path(os.environ["PNNH_LAYOUT_CACHE"])
    del os.environ["PNNH_LAYOUT_CACHE"]


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """A user's $PNNH_DATA or download cache must not change what these tests find."""
    monkeypatch.delenv("PNNH_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    The machine has two shared cores: several multi-threaded torch processes (a test's training
    subprocesses, torchrun workers) oversubscribe it and slow every step many-fold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
