"""Datasets as uint8 tensors: find them on disk, split, subset, resize, describe.

Every dataset ends up as a :class:`DataSplits` of CPU uint8 image tensors (N, C, H, W)
and int64 labels, small enough to live on the device whole (see `TensorLoader`).

Where files are looked for, for a dataset called NAME: an explicit ``data_dir`` is the
only place searched (``data_dir/NAME``, then ``data_dir``): a path the user names is used
or the load fails, never silently replaced by another copy. Without one, the first
complete match of ``$PNNH_DATA/NAME``, ``$PNNH_DATA``, the download cache
``$XDG_CACHE_HOME/pnnh/data/NAME`` (default ``~/.cache/pnnh/data/NAME``) and, for
fashion-mnist, Debian's ``/usr/share/datasets/fashion-mnist`` wins. With ``download=True``
a dataset found nowhere is downloaded into the first of ``data_dir``, ``$PNNH_DATA``, the
cache (in its ``NAME`` subfolder).
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import download as dl
from .formats import check_labels, read_cifar_batch, read_idx_pair, read_image_folder, safe_extract_tar

__all__ = ["DataSplits", "DatasetNotFoundError", "list_datasets", "load_dataset",
           "balanced_indices", "split_indices", "folder_splits", "default_cache_dir", "DATA_ENV"]

DATA_ENV = "PNNH_DATA"
_FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are in none of the places searched."""


@dataclass(repr=False)
class DataSplits:
    """A dataset held in memory: uint8 images (N, C, H, W) and int64 labels, on CPU.

    mean/std are per channel in pixel/255 units, computed on `train_x` (after the
    validation split and subsetting). `hflip` says whether a horizontal flip keeps the
    label meaning (not for digits: a mirrored 3 is no digit).
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None

    @property
    def in_chans(self) -> int:
        return self.train_x.shape[1]

    @property
    def img_size(self) -> int:
        return self.train_x.shape[2]

    def __repr__(self) -> str:
        val = f", val={len(self.val_x)}" if self.val_x is not None else ""
        return (f"DataSplits({self.name!r}, train={len(self.train_x)}{val}, test={len(self.test_x)}, "
                f"shape={tuple(self.train_x.shape[1:])}, classes={self.num_classes})")


@dataclass(frozen=True)
class _Raw:
    """What a reader returns: numpy arrays before splitting and resizing."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int


