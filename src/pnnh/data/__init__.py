"""Datasets as uint8 tensors, their downloader, and an on-device batch loader.

    splits = load_dataset("fashion-mnist", val_size=5000)
    loader = TensorLoader(splits.train_x, splits.train_y, 128, mean=splits.mean, std=splits.std,
                          train=True, crop_pad=2, hflip=splits.hflip, device="cuda")
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader: ...

Data larger than memory (class folders or webdataset tar shards) streams from disk instead:

    splits = load_streaming("/data/imagenet", img_size=224)
    loader = StreamingLoader(splits.train, 128, img_size=224, mean=splits.mean, std=splits.std,
                             train=True, workers=8, device="cuda")
"""
from __future__ import annotations

from .datasets import (DATA_ENV, DatasetNotFoundError, DataSplits, balanced_indices, default_cache_dir,
                       list_datasets, load_dataset)
from .download import BASE_URL_ENV, ChecksumError, DownloadError, download
from .formats import DatasetFormatError
from .loader import TensorLoader
from .streaming import StreamingLoader, StreamSplits, load_streaming, write_shards

__all__ = [
    "DataSplits", "list_datasets", "load_dataset", "TensorLoader",
    "StreamSplits", "load_streaming", "StreamingLoader", "write_shards",
    "DatasetNotFoundError", "DatasetFormatError", "DownloadError", "ChecksumError",
    "download", "balanced_indices", "default_cache_dir", "DATA_ENV", "BASE_URL_ENV",
]
