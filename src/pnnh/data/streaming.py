"""Images read from disk as training goes: for datasets larger than memory (ImageNet).

`TensorLoader` holds a dataset on the device as uint8; full ImageNet at 224 px is about
190 GB that way. Here only an index lives in memory (where each image's bytes are, and its
label); `torch.utils.data.DataLoader` worker processes read, decode (Pillow) and augment
whole batches, and the main process moves them to the device and normalises them there.

Layout: ``data_dir/train`` and ``data_dir/val`` (or ``test``), each holding either
class-per-folder images (``<class>/<image>``, the ImageNet layout; classes are the sorted
train folder names) or tar shards in the webdataset layout (``*.tar``; members grouped into
samples by key, the name up to the first dot of its file name: ``KEY.jpg`` or ``KEY.png``
with ``KEY.cls``, the class index as text). ``write_shards`` converts the first into the
second (``pnnh data shards``).

Shards are read by random access (each sample's byte offset, taken once from the tar
headers), not streamed front to back as the webdataset library does: that is what lets an
epoch be one exact permutation, the same as the in-memory loader's. So a shard must be an
uncompressed ``.tar`` (webdataset's usual form; JPEG and PNG bytes do not compress further).
Members other than regular files and directories, and names that are absolute or contain
``..``, are refused, as the dataset archive reader refuses them; so are images declaring more
pixels than Pillow's limit.

Determinism and sharding are `TensorLoader`'s: the epoch's order is the same permutation of
(seed, epoch), step i covers positions [i*B*W, (i+1)*B*W) with rank r taking the r-th slice
of B, and a sample's random-resized crop and flip come from a generator seeded by (seed,
epoch, sample), so they do not depend on the number of workers, ranks or the batch size.
Coverage: training drops the epoch's final incomplete step (at most B*W - 1 images, a
different set each epoch); evaluation spreads it over the ranks, so every image is seen
exactly once. Nothing is ever padded (a padded duplicate would be counted twice in the
metrics). ``set_epoch(e, start=k)`` resumes an epoch after its first k steps without
reading their images.

Augmentation (the standard ImageNet recipe, written here since pnnh does not use
torchvision): training takes a random-resized crop (area a uniform fraction of
``scale=(0.08, 1)`` of the image, aspect ratio log-uniform in ``ratio=(3/4, 4/3)``, 10
tries, then the whole image clamped to that ratio), resized to ``img_size`` (bilinear,
antialiased), and a horizontal flip with probability 1/2; evaluation resizes the shorter
side to ``img_size / eval_crop`` (0.875: 256 px for 224) and takes the centre
``img_size`` square.
"""
from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from pnnh.io import atomic_write

from .datasets import DataSplits, _channel_stats, folder_splits, split_indices
from .formats import IMAGE_EXTENSIONS, DatasetFormatError, decode_image, list_image_folder
from .loader import TensorLoader, check_sharding, epoch_generator, normalizer, num_steps, step_ranges

__all__ = ["ImageIndex", "StreamSplits", "StreamingLoader", "index_split", "load_streaming", "write_shards",
           "make_image_folder", "decoded_bytes", "stream_choice", "make_loader", "split_size", "default_workers"]

SCALE, RATIO, EVAL_CROP = (0.08, 1.0), (3 / 4, 4 / 3), 0.875
STATS_IMAGES = 512  # images decoded to estimate the channel mean and std
_IMAGE_EXTS = {e[1:] for e in IMAGE_EXTENSIONS}


