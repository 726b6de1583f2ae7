"""Where this process sits in a distributed run, and the few collectives the trainer needs.

``rank_and_world()`` is the single place rank and world size are read; a plain run is rank 0
of a world of 1, and every helper here is then a no-op, so the trainer has one code path.

A multi-process run is started by ``torchrun`` (``torchrun --nproc-per-node N -m pnnh train
...``), which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
for each process. ``init_distributed`` reads them and creates the process group: NCCL with one
GPU per process (``cuda:LOCAL_RANK``) when the run uses CUDA, gloo on the CPU. Every collective
is bounded by a timeout, so when one rank dies or stalls the others fail with an error instead
of waiting for ever (torchrun then stops the whole job and names the rank that failed first).

Fault injection (tests only): ``PNNH_FAULT=exit:RANK:STEP`` makes rank RANK leave with
``os._exit(1)`` just before global optimizer step STEP; ``hang:RANK:STEP`` makes it sleep
instead, as a stalled rank would. Unset, ``fault_point`` costs one dict lookup.
"""
from __future__ import annotations

import datetime
import os
import sys
import time
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from pnnh.train.config import ConfigError, resolve_device

T = TypeVar("T")
FAULT_ENV = "PNNH_FAULT"


class DistributedError(RuntimeError):
    """A collective operation with the other ranks failed (a rank died, stalled or timed out)."""


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` unless torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launch_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` that torchrun set for this process; ``(0, 1, 0)`` without it.

    Raises ``ConfigError`` for values that cannot describe a process (not integers, a world
    size below 1, a rank outside ``[0, world_size)``).
    """
    values = {}
    for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        text = os.environ.get(name, default)
        try:
            values[name] = int(text)
        except ValueError:
            raise ConfigError(f"environment variable {name}={text!r} is not an integer; "
                              "start multi-process runs with torchrun") from None
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world < 1:
        raise ConfigError(f"WORLD_SIZE={world} is invalid: the world size must be >= 1")
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is invalid for WORLD_SIZE={world}: valid ranks are 0..{world - 1}")
    if local < 0:
        raise ConfigError(f"LOCAL_RANK={local} is invalid: it must be >= 0")
    return rank, world, local


def init_distributed(device: str, timeout: float) -> bool:
    """Create the process group torchrun describes; True if this call created it.

    Nothing happens (False) for a single process or when a group already exists (a caller
    that set one up keeps it). ``device`` is the config's device (``auto``/``cpu``/``cuda``):
    a CUDA run uses NCCL and pins this process to ``cuda:LOCAL_RANK``; a CPU run uses gloo.
    ``timeout`` (seconds) bounds every collective. Raises ``ConfigError`` when the launch
    cannot work (an explicit ``cuda:N``, or more local processes than GPUs).
    """
    if dist.is_available() and dist.is_initialized():
        return False
    rank, world, local = launch_env()
    if world == 1:
        return False
    if not dist.is_available():
        raise ConfigError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    resolved = resolve_device(device)
    if resolved.startswith("cuda"):
        if resolved != "cuda":
            raise ConfigError(f"device {device!r} names one GPU, but each of the {world} processes uses its own "
                              "GPU cuda:LOCAL_RANK; pass --device cuda (or auto)")
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local} needs GPU cuda:{local} but only {torch.cuda.device_count()} "
                              "CUDA device(s) are visible; start at most that many processes per machine")
        torch.cuda.set_device(local)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return True


def destroy_distributed() -> None:
    """Tear down the process group (safe to call when it is already gone or failed)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a failed group may not shut down cleanly; the process is ending anyway
            pass


