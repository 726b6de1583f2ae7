"""Where this process sits in a distributed run: the single place rank/world size are read.

Everything else asks ``rank_and_world()``; a plain run is rank 0 of a world of 1, so the
trainer is written for DDP (issue 8) without depending on it.
"""
from __future__ import annotations

import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` unless torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
