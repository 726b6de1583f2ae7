"""Readers for the on-disk formats pnnh understands: IDX, CIFAR pickles, image folders.

Every reader returns numpy arrays (uint8 images, int64 labels) and raises
:class:`DatasetFormatError` naming the file and what is wrong with it, so a corrupt
download never turns into a silent shape bug three modules later.
"""
from __future__ import annotations

import gzip
import os
import pickle
import shutil
import tarfile
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

__all__ = [
    "DatasetFormatError",
    "IMAGE_EXTENSIONS",
    "read_idx",
    "read_idx_pair",
    "read_cifar_batch",
    "check_labels",
    "safe_extract_tar",
    "read_image_folder",
    "list_image_folder",
    "decode_image",
]


class DatasetFormatError(ValueError):
    """A dataset file exists but is not what its format promises."""


# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    """Whole file, transparently gunzipped when the name ends in .gz."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DatasetFormatError(f"{path}: not a valid gzip file ({err})") from err


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file (the MNIST format), gzipped or raw.

    Layout: two zero bytes, a type code, the number of dimensions, then one big-endian
    uint32 per dimension, then the data in C order.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DatasetFormatError(
            f"{path}: bad IDX magic number {raw[:4].hex() or '(empty file)'}; expected "
            f"00 00 <type in {sorted(hex(t) for t in _IDX_DTYPES)}> <ndim >= 1>")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "trailing bytes"
        raise DatasetFormatError(
            f"{path}: {what}: header says shape {dims} of {dtype.name} = {expected} bytes, "
            f"file holds {len(raw)}")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, H, W) uint8 and labels (N,) int64 from an IDX image/label file pair."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetFormatError(
            f"{images_path}: expected a 3-d uint8 image array, got shape {images.shape} {images.dtype}")
    if labels.ndim != 1:
        raise DatasetFormatError(f"{labels_path}: expected 1-d labels, got shape {labels.shape}")
    if len(images) != len(labels):
        raise DatasetFormatError(
            f"label/image count mismatch: {images_path} has {len(images)} images, "
            f"{labels_path} has {len(labels)} labels")
    return images[:, None], labels.astype(np.int64)


