"""Downloader for the public datasets: SHA-256 verified, atomic, skips verified files.

A file is streamed into a hidden temporary file beside its final place, hashed while
it arrives, checked against the known digest (and the announced length), and only
then moved into place with os.replace. Whatever goes wrong -- HTTP error, dropped
connection, wrong bytes, Ctrl-C -- the temporary file is removed and the target
directory is left as it was.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

__all__ = ["DownloadError", "ChecksumError", "DEFAULT_BASE_URLS", "SHA256", "BASE_URL_ENV",
           "download", "fetch", "sha256_file"]

BASE_URL_ENV = "PNNH_DOWNLOAD_BASE_URL"

# The official distribution points. MNIST's original host (yann.lecun.com) is often
# unreachable; the PyTorch mirror serves byte-identical files (same digests).
DEFAULT_BASE_URLS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
    "cifar100": "https://www.cs.toronto.edu/~kriz/",
}

# SHA-256 of the official files (the same files whose MD5s the dataset authors publish).
SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
    "cifar10": {
        "cifar-10-python.tar.gz": "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
    },
    "cifar100": {
        "cifar-100-python.tar.gz": "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
    },
}

_CHUNK = 1 << 20


class DownloadError(OSError):
    """A file could not be fetched completely (HTTP error, connection, truncation)."""


class ChecksumError(DownloadError):
    """A fetched file's SHA-256 differs from the known digest."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _stream(url: str, out, label: str, progress: bool, timeout: float):
    """Copy the body of `url` into `out`; return (sha256 object, bytes received, announced length)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length is not None else None
        h, received = hashlib.sha256(), 0
        with tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                  disable=not progress, leave=False) as bar:
            for block in iter(lambda: response.read(_CHUNK), b""):
                out.write(block)
                h.update(block)
                received += len(block)
                bar.update(len(block))
    return h, received, total


def fetch(url: str, dest: str | os.PathLike, sha256: str, *, progress: bool = True,
          timeout: float = 60.0) -> bool:
    """Download `url` to `dest` unless `dest` already has digest `sha256`.

    Returns True when a download happened, False when the verified file was kept.
    An existing file with the wrong digest is replaced (it can only be a damaged copy).
    Raises DownloadError / ChecksumError, leaving `dest` untouched and no temp file.
    """
    dest, sha256 = Path(dest), sha256.lower()
    if dest.is_file() and sha256_file(dest) == sha256:
        return False
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                h, received, total = _stream(url, out, dest.name, progress, timeout)
            except urllib.error.HTTPError as err:
                raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from err
            except (OSError, http.client.HTTPException) as err:
                why = getattr(err, "reason", None) or getattr(err, "strerror", None) or repr(err)
                raise DownloadError(f"{url}: {why} (no network? {BASE_URL_ENV} or --base-url names a mirror)") from err
            # http.client returns a short body without complaint when the peer hangs up.
            if total is not None and received != total:
                raise DownloadError(f"{url}: truncated, received {received} of {total} bytes")
            if h.hexdigest() != sha256:
                raise ChecksumError(f"{url}: SHA-256 mismatch, expected {sha256}, got {h.hexdigest()} "
                                    f"({received} bytes); the file was discarded")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a dataset is meant to be readable by all
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def download(name: str, root: str | os.PathLike, *, base_url: str | None = None,
             digests: dict[str, str] | None = None, progress: bool = True,
             timeout: float = 60.0) -> Path:
    """Fetch the files of dataset `name` into `root/<name>/` and return that directory.

    base_url: where the files live; default ``$PNNH_DOWNLOAD_BASE_URL`` or the official
        mirror. A ``{name}`` in it is replaced by the dataset name, so one mirror
        variable can serve every dataset (``http://mirror/{name}/``).
    digests: {file name: sha256} to fetch and verify; default the official table
        `SHA256[name]`. Pass your own for a private mirror with different files.
    Files already present with the right digest are not downloaded again.
    """
    if name not in SHA256:
        raise ValueError(f"no downloader for dataset {name!r}; downloadable: {sorted(SHA256)}")
    base = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URLS[name]
    base = base.replace("{name}", name).rstrip("/") + "/"
    digests = SHA256[name] if digests is None else digests
    target = Path(root) / name
    created = [d for d in (target, *target.parents) if not d.exists()]  # deepest first
    target.mkdir(parents=True, exist_ok=True)
    try:
        for filename, digest in digests.items():
            fetch(base + filename, target / filename, digest, progress=progress, timeout=timeout)
    except BaseException:
        for d in created:  # a failed download leaves no directory behind that it made
            if any(d.iterdir()):
                break
            d.rmdir()
        raise
    return target
