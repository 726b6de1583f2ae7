"""Datasets as uint8 tensors, their downloader, and an on-device batch loader.

    splits = load_dataset("fashion-mnist", val_size=5000)
    loader = TensorLoader(splits.train_x, splits.train_y, 128, mean=splits.mean, std=splits.std,
                          train=True, crop_pad=2, hflip=splits.hflip, device="cuda")
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader: ...
"""
from __future__ import annotations

from .datasets import (DATA_ENV, DatasetNotFoundError, DataSplits, balanced_indices, default_cache_dir,
                       list_datasets, load_dataset)
from .download import BASE_URL_ENV, ChecksumError, DownloadError, download
from .formats import DatasetFormatError
from .loader import TensorLoader

__all__ = [
    "DataSplits", "list_datasets", "load_dataset", "TensorLoader",
    "DatasetNotFoundError", "DatasetFormatError", "DownloadError", "ChecksumError",
    "download", "balanced_indices", "default_cache_dir", "DATA_ENV", "BASE_URL_ENV",
]