def check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    """Refuse labels outside 0..num_classes-1 now, not as an index error at the first loss."""
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DatasetFormatError(f"{path}: label {int(labels[i])} at index {i} is outside the {num_classes} classes "
                                 f"0..{num_classes - 1} ({int(bad.sum())} such labels)")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches without running arbitrary code from the file.

    The batches are dicts of bytes, lists and numpy arrays; those need only the handful
    of globals below. Anything else means the file is not a CIFAR batch (or is hostile).
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if module == "numpy.core.multiarray":  # written by numpy 1.x, moved in numpy 2
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def read_cifar_batch(path: str | os.PathLike, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR "python version" batch: images (N, 3, 32, 32) uint8, labels (N,) int64."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise DatasetFormatError(f"{path}: not a CIFAR python batch ({err})") from err
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DatasetFormatError(f"{path}: expected a dict with b'data' and {label_key!r}, got {keys}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetFormatError(f"{path}: b'data' must be uint8 (N, 3072), got {data.shape} {data.dtype}")
    if len(data) != len(labels):
        raise DatasetFormatError(
            f"label/image count mismatch in {path}: {len(data)} images, {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels


def safe_extract_tar(archive: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """Extract a .tar(.gz) into `dest`, refusing anything that could escape it.

    Members must be regular files or directories with relative paths that stay inside
    `dest` (no absolute paths, no '..', no links or devices). The archive is unpacked in
    a temporary directory inside `dest` first and its top-level entries are then moved
    into place with os.replace, so an interrupted extraction leaves no half-written
    dataset behind. Returns the top-level paths created.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                target = (root / m.name).resolve()
                if not (m.isfile() or m.isdir()):
                    raise DatasetFormatError(f"{archive}: refusing member {m.name!r} (not a regular file or directory)")
                inside = root in target.parents or (m.isdir() and target == root)  # "." or "./": dest itself
                if os.path.isabs(m.name) or not inside:
                    raise DatasetFormatError(f"{archive}: refusing member {m.name!r} (path escapes {dest})")
            tops = sorted({Path(m.name).parts[0] for m in members if Path(m.name).parts})
            clash = [str(dest / t) for t in tops if (dest / t).exists()]
            if clash:  # never overwrite what is there: it may be the user's
                raise FileExistsError(f"extracting {archive} would overwrite {clash}; move them away to re-extract")
            tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
            try:
                # tarfile's own "data" filter (Python >= 3.10.12) re-checks what we checked above
                safety = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, members=members, **safety)
                for top in tops:
                    os.replace(tmp / top, dest / top)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DatasetFormatError(f"{archive}: not a readable tar archive ({err})") from err
    return [dest / t for t in tops]


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")


def _load_image(path: Path, size: int) -> np.ndarray:
    """RGB (3, size, size) uint8: shorter side resized to `size`, then a center crop.

    Keeping the aspect ratio and cropping the center is what ImageNet-style evaluation
    does; stretching would distort objects differently per image.
    """
    im = decode_image(path, path)
    scale = size / min(im.size)
    w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
    im = im.resize((w, h), Image.Resampling.BILINEAR)
    left, top = (w - size) // 2, (h - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def decode_image(source: str | os.PathLike | IO[bytes], where: object) -> Image.Image:
    """The image in ``source`` (a path or a binary file) decoded as RGB.

    Raises DatasetFormatError naming ``where`` for bytes that are no image, and for an image
    declaring more pixels than Pillow's limit (a decompression bomb).
    """
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its pixel limit and twice it; a dataset image that large is refused
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                return im.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DatasetFormatError(f"{where}: refused, the image declares more pixels than Pillow's limit of "
                                 f"{Image.MAX_IMAGE_PIXELS} (a decompression bomb?): {err}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DatasetFormatError(f"{where}: cannot read image ({err})") from err


def read_image_folder(root: str | os.PathLike, size: int, classes: list[str] | None = None,
                      ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images from `root/<class>/<file>`: (N, 3, size, size) uint8, labels, class names
    (numbered as `list_image_folder` says)."""
    files, classes = list_image_folder(root, classes)
    images = np.empty((len(files), 3, size, size), np.uint8)
    for i, (path, _) in enumerate(tqdm(files, desc=f"reading {Path(root).name}", unit="img", leave=False)):
        images[i] = _load_image(path, size)
    return images, np.array([label for _, label in files], np.int64), classes


def list_image_folder(root: str | os.PathLike, classes: list[str] | None = None,
                      ) -> tuple[list[tuple[Path, int]], list[str]]:
    """(image path, label) pairs of `root/<class>/<file>`, sorted, and the class names.

    Classes are the sorted subfolder names unless `classes` is given (so a test split
    uses the train split's label numbering; a class folder unknown to it is an error).
    """
    root = Path(root)
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DatasetFormatError(f"{root}: class folders {unknown} are not among the train classes {classes}")
    files = [(p, label) for label, name in enumerate(classes) if (root / name).is_dir()
             for p in sorted((root / name).iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise DatasetFormatError(
            f"{root}: no images found; expected {root}/<class>/<image> with extensions {IMAGE_EXTENSIONS}")
    if classes is found:  # the train split defines the classes: an empty folder would be a class with no images
        labelled = {label for _, label in files}
        empty = [name for label, name in enumerate(classes) if label not in labelled]
        if empty:
            folder = root / empty[0]
            link = f" (a symlink to {os.readlink(folder)})" if folder.is_symlink() else ""
            raise DatasetFormatError(f"{folder}: class folder holds no images{link}; remove it or add images "
                                     f"with extensions {IMAGE_EXTENSIONS} ({len(empty)} such folder(s))")
    return files, classes