def default_cache_dir() -> Path:
    """Where downloads go when neither data_dir nor $PNNH_DATA is given."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "pnnh" / "data"


def _roots(data_dir: str | os.PathLike | None) -> list[Path]:
    """The user-chosen data root: ``data_dir`` when given, else ``$PNNH_DATA`` if set."""
    root = data_dir or os.environ.get(DATA_ENV)
    return [Path(root).expanduser()] if root else []


def _candidates(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    dirs = [d for root in _roots(data_dir) for d in (root / name, root)]
    if data_dir:  # an explicit path is used or fails: no fallback to another copy
        return dirs
    dirs.append(default_cache_dir() / name)
    if name == "fashion-mnist":
        dirs.append(_FASHION_SYSTEM_DIR)
    return dirs


def _how_to_get(name: str, data_dir) -> str:
    ways = []
    if data_dir:  # only that directory was searched
        ways.append(f"put the files in {data_dir}, or leave out --data-dir to search the places pnnh knows")
    else:
        if name == "fashion-mnist":
            ways.append("install Debian's package: `apt-get install dataset-fashion-mnist`")
        ways.append(f"pass `--data-dir DIR` (data_dir=DIR) or set ${DATA_ENV}=DIR to a directory holding the files")
    if name in dl.SHA256:
        ways.append(f"pass `--download` (download=True) to fetch them from {dl.DEFAULT_BASE_URLS[name]} "
                    f"(or a mirror set in ${dl.BASE_URL_ENV})")
    return "; or ".join(ways)


def _locate(name: str, data_dir, download: bool, describe: str,
            resolve: Callable[[Path], Path | None]) -> Path:
    """First candidate directory that `resolve` accepts, downloading if allowed.

    `resolve(dir)` returns the directory holding the dataset's files (maybe a
    subfolder, maybe after extracting an archive), or None.
    """
    searched = _candidates(name, data_dir)
    for d in searched:
        if d.is_dir() and (found := resolve(d)) is not None:
            return found
    if download:
        root = (_roots(data_dir) or [default_cache_dir()])[0]
        found = resolve(dl.download(name, root))
        if found is not None:
            return found
    places = ", ".join(str(d) for d in searched)
    given = Path(data_dir).expanduser() if data_dir else None
    if given is not None and not given.is_dir():
        fetch = "; pass --download to fetch the dataset into it" if name in dl.SHA256 else ""
        what = "is not a directory" if given.exists() else "does not exist"
        raise DatasetNotFoundError(f"dataset {name!r} not found: data_dir {given} {what}{fetch}")
    raise DatasetNotFoundError(f"dataset {name!r} not found: needs {describe}; looked in {places}; "
                               f"to get it: {_how_to_get(name, data_dir)}")


# --- readers -------------------------------------------------------------------------

_IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_file(d: Path, stem: str) -> Path | None:
    for p in (d / stem, d / f"{stem}.gz"):
        if p.is_file():
            return p
    return None


def _read_idx_dataset(name: str, data_dir, download: bool, **_) -> _Raw:
    def resolve(d: Path) -> Path | None:
        return d if all(_idx_file(d, s) for s in _IDX_STEMS) else None

    d = _locate(name, data_dir, download, "the four IDX files " + ", ".join(f"{s}[.gz]" for s in _IDX_STEMS),
                resolve)
    train_x, train_y = read_idx_pair(_idx_file(d, _IDX_STEMS[0]), _idx_file(d, _IDX_STEMS[1]))
    test_x, test_y = read_idx_pair(_idx_file(d, _IDX_STEMS[2]), _idx_file(d, _IDX_STEMS[3]))
    check_labels(train_y, 10, _idx_file(d, _IDX_STEMS[1]))
    check_labels(test_y, 10, _idx_file(d, _IDX_STEMS[3]))
    return _Raw(train_x, train_y, test_x, test_y, 10)


_CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    label_key=b"labels", num_classes=10),
    "cifar100": dict(folder="cifar-100-python", archive="cifar-100-python.tar.gz",
                     train=["train"], test=["test"], label_key=b"fine_labels", num_classes=100),
}


def _read_cifar(name: str, data_dir, download: bool, **_) -> _Raw:
    spec = _CIFAR[name]
    files = spec["train"] + spec["test"]

    def resolve(d: Path) -> Path | None:
        for batches in (d, d / spec["folder"]):
            if all((batches / f).is_file() for f in files):
                return batches
        if (d / spec["archive"]).is_file():
            safe_extract_tar(d / spec["archive"], d)
            return d / spec["folder"] if all((d / spec["folder"] / f).is_file() for f in files) else None
        return None

    d = _locate(name, data_dir, download,
                f"{spec['folder']}/{{{','.join(files)}}} or the archive {spec['archive']}", resolve)

    def read(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        parts = [read_cifar_batch(d / f, spec["label_key"]) for f in names]
        for f, (_, labels) in zip(names, parts):
            check_labels(labels, spec["num_classes"], d / f)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    return _Raw(*read(spec["train"]), *read(spec["test"]), spec["num_classes"])


def folder_splits(data_dir: str | os.PathLike | None) -> tuple[Path, Path]:
    """(train, val or test) directories of the `folder` dataset in ``data_dir`` (or ``$PNNH_DATA``)."""
    roots = _roots(data_dir)
    layout = "train/<class>/<image> and val/<class>/<image> (or test/)"
    for root in roots:
        test_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
        if (root / "train").is_dir() and test_dir is not None:
            return root / "train", test_dir
    places = ", ".join(map(str, roots)) or f"nothing (no data_dir given and ${DATA_ENV} unset)"
    raise DatasetNotFoundError(f"dataset 'folder' needs a data_dir holding {layout}; looked in: {places}")


def _read_folder(name: str, data_dir, download: bool, img_size: int | None, **_) -> _Raw:
    train_dir, test_dir = folder_splits(data_dir)
    size = img_size or 32
    train_x, train_y, classes = read_image_folder(train_dir, size)
    test_x, test_y, _ = read_image_folder(test_dir, size, classes)
    return _Raw(train_x, train_y, test_x, test_y, len(classes))


# One fixed split for every run, so test accuracies are comparable across seeds.
_DIGITS_SPLIT_SEED = 0


def _read_digits(name: str, **_) -> _Raw:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # sklearn's pixels are 0..16 ink counts; scale to the 0..255 range of every other dataset.
    x = np.round(digits.images * (255 / 16)).astype(np.uint8)[:, None]
    y = digits.target.astype(np.int64)
    train, test = quarter_test_split(y)
    return _Raw(x[train], y[train], x[test], y[test], 10)


def quarter_test_split(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices for data without a published split: a fixed class-balanced quarter
    is the test set, the same for every seed."""
    test = balanced_indices(y, round(len(y) / 4), np.random.default_rng(_DIGITS_SPLIT_SEED))
    return np.setdiff1d(np.arange(len(y)), test), test


