"""Writers of the real on-disk dataset formats (IDX, CIFAR pickles, tar.gz) for the data and
download tests, and where Debian's Fashion-MNIST lives."""
from __future__ import annotations

import gzip
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np

FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file: 00 00 <type> <ndim>, big-endian dims, big-endian data."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + np.array(array.shape, ">u4").tobytes()
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def fashion_with_bad_label(fashion_dir: Path, root: Path, index: int, label: int) -> Path:
    """``root/fashion-mnist``: Debian's files linked in, except test labels all 0 but ``label`` at ``index``."""
    d = root / "fashion-mnist"
    d.mkdir()
    for f in FASHION_FILES[:3]:
        (d / f).symlink_to(fashion_dir / f)
    labels = np.zeros(10000, np.uint8)
    labels[index] = label
    write_idx(d / "t10k-labels-idx1-ubyte", labels)
    return d


def cifar_arrays(n: int, num_classes: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, num_classes, n).tolist()


def write_cifar10(root: Path, per_batch: int = 6, n_test: int = 8) -> Path:
    """cifar-10-batches-py as the real "python version": pickled dicts with bytes keys."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data, labels = cifar_arrays(n_test if name == "test_batch" else per_batch, 10, i)
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img{j}.png".encode() for j in range(len(labels))]}
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c%d" % k for k in range(10)]}, protocol=2))
    return d


def write_cifar100(root: Path) -> Path:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for i, name in enumerate(["train", "test"]):
        data, fine = cifar_arrays(30 if name == "train" else 10, 100, 10 + i)
        coarse = [f // 5 for f in fine]
        (d / name).write_bytes(pickle.dumps({b"data": data, b"fine_labels": fine, b"coarse_labels": coarse},
                                            protocol=2))
    return d


def tar_gz(src_dir: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src_dir, arcname=src_dir.name)
    return archive


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels while its data is a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))
