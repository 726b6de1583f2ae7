"""Your own data in memory: what ``pnnh.train(config, data=...)`` accepts besides a dataset name.

    pnnh.train({"model": "pnnh20", "epochs": 2}, data=(images, labels))   # a quarter held out to test
    pnnh.train(config, data={"train": (x, y), "test": (x_test, y_test)})
    pnnh.train(config, data=my_dataset)                                    # a torch.utils.data.Dataset

Images are square (N, C, H, W) tensors or arrays, uint8 (0..255) or floating point; labels are
integers 0..K-1, one per image. Floating images become uint8 through one affine map fitted to
the training images' range: the trainer normalises every channel by its mean and std, which
removes any affine map, so only the rounding to 256 levels changes them. A Dataset yields
(image, label) pairs, an image being a tensor or array (C, H, W) or (H, W), or a PIL image.
Without a test set, a fixed class-balanced quarter of the data is held out as one (as for
digits). Error messages name types and shapes, never the values.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .datasets import DataSplits, _Raw, quarter_test_split, splits_from_raw

__all__ = ["IN_MEMORY", "memory_splits"]

IN_MEMORY = "in-memory"  # the dataset name a run on in-memory data records in its config
_WHAT = ("data must be (images, labels), {'train': ..., 'test': ...} or a torch.utils.data.Dataset "
         "(images N,C,H,W uint8 or float, labels 0..K-1)")


def memory_splits(data: Any, *, val_size: int = 0, seed: int = 0, train_subset: int | None = None,
                  test_subset: int | None = None, img_size: int | None = None) -> DataSplits:
    """``data`` (see the module docstring) as the :class:`DataSplits` ``load_dataset`` returns."""
    if isinstance(data, Mapping):
        keys = sorted(map(str, data))
        if "train" not in data or set(keys) - {"train", "test"}:
            raise ValueError(f"{_WHAT}; a dict needs the key 'train' (and optionally 'test'), got keys {keys}")
        train, test = _images_labels(data["train"], "data['train']"), data.get("test")
        test = None if test is None else _images_labels(test, "data['test']")
    else:
        train, test = _images_labels(data, "data"), None
    if test is not None and test[0].shape[1:] != train[0].shape[1:]:
        raise ValueError(f"test images have shape {tuple(test[0].shape[1:])}, training images "
                         f"{tuple(train[0].shape[1:])}: they must match")
    to_uint8 = _uint8_map(train[0])
    x, y = to_uint8(train[0]), train[1]
    if test is None:
        if len(y) < 2:
            raise ValueError(f"data has {len(y)} image: holding out a test set needs at least 2; or pass data={{'train': ..., 'test': ...}}")
        keep, held = quarter_test_split(y)
        raw_parts = (x[keep], y[keep], x[held], y[held])
    else:
        raw_parts = (x, y, to_uint8(test[0]), test[1])
    num_classes = int(max(raw_parts[1].max(), raw_parts[3].max())) + 1
    return splits_from_raw(IN_MEMORY, _Raw(*raw_parts, num_classes), False, val_size=val_size, seed=seed,
                           train_subset=train_subset, test_subset=test_subset, img_size=img_size)


def _describe(value: Any) -> str:
    """A value's type and shape for an error message (never its contents)."""
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"a {type(value).__name__} of shape {tuple(shape)} ({getattr(value, 'dtype', '?')})"
    if isinstance(value, (str, bytes)):
        return f"the {type(value).__name__} {value[:40]!r}"
    if isinstance(value, Sequence):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def _images_labels(value: Any, where: str) -> tuple[torch.Tensor, np.ndarray]:
    """(images tensor N,C,H,W, int64 labels array) from a pair or a Dataset, checked."""
    if isinstance(value, torch.utils.data.Dataset) and not isinstance(value, torch.utils.data.IterableDataset):
        x, y = _from_dataset(value, where)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        x, y = (_as_tensor(v, f"{where} {'images' if i == 0 else 'labels'}") for i, v in enumerate(value))
    else:
        raise ValueError(f"{_WHAT}; {where} is {_describe(value)}")
    if x.ndim != 4 or x.shape[2] != x.shape[3] or 0 in x.shape:
        raise ValueError(f"{where} images must be (N, C, H, W) with square, non-empty images; got shape {tuple(x.shape)}")
    if not (x.dtype == torch.uint8 or x.is_floating_point()):
        raise ValueError(f"{where} images must be uint8 (0..255) or floating point, got {x.dtype}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{where} images hold NaN or infinite values")
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"{where} labels must be one per image: {len(x)} images, labels of shape {tuple(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex() or (len(y) and int(y.min()) < 0):
        raise ValueError(f"{where} labels must be integers 0..K-1, got {y.dtype}"
                         + (f" with minimum {int(y.min())}" if not y.is_floating_point() and len(y) else ""))
    return x, y.numpy().astype(np.int64)


def _as_tensor(value: Any, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray) and value.dtype != object:
        return torch.from_numpy(np.ascontiguousarray(value))
    raise ValueError(f"{where} must be a tensor or numpy array, got {_describe(value)}")


def _from_dataset(dataset: torch.utils.data.Dataset, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read every (image, label) of a map-style Dataset into two tensors."""
    try:
        n = len(dataset)
    except TypeError:
        raise ValueError(f"{where}: a Dataset without len() cannot be held in memory") from None
    images, labels = [], []
    for i in range(n):
        item = dataset[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"{where}[{i}] must be an (image, label) pair, got {_describe(item)}")
        image = item[0]
        if not isinstance(image, (torch.Tensor, np.ndarray)) and hasattr(image, "getbands"):  # a PIL image
            image = np.asarray(image).copy()
            image = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
        image = _as_tensor(image, f"{where}[{i}] image")
        images.append(image[None] if image.ndim == 2 else image)
        labels.append(int(item[1]) if not isinstance(item[1], torch.Tensor) else int(item[1].item()))
    if not images:
        raise ValueError(f"{where} is an empty Dataset")
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        raise ValueError(f"{where} images differ in shape ({sorted(shapes)[:3]}): resize them to one square size")
    return torch.stack(images), torch.tensor(labels)


def _uint8_map(train_x: torch.Tensor):
    """The images as uint8: as they are, or floats mapped affinely from the training range to 0..255."""
    if train_x.dtype == torch.uint8:
        return lambda x: x.numpy()
    lo, hi = float(train_x.min()), float(train_x.max())
    scale = 255.0 / (hi - lo) if hi > lo else 1.0
    return lambda x: ((x.double() - lo) * scale).round().clamp(0, 255).to(torch.uint8).numpy()