def process_device(device: str) -> torch.device:
    """This process's device for the resolved config device: ``cuda`` becomes ``cuda:LOCAL_RANK``
    in a multi-process run, so each process drives its own GPU."""
    if device == "cuda" and rank_and_world()[1] > 1:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def per_rank_batch(batch_size: int, world: int) -> int:
    """The batch each process takes: ``batch_size`` is global and split evenly over the ranks.

    N processes x ``batch_size / N`` do the same arithmetic as one process with ``batch_size``
    (up to BatchNorm, which normalises over each process's own images unless ``sync_bn``).
    Raises ``ConfigError`` when ``batch_size`` is not a multiple of ``world``.
    """
    if batch_size % world:
        lower, upper = batch_size // world * world, (batch_size // world + 1) * world
        options = f"{lower} or {upper}" if lower else f"{upper}"
        raise ConfigError(f"batch_size={batch_size} is the global batch and must be divisible by the world "
                          f"size {world} (each process takes batch_size/{world} images); use e.g. {options}")
    return batch_size // world


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over all ranks, in place and returned (unchanged in a single process)."""
    if rank_and_world()[1] > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if rank_and_world()[1] > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), in place.

    DDP broadcasts them at the start of each training forward, so after the last step of an
    epoch each rank still holds the statistics of its own last batch; evaluation and the
    checkpoint (rank 0's) must all use rank 0's. No-op in a single process.
    """
    if rank_and_world()[1] > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and give its result, or its ``ConfigError``, to every rank.

    For decisions that read the file system (is the output directory empty? which checkpoint
    to resume?): every rank acts on rank 0's answer, so ranks cannot disagree, and ranks on
    machines that do not share rank 0's disk still resume from its checkpoint.
    """
    rank, world = rank_and_world()
    if world == 1:
        return fn()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except ConfigError as err:
            box[0] = ("error", str(err))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise ConfigError(value)
    return value


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel for a multi-process run, else ``model`` itself.

    DDP averages the gradients over the ranks during backward, once per parameter: a
    parameter several layers share (a trainable PNNH coder) is one registered parameter and is
    reduced once. Frozen parameters (the default coder) have no gradient and are left out.
    """
    if rank_and_world()[1] == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=device if ids else None)


def convert_sync_batchnorm(model: nn.Module, device: str) -> nn.Module:
    """Every BatchNorm in ``model`` (also ones nested in other modules) as SyncBatchNorm.

    Only for a multi-process run (one process has nothing to synchronise: unchanged).
    torch's SyncBatchNorm exchanges statistics only for GPU tensors, so a CPU run raises
    ``ConfigError`` naming the device.
    """
    world = rank_and_world()[1]
    if world == 1:
        return model
    if not device.startswith("cuda"):
        raise ConfigError(f"sync_bn needs CUDA: torch's SyncBatchNorm synchronises batch statistics only for GPU "
                          f"tensors, and this run uses device {device!r}. Drop --sync-bn (each of the {world} "
                          "processes then normalises over its own batch_size/world_size images) or run on GPUs")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def is_collective_failure(err: BaseException) -> bool:
    """Whether ``err`` comes from a failed collective (a lost peer, a timeout) in a multi-process run."""
    if rank_and_world()[1] == 1:
        return False
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        key in text for key in ("gloo", "Gloo", "NCCL", "nccl", "Connection closed", "Connection reset",
                                "Timed out", "timed out", "timeout", "ProcessGroup"))


def collective_failure(err: BaseException, timeout: float) -> DistributedError:
    """The ``DistributedError`` that explains a failed collective ``err`` on this rank."""
    rank, world = rank_and_world()
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return DistributedError(f"rank {rank} of {world} lost the other ranks: a collective operation failed ({first}). "
                            f"Another rank exited or did not respond within dist_timeout={timeout:g}s; torchrun's "
                            "summary names the rank that failed first. Resume with --resume --out DIR.")


def fault_point(step: int) -> None:
    """Test-only fault injection before global step ``step`` (see the module docstring)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    kind, _, rest = spec.partition(":")
    rank, _, at = rest.partition(":")
    if kind not in ("exit", "hang") or not rank.isdigit() or not at.isdigit():
        raise ValueError(f"{FAULT_ENV}={spec!r} is not valid: use exit:RANK:STEP or hang:RANK:STEP")
    if int(rank) == rank_and_world()[0] and int(at) == step:
        print(f"{FAULT_ENV}: rank {rank} {'exits' if kind == 'exit' else 'hangs'} before step {step}",
              file=sys.stderr, flush=True)
        if kind == "exit":
            os._exit(1)
        time.sleep(3600)