@dataclass(repr=False)
class ImageIndex:
    """Where each image of a split is: ``files[file[i]]`` (relative to ``root``), from byte
    ``offset[i]``, ``size[i]`` bytes (-1: the whole file); ``labels[i]`` its class.

    Arrays rather than Python lists, so DataLoader workers forked from the main process
    share the index instead of copying it page by page as reference counts change.
    """

    root: Path
    files: np.ndarray   # bytes: paths relative to root
    file: np.ndarray    # int64
    offset: np.ndarray  # int64
    size: np.ndarray    # int64
    labels: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"ImageIndex({str(self.root)!r}, {len(self)} images in {len(self.files)} files)"

    def subset(self, idx: np.ndarray) -> "ImageIndex":
        """The images ``idx`` (in that order)."""
        return ImageIndex(self.root, self.files, self.file[idx], self.offset[idx], self.size[idx], self.labels[idx])

    def where(self, i: int) -> str:
        """Image ``i``'s location, for error messages."""
        path = self.root / os.fsdecode(self.files[self.file[i]])
        return str(path) if self.size[i] < 0 else f"{path} (member at byte {self.offset[i]})"

    def read(self, i: int) -> bytes:
        with open(self.root / os.fsdecode(self.files[self.file[i]]), "rb") as f:
            f.seek(int(self.offset[i]))
            return f.read(int(self.size[i]))

    def image(self, i: int) -> Image.Image:
        """Image ``i`` decoded as RGB."""
        return decode_image(io.BytesIO(self.read(i)), self.where(i))


def _index(root: Path, rel: list[str], labels: list[int], offsets=None, sizes=None, file=None) -> ImageIndex:
    n = len(labels)
    return ImageIndex(root, np.array([os.fsencode(r) for r in rel], dtype=bytes),
                      np.asarray(file if file is not None else np.arange(n), np.int64),
                      np.asarray(offsets if offsets is not None else np.zeros(n), np.int64),
                      np.asarray(sizes if sizes is not None else np.full(n, -1), np.int64),
                      np.asarray(labels, np.int64))


def _index_folder(split: Path, classes: list[str] | None) -> tuple[ImageIndex, list[str]]:
    """``split/<class>/<image>`` (classes: the sorted folders, or the train split's numbering)."""
    files, classes = list_image_folder(split, classes)
    return _index(split, [str(p.relative_to(split)) for p, _ in files], [label for _, label in files]), classes


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's sample key and extension: ``dir/abc.seg.png`` -> (``dir/abc``, ``seg.png``)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _index_shards(split: Path, shards: list[Path]) -> ImageIndex:
    """Every sample of the webdataset shards: (image member, .cls label) pairs by key."""
    file, offsets, sizes, labels = [], [], [], []
    for s, shard in enumerate(shards):
        images: dict[str, tarfile.TarInfo] = {}
        classes: dict[str, int] = {}
        try:
            with tarfile.open(shard, "r:") as tar:
                for m in tar:
                    if m.isdir():
                        continue
                    if not m.isfile():
                        raise DatasetFormatError(f"{shard}: refusing member {m.name!r} (not a regular file)")
                    if os.path.isabs(m.name) or ".." in Path(m.name).parts:
                        raise DatasetFormatError(f"{shard}: refusing member {m.name!r} (absolute path or '..')")
                    key, ext = _split_key(m.name)
                    if ext in _IMAGE_EXTS:
                        if key in images:
                            raise DatasetFormatError(f"{shard}: sample {key!r} has two images "
                                                     f"({images[key].name}, {m.name})")
                        images[key] = m
                    elif ext == "cls":
                        text = tar.extractfile(m).read().decode(errors="replace").strip()
                        if not text.isdigit():
                            raise DatasetFormatError(f"{shard}: {m.name} holds {text[:20]!r}, not a class index")
                        classes[key] = int(text)
        except (tarfile.ReadError, EOFError) as err:
            raise DatasetFormatError(f"{shard}: not an uncompressed tar shard ({err}); shards are read by random "
                                     "access, so they must be plain .tar (not .tar.gz)") from None
        unpaired = sorted(set(images) ^ set(classes))
        if unpaired:
            key = unpaired[0]
            has, lacks = ("an image", "a .cls label") if key in images else ("a .cls label", "an image")
            raise DatasetFormatError(f"{shard}: sample {key!r} has {has} but no {lacks} "
                                     f"({len(unpaired)} such samples); each needs KEY.jpg/.png and KEY.cls")
        for key in sorted(images, key=lambda k: images[k].offset_data):
            file.append(s)
            offsets.append(images[key].offset_data)
            sizes.append(images[key].size)
            labels.append(classes[key])
    if not labels:
        raise DatasetFormatError(f"{split}: the shards {[p.name for p in shards]} hold no samples")
    return _index(split, [p.name for p in shards], labels, offsets, sizes, file)


