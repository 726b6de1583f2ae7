"""Batches from uint8 tensors that live on the device, augmented in batch (airbench style).

The whole dataset is copied to the device once, as uint8 (Fashion-MNIST: 47 MB). A
batch is one index op, one gather that does the random crop and the flip for every
sample at once, and one fused scale-and-shift into normalized float32. No worker
processes, no per-sample Python.

Determinism: everything random in an epoch (the permutation, every sample's crop
offset and flip) is drawn up front from a generator seeded by (seed, epoch) and
indexed by the sample's position in that epoch's permutation. So a resumed run replays
an epoch exactly, and the augmentation a sample gets does not depend on how the epoch
is split into batches or ranks.

Sharding: step i of an epoch covers positions [i*B*W, (i+1)*B*W) of the permutation
(B = per-rank batch, W = world size); rank r takes the r-th slice of B. W ranks with
batch B therefore see exactly the global batches one process with batch B*W sees.

The epoch plan (`epoch_generator`, `step_ranges`, `check_sharding`, `normalizer`) is shared
with `pnnh.data.streaming.StreamingLoader`, so both loaders shuffle and shard alike.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["TensorLoader", "epoch_generator", "step_ranges", "num_steps", "check_sharding", "normalizer"]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator an epoch's shuffle (its first draw) and augmentation come from."""
    # SeedSequence mixes (seed, epoch) into well-separated streams (seed+epoch would collide).
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def num_steps(n: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    """Steps in an epoch of `n` samples at `world_size` ranks x `batch_size`."""
    step = batch_size * world_size
    return n // step if drop_last else math.ceil(n / step)


def step_ranges(n: int, batch_size: int, world_size: int, rank: int, drop_last: bool,
                start: int = 0) -> Iterator[tuple[int, int]]:
    """[lo, hi) positions of `rank`'s batch at each step of an epoch, from step `start` on."""
    b, w = batch_size, world_size
    for i in range(start, num_steps(n, b, w, drop_last)):
        lo = i * b * w
        size = min(b * w, n - lo)
        if size == b * w:
            yield lo + rank * b, lo + (rank + 1) * b
        else:  # final partial step: spread the remainder, sizes differ by at most one
            base, extra = divmod(size, w)
            lo += rank * base + min(rank, extra)
            yield lo, lo + base + (rank < extra)


def check_sharding(n: int, batch_size: int, world_size: int, rank: int, seed: int, drop_last: bool) -> None:
    """ValueError naming the value when `n` samples cannot be batched and sharded as asked."""
    for arg, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1), ("seed", seed, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{arg} must be an int >= {low}, got {value!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    step = batch_size * world_size
    if drop_last and n < step:
        raise ValueError(f"{n} samples cannot fill one step of {world_size} rank(s) x batch {batch_size} "
                         f"= {step}; lower batch_size or world_size, or pass drop_last=False")
    if n < world_size:
        raise ValueError(f"{n} samples cannot be split over world_size={world_size} ranks")


def normalizer(mean: Sequence[float], std: Sequence[float], channels: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) such that (x/255 - mean)/std = x * scale + shift, as one multiply-add."""
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ValueError(f"mean/std need one value per channel ({channels}) and std > 0, got {mean}, {std}")
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return 1.0 / (255.0 * std_t), -mean_t / std_t


class TensorLoader:
    """Batches from uint8 tensors kept on `device`; normalization + augmentation on device.

    x: uint8 images (N, C, H, W); y: labels (N,). mean/std: per channel, pixel/255 units.
    train: shuffle every epoch and augment (random crop with `crop_pad` zero pixels of
        padding, random horizontal flip when `hflip`); otherwise keep the order as is.
    drop_last: drop the final incomplete step (default: = train). When False, the last
        step is split as evenly as possible over the ranks, so every sample is seen
        exactly once per epoch (a rank's last batch may be smaller, even empty).
    rank / world_size: this process's shard; every rank yields the same number of batches.
    Yields (float32 normalized x, int64 y) on `device`, x in channels_last memory
    format when `channels_last`. Call `set_epoch(e)` before each epoch.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, mean: Sequence[float],
                 std: Sequence[float], train: bool, crop_pad: int = 0, hflip: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", channels_last: bool = False,
                 drop_last: bool | None = None, rank: int = 0, world_size: int = 1):
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"x must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"y must be 1-d with one label per image, got {tuple(y.shape)} for {len(x)} images")
        if not isinstance(crop_pad, int) or crop_pad < 0:
            raise ValueError(f"crop_pad must be an int >= 0, got {crop_pad!r}")
        self.drop_last = train if drop_last is None else drop_last
        check_sharding(len(x), batch_size, world_size, rank, seed, self.drop_last)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.train, self.crop_pad, self.hflip, self.seed = train, crop_pad, hflip, seed
        self.channels_last = channels_last
        self.epoch, self.start = 0, 0
        self.device = torch.device(device)
        self._scale, self._shift = normalizer(mean, std, x.shape[1], self.device)
        self.x = x.to(self.device)
        self.y = y.to(self.device, torch.int64)

    def __len__(self) -> int:
        return num_steps(len(self.x), self.batch_size, self.world_size, self.drop_last)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch; its shuffle and augmentation depend only on (seed, epoch).

        `start` skips the epoch's first steps (a run resumed mid-epoch): the batches that
        follow are those an uninterrupted pass yields from step `start` on.
        """
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if not isinstance(start, int) or not 0 <= start <= len(self):
            raise ValueError(f"start must be an int in [0, {len(self)}], got {start!r}")
        self.epoch, self.start = epoch, start

    def _epoch_plan(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The epoch's order and per-position crop offsets (N, 2) and flips (N,)."""
        n = len(self.x)
        if not self.train:
            return torch.arange(n, device=self.device), None, None
        g = epoch_generator(self.seed, self.epoch)
        order = torch.randperm(n, generator=g)
        shifts = torch.randint(0, 2 * self.crop_pad + 1, (n, 2), generator=g) if self.crop_pad else None
        flips = torch.rand(n, generator=g) < 0.5 if self.hflip else None
        return tuple(t.to(self.device) if t is not None else None for t in (order, shifts, flips))

    def _augment(self, xb: torch.Tensor, shifts: torch.Tensor | None, flips: torch.Tensor | None) -> torch.Tensor:
        """Random crop (zero padding, per-sample offset) and flip, as one gather over the batch."""
        bsz, c, h, w = xb.shape
        rows = torch.arange(h, device=xb.device).expand(bsz, h)
        cols = torch.arange(w, device=xb.device).expand(bsz, w)
        if shifts is not None:
            p = self.crop_pad
            xb = F.pad(xb, (p, p, p, p))
            rows, cols = rows + shifts[:, :1], cols + shifts[:, 1:]
        if flips is not None:
            cols = torch.where(flips[:, None], cols.flip(1), cols)
        xb = xb.gather(2, rows[:, None, :, None].expand(bsz, c, h, xb.shape[3]))
        return xb.gather(3, cols[:, None, None, :].expand(bsz, c, h, w))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, shifts, flips = self._epoch_plan()
        for lo, hi in step_ranges(len(self.x), self.batch_size, self.world_size, self.rank, self.drop_last,
                                  self.start):
            idx = order[lo:hi]
            xb = self.x.index_select(0, idx)
            if shifts is not None or flips is not None:
                xb = self._augment(xb, shifts[lo:hi] if shifts is not None else None,
                                   flips[lo:hi] if flips is not None else None)
            if self.channels_last:  # convert the 1-byte pixels; the float ops keep the layout
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield torch.addcmul(self._shift, xb.float(), self._scale), self.y.index_select(0, idx)