def _read_synthetic(name: str, seed: int, synthetic_shape: tuple[int, int, int], synthetic_size: int,
                    num_classes: int | None, **_) -> _Raw:
    if len(synthetic_shape) != 3 or min(synthetic_shape) < 1 or synthetic_size < 1:
        raise ValueError(f"synthetic_shape must be (C, H, W) of positive ints and synthetic_size >= 1, "
                         f"got {synthetic_shape}, {synthetic_size}")
    k = num_classes or 10
    rng = np.random.default_rng([seed, 99])
    n_test = max(1, synthetic_size // 4)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.integers(0, 256, (n, *synthetic_shape), dtype=np.uint8), rng.integers(0, k, n)

    return _Raw(*draw(synthetic_size), *draw(n_test), k)


# name -> (reader, horizontal flip keeps the label)
_DATASETS: dict[str, tuple[Callable[..., _Raw], bool]] = {
    "fashion-mnist": (_read_idx_dataset, True),
    "mnist": (_read_idx_dataset, False),
    "cifar10": (_read_cifar, True),
    "cifar100": (_read_cifar, True),
    "folder": (_read_folder, True),
    "digits": (_read_digits, False),
    "synthetic": (_read_synthetic, True),
}


def list_datasets() -> list[str]:
    """Names accepted by `load_dataset`."""
    return list(_DATASETS)


# --- splitting and preprocessing -----------------------------------------------------

def balanced_indices(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of `n` samples with classes as equal in count as the data allows.

    Classes are filled smallest first; a class too small for its share gives all it
    has and the rest is spread over the larger ones.
    """
    if not 0 < n <= len(y):
        raise ValueError(f"cannot take {n} samples from {len(y)}; need 0 < n <= {len(y)}")
    classes, counts = np.unique(y, return_counts=True)
    order = np.argsort(counts, kind="stable")
    remaining, picked = n, []
    for i, k in enumerate(order):
        quota = min(int(counts[k]), remaining // (len(order) - i))
        remaining -= quota
        picked.append(rng.permutation(np.flatnonzero(y == classes[k]))[:quota])
    return np.sort(np.concatenate(picked))


def _resize(x: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Bilinear resize of uint8 images to size x size, kept uint8 (antialiased when shrinking)."""
    if x.shape[2] == size and x.shape[3] == size:
        return x
    shrink = size < max(x.shape[2:])
    out = [F.interpolate(c.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
           .round_().clamp_(0, 255).to(torch.uint8) for c in x.split(chunk)]
    return torch.cat(out)


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std in pixel/255 units, from a histogram of the uint8 values.

    A histogram needs no float copy of the dataset (60000x784 floats would be 376 MB).
    """
    v = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(x.shape[1]):
        hist = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        n = hist.sum()
        mean = (hist * v).sum() / n
        var = ((hist * v * v).sum() / n - mean * mean).clamp_min(0)
        means.append(mean.item())
        # A constant channel carries no signal; dividing by 1 keeps it finite.
        stds.append(var.sqrt().item() or 1.0)
    return tuple(means), tuple(stds)


# Independent random streams per purpose, so changing val_size never moves the subsets' draws.
_VAL, _TRAIN_SUBSET, _TEST_SUBSET = 1, 2, 3


def split_indices(name: str, train_y: np.ndarray, test_y: np.ndarray, *, val_size: int, seed: int,
                  train_subset: int | None, test_subset: int | None,
                  ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Indices (train, val or None, test) into the raw splits for `load_dataset`'s arguments.

    The validation split is carved out of train first, then the subsets are drawn, each from
    its own seeded stream; the streaming path calls this too, so it selects the same images.
    """
    train, val, test = np.arange(len(train_y)), None, np.arange(len(test_y))
    if val_size:
        if val_size >= len(train_y):
            raise ValueError(f"val_size={val_size} leaves no training data ({name} has {len(train_y)} train images)")
        val = balanced_indices(train_y, val_size, np.random.default_rng([seed, _VAL]))
        train = np.setdiff1d(train, val)
    if train_subset is not None:
        train = train[balanced_indices(train_y[train], train_subset, np.random.default_rng([seed, _TRAIN_SUBSET]))]
    if test_subset is not None:
        test = test[balanced_indices(test_y, test_subset, np.random.default_rng([seed, _TEST_SUBSET]))]
    return train, val, test


def load_dataset(name: str, *, data_dir: str | os.PathLike | None = None, download: bool = False,
                 val_size: int = 0, seed: int = 0, train_subset: int | None = None,
                 test_subset: int | None = None, img_size: int | None = None,
                 synthetic_shape: tuple[int, int, int] = (3, 32, 32), synthetic_size: int = 1024,
                 num_classes: int | None = None) -> DataSplits:
    """Load a dataset by name into memory as uint8 tensors (see `list_datasets`).

    val_size: carve a seeded, class-balanced validation split of this many images out of
        train (removed from train).
    train_subset / test_subset: keep a seeded, class-balanced subset of this many images
        (taken after the validation split).
    img_size: resize every image to img_size x img_size (bilinear, once, kept uint8);
        default: native size, 32 for `folder` (shorter side resized, then center crop).
    synthetic_shape / synthetic_size: shape (C, H, W) and train size of `synthetic`
        (random pixels and labels; test set = synthetic_size // 4), for benchmarks.
    num_classes: the classes of `synthetic` (default 10); for other datasets, a check
        that the data has this many.
    digits has no published split: a fixed class-balanced quarter (449 images) is the
    test set, the same for every seed.
    """
    if name not in _DATASETS:
        close = difflib.get_close_matches(name, _DATASETS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown dataset {name!r}{hint}; valid: {', '.join(_DATASETS)}")
    for arg, value in (("val_size", val_size), ("train_subset", train_subset), ("test_subset", test_subset),
                       ("img_size", img_size), ("num_classes", num_classes)):
        if value is not None and (not isinstance(value, int) or value < (0 if arg == "val_size" else 1)):
            raise ValueError(f"{arg} must be a {'non-negative' if arg == 'val_size' else 'positive'} int, "
                             f"got {value!r}")
    reader, hflip = _DATASETS[name]
    raw = reader(name, data_dir=data_dir, download=download, seed=seed, img_size=img_size,
                 synthetic_shape=tuple(synthetic_shape), synthetic_size=synthetic_size,
                 num_classes=num_classes)
    if num_classes is not None and num_classes != raw.num_classes:
        raise ValueError(f"num_classes={num_classes} but {name} has {raw.num_classes} classes")
    return splits_from_raw(name, raw, hflip, val_size=val_size, seed=seed, train_subset=train_subset,
                           test_subset=test_subset, img_size=img_size)


def splits_from_raw(name: str, raw: _Raw, hflip: bool, *, val_size: int, seed: int, train_subset: int | None,
                    test_subset: int | None, img_size: int | None) -> DataSplits:
    """Split, subset and resize ``raw`` as :func:`load_dataset` describes; statistics from train."""
    train, val, test = split_indices(name, raw.train_y, raw.test_y, val_size=val_size, seed=seed,
                                     train_subset=train_subset, test_subset=test_subset)
    train_x, train_y, test_x, test_y = raw.train_x[train], raw.train_y[train], raw.test_x[test], raw.test_y[test]
    val_x, val_y = (raw.train_x[val], raw.train_y[val]) if val is not None else (None, None)

    def images(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        return _resize(t, img_size) if img_size else t

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))

    train_x = images(train_x)
    mean, std = _channel_stats(train_x)
    return DataSplits(
        name=name, train_x=train_x, train_y=labels(train_y), test_x=images(test_x), test_y=labels(test_y),
        num_classes=raw.num_classes, mean=mean, std=std, hflip=hflip,
        val_x=images(val_x) if val_x is not None else None,
        val_y=labels(val_y) if val_y is not None else None)
