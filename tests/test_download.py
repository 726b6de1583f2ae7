"""The downloader against a real HTTP server on 127.0.0.1 serving real files."""
from __future__ import annotations

import functools
import hashlib
import shutil
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from pnnh.cli import main
from pnnh.data import ChecksumError, DownloadError, download, load_dataset
from pnnh.data.download import SHA256
from datafiles import FASHION_FILES, tar_gz, write_cifar10

# Debian's dataset-fashion-mnist ships the official images and labels, but re-gzipped
# (no file name in the gzip header: each file is 23-24 bytes shorter than the official
# one), so its archives have their own digests. Served here, they stand in for a mirror.
DEBIAN_FASHION_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
LABELS = "t10k-labels-idx1-ubyte.gz"


class Server:
    """A ThreadingHTTPServer on a random loopback port serving `root`, logging request paths.

    Paths listed in `cut_short` are answered with the file's full Content-Length but
    only its first half, as when a connection drops mid-transfer.
    """

    def __init__(self, root: Path):
        self.root, self.requests, self.cut_short = root, [], set()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                if self.path in server.cut_short:
                    body = (server.root / self.path.lstrip("/")).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def served(tmp_path, fashion_dir):
    """Debian's Fashion-MNIST files served from a temporary directory."""
    root = tmp_path / "www"
    root.mkdir()
    for f in FASHION_FILES:
        shutil.copy(fashion_dir / f, root / f)
    with Server(root) as server:
        yield server


def test_good_download_then_load(served, tmp_path):
    target = download("fashion-mnist", tmp_path / "data", base_url=served.url, digests=DEBIAN_FASHION_SHA256,
                      progress=False)
    assert target == tmp_path / "data" / "fashion-mnist"
    assert sorted(p.name for p in target.iterdir()) == sorted(FASHION_FILES)  # no temporary files left
    for f in FASHION_FILES:
        assert (target / f).read_bytes() == (served.root / f).read_bytes()
    assert sorted(served.requests) == sorted(f"/{f}" for f in FASHION_FILES)
    s = load_dataset("fashion-mnist", data_dir=tmp_path / "data")
    assert s.train_x.shape == (60000, 1, 28, 28) and s.test_y.bincount().tolist() == [1000] * 10


def test_official_table_rejects_the_repacked_files(served, tmp_path):
    """The default digests are the official archives', which Debian's repack is not."""
    assert set(SHA256["fashion-mnist"]) == set(DEBIAN_FASHION_SHA256)
    with pytest.raises(ChecksumError, match="SHA-256 mismatch, expected 3aede38d"):
        download("fashion-mnist", tmp_path / "data", base_url=served.url, progress=False)
    assert not (tmp_path / "data" / "fashion-mnist").exists()


def test_corrupted_file_is_rejected_and_nothing_left(served, tmp_path):
    body = bytearray((served.root / LABELS).read_bytes())
    body[100] ^= 0xFF
    (served.root / LABELS).write_bytes(bytes(body))
    target = tmp_path / "data" / "fashion-mnist"
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")  # a user's file must survive a failed download
    with pytest.raises(ChecksumError, match=f"{LABELS}: SHA-256 mismatch"):
        download("fashion-mnist", tmp_path / "data", base_url=served.url,
                 digests={LABELS: DEBIAN_FASHION_SHA256[LABELS]}, progress=False)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("how", ["connection dropped", "short file"])
def test_truncated_file_is_rejected_and_nothing_left(served, tmp_path, how):
    if how == "connection dropped":
        served.cut_short.add(f"/{LABELS}")
        error, message = DownloadError, "truncated, received 2562 of 5125 bytes"
    else:
        body = (served.root / LABELS).read_bytes()
        (served.root / LABELS).write_bytes(body[: len(body) // 2])
        error, message = ChecksumError, "SHA-256 mismatch"
    with pytest.raises(error, match=message):
        download("fashion-mnist", tmp_path / "data", base_url=served.url,
                 digests={LABELS: DEBIAN_FASHION_SHA256[LABELS]}, progress=False)
    assert not (tmp_path / "data").exists()  # no directory left that the download made


def test_http_404(served, tmp_path):
    with pytest.raises(DownloadError, match=r"/missing.gz: HTTP 404"):
        download("fashion-mnist", tmp_path / "data", base_url=served.url, digests={"missing.gz": "0" * 64},
                 progress=False)
    assert not (tmp_path / "data").exists()  # no directory left that the download made


def test_cli_download_without_network_is_one_line_and_leaves_no_directory(tmp_path, capsys):
    """Nothing listens on the port: the same error a machine without network gets, exit 2."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the download tries it
    root = tmp_path / "a" / "b"
    assert main(["data", "download", "mnist", "--data-dir", str(root), "--base-url", f"http://127.0.0.1:{port}/"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pnnh data: error: http://127.0.0.1:") and "Connection refused" in err
    assert err.count("\n") == 1 and not (tmp_path / "a").exists()


def test_verified_file_is_not_downloaded_again(served, tmp_path):
    digests = {LABELS: DEBIAN_FASHION_SHA256[LABELS]}
    kw = dict(base_url=served.url, digests=digests, progress=False)
    target = download("fashion-mnist", tmp_path, **kw)
    assert served.requests == [f"/{LABELS}"]
    download("fashion-mnist", tmp_path, **kw)
    assert served.requests == [f"/{LABELS}"]
    (target / LABELS).write_bytes(b"damaged")  # a damaged local copy is replaced
    download("fashion-mnist", tmp_path, **kw)
    assert len(served.requests) == 2
    assert hashlib.sha256((target / LABELS).read_bytes()).hexdigest() == digests[LABELS]


def test_base_url_from_environment_with_name_placeholder(served, tmp_path, monkeypatch):
    (served.root / "fashion-mnist").mkdir()
    shutil.copy(served.root / LABELS, served.root / "fashion-mnist" / LABELS)
    monkeypatch.setenv("PNNH_DOWNLOAD_BASE_URL", served.url + "/{name}/")
    download("fashion-mnist", tmp_path, digests={LABELS: DEBIAN_FASHION_SHA256[LABELS]}, progress=False)
    assert served.requests == [f"/fashion-mnist/{LABELS}"]


def test_load_dataset_download_uses_official_table_and_data_dir(served, tmp_path, monkeypatch):
    """download=True fetches the official file list into data_dir/<name> and verifies it."""
    (served.root / "mnist").mkdir()
    for f in FASHION_FILES:  # a "mirror" that serves the wrong dataset
        shutil.copy(served.root / f, served.root / "mnist" / f)
    monkeypatch.setenv("PNNH_DOWNLOAD_BASE_URL", served.url + "/{name}")
    with pytest.raises(ChecksumError, match="mnist/train-images-idx3-ubyte.gz: SHA-256 mismatch, expected 440fcabf"):
        load_dataset("mnist", data_dir=tmp_path / "data", download=True)
    assert served.requests == ["/mnist/train-images-idx3-ubyte.gz"]
    assert not (tmp_path / "data").exists()  # no directory left that the download made


def test_cifar_archive_download_and_extract(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    batches = write_cifar10(tmp_path / "src")
    archive = tar_gz(batches, www / "cifar-10-python.tar.gz")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    with Server(www) as server:
        target = download("cifar10", tmp_path / "data", base_url=server.url,
                          digests={archive.name: digest}, progress=False)
    s = load_dataset("cifar10", data_dir=tmp_path / "data")
    assert s.train_x.shape == (30, 3, 32, 32)
    assert sorted(p.name for p in target.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert torch.equal(s.test_x, load_dataset("cifar10", data_dir=tmp_path / "src").test_x)