def index_split(split: str | os.PathLike, classes: list[str] | None = None) -> tuple[ImageIndex, list[str] | None]:
    """Index one split directory: tar shards (``*.tar``) or class folders.

    Returns the index and the class names (None for shards, whose labels are numbers).
    ``classes`` gives a test split the train split's label numbering.
    """
    split = Path(split)
    shards = sorted(p for p in split.iterdir() if p.is_file() and p.suffix == ".tar")
    folders = [p for p in split.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if shards and folders:
        raise DatasetFormatError(f"{split}: holds both tar shards ({shards[0].name}, ...) and class folders "
                                 f"({folders[0].name}, ...); keep one layout per split")
    if shards:
        return _index_shards(split, shards), None
    return _index_folder(split, classes)


def decoded_bytes(num_images: int, img_size: int) -> int:
    """Memory of ``num_images`` RGB images as uint8 at ``img_size`` px (what `TensorLoader` holds)."""
    return num_images * 3 * img_size * img_size


@dataclass(repr=False)
class StreamSplits:
    """A dataset on disk, as indices; the streaming counterpart of `DataSplits`.

    mean/std are per channel in pixel/255 units, estimated on up to `STATS_IMAGES` seeded
    train images (centre crops), since reading every image would cost an epoch.
    """

    name: str
    train: ImageIndex
    test: ImageIndex
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    img_size: int
    val: ImageIndex | None = None
    hflip: bool = True
    in_chans: int = 3

    def __repr__(self) -> str:
        val = f", val={len(self.val)}" if self.val is not None else ""
        return (f"StreamSplits({self.name!r}, train={len(self.train)}{val}, test={len(self.test)}, "
                f"img_size={self.img_size}, classes={self.num_classes}, on disk)")


def stream_choice(stream: bool | str, name: str, data_dir: str | os.PathLike | None, img_size: int | None,
                  memory_budget_gb: float) -> tuple[bool, str]:
    """Whether a run reads dataset ``name`` from disk as it trains (True) or holds it in memory,
    and why, in words for the run's log.

    ``stream``: True, False or "auto": stream a `folder` dataset when its images, decoded at
    ``img_size``, would take more than ``memory_budget_gb`` (per process). Tar shards are
    always streamed (the in-memory reader reads class folders only). Only `folder` streams.
    """
    if stream is False:
        return False, "held in memory (stream: false)"
    if name != "folder":
        if stream is True:
            raise ValueError(f"stream: true reads class folders or tar shards (data: folder); {name!r} is a "
                             "dataset pnnh holds in memory: use stream: auto or false")
        return False, "held in memory"
    splits = folder_splits(data_dir)
    if any(p.suffix == ".tar" for split in splits for p in split.iterdir()):
        return True, "streamed from disk (tar shards)"
    if stream is True:
        return True, "streamed from disk (stream: true)"
    n = sum(len(list_image_folder(split)[0]) for split in splits)
    size = img_size or 32
    need = decoded_bytes(n, size) / 1e9
    verdict = ">" if need > memory_budget_gb else "<="
    where = "streamed from disk" if need > memory_budget_gb else "held in memory"
    return need > memory_budget_gb, (f"{where}: {n:,} images are {need:.3g} GB at {size} px {verdict} "
                                     f"memory_budget_gb={memory_budget_gb:g}")


_STATS = 4  # the seeded stream that picks the images for mean/std (split_indices uses 1..3)


def load_streaming(data_dir: str | os.PathLike | None, *, val_size: int = 0, seed: int = 0,
                   train_subset: int | None = None, test_subset: int | None = None,
                   img_size: int | None = None) -> StreamSplits:
    """Index the folder dataset in ``data_dir`` (see the module docstring) without loading it.

    Arguments mean what they mean for ``load_dataset("folder", ...)`` and select the same
    images: the validation split and subsets are drawn by the same seeded rule.
    """
    train_dir, test_dir = folder_splits(data_dir)
    full, classes = index_split(train_dir)
    test, _ = index_split(test_dir, classes)
    num_classes = len(classes) if classes is not None else int(max(full.labels.max(), test.labels.max())) + 1
    size = img_size or 32
    t, v, e = split_indices("folder", full.labels, test.labels, val_size=val_size, seed=seed,
                            train_subset=train_subset, test_subset=test_subset)
    train, val, test = full.subset(t), full.subset(v) if v is not None else None, test.subset(e)
    pick = np.random.default_rng([seed, _STATS]).permutation(len(train))[:STATS_IMAGES]
    sample = torch.from_numpy(np.stack([eval_image(train.image(int(i)), size, EVAL_CROP) for i in pick]))
    mean, std = _channel_stats(sample.permute(0, 3, 1, 2))
    return StreamSplits("folder", train, test, num_classes, mean, std, size, val)


# --- augmentation (pure functions of the image and a generator) ------------------------

def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: Sequence[float] = SCALE, ratio: Sequence[float] = RATIO) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a crop with area fraction in ``scale`` and aspect w/h in ``ratio``
    (log-uniform); after 10 misses, the largest centred crop whose aspect is within ``ratio``."""
    area, log_ratio = width * height, (np.log(ratio[0]), np.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = np.exp(rng.uniform(*log_ratio))
        w, h = round(np.sqrt(target * aspect)), round(np.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def train_image(im: Image.Image, size: int, rng: np.random.Generator, hflip: bool,
                scale: Sequence[float] = SCALE, ratio: Sequence[float] = RATIO) -> np.ndarray:
    """Random-resized crop to ``size`` x ``size``, flipped with probability 1/2: (size, size, 3) uint8."""
    flip = rng.random() < 0.5  # drawn even without hflip, so the crop draws do not depend on it
    left, top, w, h = random_resized_crop_box(im.width, im.height, rng, scale, ratio)
    a = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)))
    return a[:, ::-1] if flip and hflip else a


def eval_image(im: Image.Image, size: int, crop: float = EVAL_CROP) -> np.ndarray:
    """Shorter side resized to ``size / crop``, centre ``size`` square: (size, size, 3) uint8.

    Done as one resample of the matching box of the original image (resize, then crop,
    without the intermediate image)."""
    side = min(im.width, im.height) * crop  # the original pixels that end up in the crop
    left, top = (im.width - side) / 2, (im.height - side) / 2
    return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side)))


# --- the loader --------------------------------------------------------------------------

class _Batches(Dataset):
    """Decodes and augments one batch per item; an item is (epoch, sample indices)."""

    def __init__(self, index: ImageIndex, size: int, train: bool, hflip: bool, seed: int,
                 scale: Sequence[float], ratio: Sequence[float], eval_crop: float):
        self.index, self.size, self.train, self.hflip, self.seed = index, size, train, hflip, seed
        self.scale, self.ratio, self.eval_crop = scale, ratio, eval_crop

    def __getitem__(self, job: tuple[int, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, idx = job
        out = np.empty((len(idx), self.size, self.size, 3), np.uint8)
        for k, i in enumerate(idx):
            im = self.index.image(int(i))
            if self.train:
                rng = np.random.default_rng([self.seed, epoch, int(i)])
                out[k] = train_image(im, self.size, rng, self.hflip, self.scale, self.ratio)
            else:
                out[k] = eval_image(im, self.size, self.eval_crop)
        return torch.from_numpy(out), torch.from_numpy(self.index.labels[idx])


class _Jobs(Sampler):
    """The current pass's batch plans; the loader refills it before each pass, so persistent
    workers serve every epoch."""

    def __init__(self) -> None:
        self.jobs: list[tuple[int, np.ndarray]] = []

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        return iter(self.jobs)

    def __len__(self) -> int:
        return len(self.jobs)


class StreamingLoader:
    """Batches of images read from disk by ``workers`` processes; `TensorLoader`'s interface.

    index: the split (`ImageIndex`); img_size: side of the square images yielded.
    mean/std: per channel, pixel/255 units. train: shuffle every epoch and augment
        (random-resized crop with ``scale``/``ratio``, flip when ``hflip``); otherwise keep
        the order and take centre crops (``eval_crop``).
    drop_last (default: = train), rank / world_size, seed, channels_last: as `TensorLoader`.
    workers: DataLoader worker processes (0: decode in this process); they persist across
        epochs. prefetch: batches each worker prepares ahead.
    Yields (float32 normalized x (B, 3, S, S), int64 y) on ``device``. Call
    ``set_epoch(e)`` (or ``set_epoch(e, start=k)`` to resume after step k) before each epoch.
    """

    def __init__(self, index: ImageIndex, batch_size: int, *, img_size: int, mean: Sequence[float],
                 std: Sequence[float], train: bool, hflip: bool = True, seed: int = 0,
                 device: str | torch.device = "cpu", channels_last: bool = False, drop_last: bool | None = None,
                 rank: int = 0, world_size: int = 1, workers: int = 2, prefetch: int = 2,
                 scale: Sequence[float] = SCALE, ratio: Sequence[float] = RATIO, eval_crop: float = EVAL_CROP):
        if not isinstance(img_size, int) or img_size < 1:
            raise ValueError(f"img_size must be an int >= 1, got {img_size!r}")
        if not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an int >= 0, got {workers!r}")
        if not (0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1] and 0 < eval_crop <= 1):
            raise ValueError(f"need 0 < scale[0] <= scale[1] <= 1, 0 < ratio[0] <= ratio[1], 0 < eval_crop <= 1; "
                             f"got scale={scale}, ratio={ratio}, eval_crop={eval_crop}")
        self.drop_last = train if drop_last is None else drop_last
        check_sharding(len(index), batch_size, world_size, rank, seed, self.drop_last)
        self.index, self.batch_size, self.rank, self.world_size = index, batch_size, rank, world_size
        self.train, self.seed, self.channels_last = train, seed, channels_last
        self.epoch, self.start = 0, 0
        self.device = torch.device(device)
        self._scale, self._shift = normalizer(mean, std, 3, self.device)
        self._jobs = _Jobs()
        self._loader = DataLoader(
            _Batches(index, img_size, train, hflip, seed, scale, ratio, eval_crop), batch_size=None,
            sampler=self._jobs, num_workers=workers, persistent_workers=workers > 0,
            prefetch_factor=prefetch if workers else None, pin_memory=self.device.type == "cuda",
            # its own generator: drawing the workers' base seed must not move the global torch RNG
            generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return num_steps(len(self.index), self.batch_size, self.world_size, self.drop_last)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and the step to start from (`TensorLoader.set_epoch`)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if not isinstance(start, int) or not 0 <= start <= len(self):
            raise ValueError(f"start must be an int in [0, {len(self)}], got {start!r}")
        self.epoch, self.start = epoch, start

    def _plan(self) -> list[tuple[int, np.ndarray]]:
        """This rank's (epoch, sample indices) per step, from step ``start`` on."""
        n = len(self.index)
        # The permutation is the first draw of TensorLoader's epoch generator: the same order.
        order = torch.randperm(n, generator=epoch_generator(self.seed, self.epoch)).numpy() if self.train \
            else np.arange(n)
        return [(self.epoch, order[lo:hi]) for lo, hi in
                step_ranges(n, self.batch_size, self.world_size, self.rank, self.drop_last, self.start)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._jobs.jobs = self._plan()
        non_blocking = self.device.type == "cuda"
        for xb, yb in self._loader:
            # Workers write (B, H, W, C): as NCHW that is already the channels_last layout.
            xb = xb.to(self.device, non_blocking=non_blocking).permute(0, 3, 1, 2)
            if not self.channels_last:
                xb = xb.contiguous()
            yield torch.addcmul(self._shift, xb.float(), self._scale), yb.to(self.device, non_blocking=non_blocking)


def split_size(splits: DataSplits | StreamSplits, split: str) -> int:
    """Images in ``split`` ("train", "val" or "test") of either kind of dataset; 0 when it has none."""
    data = getattr(splits, split) if isinstance(splits, StreamSplits) else getattr(splits, f"{split}_y")
    return 0 if data is None else len(data)


def default_workers() -> int:
    """Decoding workers for one training process: the CPUs this process may use, shared by the
    processes torchrun started on this machine (``LOCAL_WORLD_SIZE``), at least 1, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


def make_loader(splits: DataSplits | StreamSplits, split: str, batch_size: int, *, train: bool,
                first: int | None = None, crop_pad: int = 0, workers: int = 0,
                **kwargs) -> TensorLoader | StreamingLoader:
    """The loader for ``split`` ("train", "val" or "test") of either kind of dataset.

    ``first``: only the split's first images (a fixed probe batch). In memory, ``crop_pad``
    is the random crop's padding and ``workers`` is unused; streamed, the random-resized crop
    replaces the padded crop and ``workers`` decode. ``kwargs``: the loaders' common options
    (seed, device, channels_last, drop_last, rank, world_size).
    """
    norm = {"mean": splits.mean, "std": splits.std, "train": train, "hflip": splits.hflip, **kwargs}
    if isinstance(splits, StreamSplits):
        index = getattr(splits, split)
        if first is not None:
            index = index.subset(np.arange(min(first, len(index))))
        return StreamingLoader(index, batch_size, img_size=splits.img_size, workers=workers, **norm)
    x, y = getattr(splits, f"{split}_x"), getattr(splits, f"{split}_y")
    return TensorLoader(x[:first], y[:first], batch_size, crop_pad=crop_pad, **norm)


# --- writing datasets ------------------------------------------------------------------

def write_shards(split: str | os.PathLike, out: str | os.PathLike, per_shard: int = 1000,
                 classes: list[str] | None = None) -> tuple[list[Path], list[str]]:
    """Copy the class-folder split ``split`` into webdataset tar shards in ``out``.

    Sample i becomes ``{i:08d}.<ext>`` (the image's bytes, unchanged) and ``{i:08d}.cls``
    (its class index), ``per_shard`` samples per ``shard-NNNNNN.tar``; ``classes`` numbers
    a val split as its train split. Each shard is written atomically (``pnnh.io.atomic_write``).
    Returns the shards and the class names.
    """
    if not isinstance(per_shard, int) or per_shard < 1:
        raise ValueError(f"per_shard must be an int >= 1, got {per_shard!r}")
    index, classes = _index_folder(Path(split), classes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    bar = tqdm(total=len(index), desc=f"sharding {Path(split).name}", unit="img", leave=False)
    for s, lo in enumerate(range(0, len(index), per_shard)):
        path = out / f"shard-{s:06d}.tar"
        atomic_write(path, lambda f, lo=lo: _write_shard(f, index, range(lo, min(lo + per_shard, len(index))), bar))
        shards.append(path)
    bar.close()
    return shards, classes


def _write_shard(f, index: ImageIndex, samples: range, bar: tqdm) -> None:
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in samples:
            ext = Path(os.fsdecode(index.files[index.file[i]])).suffix.lower()
            for name, data in ((f"{i:08d}{ext}", index.read(i)), (f"{i:08d}.cls", b"%d" % index.labels[i])):
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
            bar.update()


def make_image_folder(root: str | os.PathLike, *, train: int = 2000, test: int = 400, classes: int = 10,
                      size: tuple[int, int] = (16, 16), ext: str = ".png", seed: int = 0) -> Path:
    """Write a generated class-folder dataset (``root/train``, ``root/val``) to try the streaming path on.

    Class k is a colour on a circle of hues; each image jitters that colour and adds a
    blotchy texture and pixel noise, so neighbouring classes overlap and accuracy stays
    well below 100%. ``size`` is (width, height); ``ext`` ``.png`` (lossless) or ``.jpg``.
    """
    rng = np.random.default_rng(seed)
    hues = np.linspace(0, 2 * np.pi, classes, endpoint=False)
    palette = 128 + 70 * np.stack([np.cos(hues), np.cos(hues - 2.1), np.cos(hues + 2.1)], 1)
    w, h = size
    root = Path(root)
    for split, n in (("train", train), ("val", test)):
        for i in range(n):
            k = i % classes
            colour = palette[k] + rng.normal(0, 22, 3)
            blotches = np.kron(rng.normal(0, 30, (h // 4 + 1, w // 4 + 1, 3)), np.ones((4, 4, 1)))[:h, :w]
            pixels = np.clip(colour + blotches + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
            folder = root / split / f"class_{k:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{i:06d}{ext}")
    return root
