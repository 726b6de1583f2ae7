"""The training loop: config -> data -> model -> epochs -> metrics log and checkpoints.

A run directory holds:

- ``config.yaml``    the resolved config (written first; every "auto" made concrete)
- ``metrics.jsonl``  one JSON object per epoch (accuracies are fractions in [0, 1]); with
                     ``probe_every > 0`` also an ``{"epoch": 0, "probe": ...}`` line at init
- ``last.pt``        the state after the latest epoch (model, optimizer, scheduler, RNG
                     states, progress, metrics history, config)
- ``best.pt``        the same for the best epoch, chosen by ``val_acc`` when the run has a
                     validation split, else by ``test_acc``
- ``model.safetensors`` + ``config.json``  the best epoch's model alone, self-described
                     (``pnnh.load(run_dir)``, ``create_model(name, pretrained=run_dir)``;
                     see ``pnnh.models.pretrained``)
- ``result.json``    the ``TrainResult`` of the latest invocation (status "ok"/"diverged")

Every file is replaced atomically, and the metrics log is rebuilt from ``last.pt`` on
resume, so a kill at any moment leaves a run that ``resume=True`` continues exactly: the
data order and augmentation are a pure function of (seed, epoch) and every other source of
randomness is restored from the checkpoint.

Under torchrun (``WORLD_SIZE`` > 1) the same loop runs in every process with
DistributedDataParallel (see ``pnnh.train.distributed``): ``batch_size`` is the global batch,
each rank trains on its ``batch_size / world_size`` slice of every step, evaluates its shard of
the val/test split, and the sums (loss, correct, count) are all-reduced, so the logged metrics
are those of the whole batch and split. Only rank 0 writes files; every rank resumes from rank
0's checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pnnh.io import TEMP_SUFFIX, append_json_line, atomic_write_text, check_creatable_dir, remove_stale_temp_files
from pnnh.models.pretrained import CONFIG_NAME, WEIGHTS_NAME, save_pretrained_files
from pnnh.models.registry import model_arch
from pnnh.train.callbacks import CallbackList
from pnnh.train.loggers import LOGGERS, build_loggers
from pnnh.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from pnnh.train.config import (ConfigError, TrainConfig, default_out_dir, dump_config, load_config, resolve_config,
                               resolve_device, resolve_precision)
from pnnh.train import distributed as ddp
from pnnh.train.distributed import DistributedError, rank_and_world
from pnnh.train.optim import build_optimizer, build_scheduler
from pnnh.train.speed import measured_channels_last

# Fields a resumed run may change; any other difference would splice two different runs.
RESUMABLE_CHANGES = frozenset({"epochs", "max_steps", "device", "precision", "compile", "probe_every", "log", "out",
                               "data_dir", "download", "dist_timeout", "workers", "memory_budget_gb", "imports",
                               "checkpoint_every"})
# Values of fields added after a checkpoint was written: a run saved before them used these.
FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                  if f.default is not dataclasses.MISSING}
PROBE_BATCH = 256  # test images in the fixed probe batch
RUN_FILES = frozenset({"config.yaml", "metrics.jsonl", "last.pt", "best.pt", "result.json", CONFIG_NAME,
                       WEIGHTS_NAME})


@dataclass
class TrainResult:
    """Outcome of ``train``: ``metrics`` is the last epoch's line of metrics.jsonl."""

    out_dir: str
    metrics: dict[str, Any]
    best_acc: float | None
    best_epoch: int
    params: int
    images_per_s: float
    seconds: float
    status: str = "ok"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class TrainingDiverged(RuntimeError):
    """The loss became non-finite; ``result`` has status "diverged", last.pt the last good epoch."""

    def __init__(self, message: str, result: TrainResult) -> None:
        super().__init__(message)
        self.result = result


class _NonFiniteLoss(Exception):
    def __init__(self, batch: int, loss: float) -> None:
        self.batch, self.loss = batch, loss


@dataclass
class _RunState:
    """Where the run is; saved in every checkpoint so a resume continues from it."""

    epoch: int = 0
    step: int = 0
    images: int = 0
    seconds: float = 0.0  # training wall time, summed over epochs (evaluation excluded)
    best_acc: float | None = None
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    # A checkpoint saved inside epoch ``epoch + 1`` (``checkpoint_every``): the steps of it done
    # and their sums (loss * images, correct, images, seconds), so the epoch's record comes out
    # as if it had never stopped.
    epoch_step: int = 0
    epoch_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])


def train(config: TrainConfig | dict | str | Path, *, data: Any = None, resume: bool = False, progress: bool = True,
          callbacks: Iterable[Any] = ()) -> TrainResult:
    """Train the model described by ``config`` and return its ``TrainResult``.

    ``config`` is a ``TrainConfig``, a dict or a YAML path (see ``load_config``). ``data`` (or
    the config's ``data``) is a dataset name, or data of your own held in memory: (images,
    labels) tensors, ``{"train": ..., "test": ...}`` or a ``torch.utils.data.Dataset`` (see
    ``pnnh.data.memory``; the run records it as ``data: in-memory``). Without
    ``resume`` the output directory must be empty or absent; with it, training continues
    after the epoch saved in ``<out>/last.pt``. ``progress`` shows a tqdm bar and one summary
    line per epoch. ``callbacks`` are objects with any of the methods of
    ``pnnh.train.Callback`` (``on_train_start``, ``on_step``, ``on_epoch_end``,
    ``on_train_end``); an exception one raises stops training and propagates. Raises
    ``ConfigError`` for a bad config (before anything is written) and ``TrainingDiverged``
    when the loss becomes non-finite.

    Started by torchrun with several processes, it creates the process group (unless the caller
    already did) and destroys it at the end; ``batch_size`` is then the global batch. A failed
    collective (a rank died or exceeded ``dist_timeout``) raises ``DistributedError``.
    """
    config, data = _split_data(config, data)
    cfg = load_config(config)
    if resume and cfg.out is None:
        raise ConfigError("resume needs the run directory: pass --out DIR (out: in a config)")
    callbacks = list(callbacks)
    loggers = build_loggers(cfg.log, callbacks)  # those --log names and callbacks lack; closed here
    created = ddp.init_distributed(cfg.device, cfg.dist_timeout)
    try:
        return _train(cfg, resume, progress, CallbackList(callbacks + loggers), data)
    except RuntimeError as err:
        if isinstance(err, DistributedError) or not ddp.is_collective_failure(err):
            raise
        raise ddp.collective_failure(err, cfg.dist_timeout) from err
    finally:
        for logger in loggers:
            logger.close()
        if created:
            ddp.destroy_distributed()


@dataclass
class _Run:
    """A run once set up: its config, data, model, optimizer and where it stands."""

    cfg: TrainConfig
    out: Path
    rank: int
    world: int
    device: torch.device
    model: nn.Module
    train_loader: Any
    eval_loaders: dict[str, Any]
    select: str  # the metric that picks best.pt
    steps_per_epoch: int
    total_steps: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    extras: _Extras
    state: _RunState
    num_train: int
    data_source: str  # in memory or streamed, and why
    step_model: nn.Module | None = None
    eval_model: nn.Module | None = None
    params: int = 0
    probe_batch: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _split_data(config: Any, data: Any) -> tuple[Any, Any]:
    """(config, in-memory data or None). In-memory data comes in the config dict or as ``data=``;
    ``data=`` (a name or data) overrides the config's data, as a command-line flag overrides a file."""
    from pnnh.data.memory import IN_MEMORY

    if isinstance(config, Mapping) and not isinstance(config.get("data"), (str, type(None))):
        if data is not None:
            raise ConfigError("data is given twice, in the config and as data=: pass it once")
        config, data = {**config, "data": None}, config["data"]
    if data is None:
        return config, None
    name, data = (data, None) if isinstance(data, str) else (IN_MEMORY, data)
    return load_config(config, overrides={"data": name}), data


def _train(cfg: TrainConfig, resume: bool, progress: bool, callbacks: CallbackList, data: Any = None) -> TrainResult:
    """The body of ``train`` once the process group (if any) exists."""
    run, ckpt = _set_up(cfg, resume, data)
    if ckpt is not None:
        _restore(run, ckpt)
        del ckpt
    _start_files(run, resume)
    _prepare_steps(run)
    cfg, out, is_main = run.cfg, run.out, run.is_main

    say = tqdm.write if progress and is_main else (lambda _msg: None)
    say(f"{cfg.model} ({run.params:,} params) on {cfg.data}: {run.num_train:,} train images {run.data_source}, "
        f"{run.steps_per_epoch} steps/epoch, {cfg.device} {cfg.precision} -> {out}")
    callbacks.on_train_start({"config": cfg, "model": run.model, "out_dir": str(out), "params": run.params,
                              "steps_per_epoch": run.steps_per_epoch, "total_steps": run.total_steps,
                              "start_epoch": run.state.epoch + 1, "rank": run.rank, "world_size": run.world})

    for epoch in range(run.state.epoch + 1, cfg.epochs + 1):
        if run.state.step >= run.total_steps:
            break
        run.train_loader.set_epoch(epoch, start=run.state.epoch_step)  # > 0: resumed inside this epoch
        try:
            stats = _train_epoch(run, epoch, progress and is_main, callbacks)
        except _NonFiniteLoss as err:
            raise _diverged(err, epoch, run.steps_per_epoch, run.state, out, run.params, is_main) from None
        record = _end_epoch(run, epoch, stats)
        say(_summary(record, cfg.epochs))
        callbacks.on_epoch_end(epoch, dict(record))

    result = _result(out, run.state, run.params, "ok")
    if is_main:
        atomic_write_text(out / "result.json", json.dumps(result.to_dict(), indent=2) + "\n")
    ddp.barrier()  # when train returns on any rank, the run's files are complete
    callbacks.on_train_end(result)
    return result


def _set_up(cfg: TrainConfig, resume: bool, data: Any = None) -> tuple[_Run, dict[str, Any] | None]:
    """Check the run directory, then build data, model, loaders, optimizer and schedule.

    Returns the run and, on resume, the checkpoint to restore (None for a fresh start).
    Nothing is written yet: every ``ConfigError`` is raised before the first file.
    """
    from pnnh.models import create_model
    from pnnh.data.streaming import make_loader, split_size

    rank, world = rank_and_world()
    # Every rank names the same directory (a default name holds a timestamp: take rank 0's).
    out = Path(ddp.on_main(lambda: cfg.out or default_out_dir(cfg.model, cfg.data)))
    cfg = dataclasses.replace(cfg, out=str(out))
    batch = ddp.per_rank_batch(cfg.batch_size, world)
    # Rank 0 alone looks at the directory and loads the checkpoint; every rank gets its answer.
    ckpt = ddp.on_main(lambda: _checkpoint_to_resume(out) if resume else _refuse_non_empty(out))

    _seed_everything(cfg.seed)
    splits, stream, source = _load_splits(cfg, data)
    if stream and cfg.workers is None:
        from pnnh.data.streaming import default_workers

        cfg = dataclasses.replace(cfg, workers=default_workers())  # config.yaml says how many ran
    try:
        model = create_model(cfg.model, num_classes=splits.num_classes, in_chans=splits.in_chans,
                             img_size=splits.img_size, **cfg.model_kwargs)
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"cannot build model {cfg.model!r} with model_kwargs {cfg.model_kwargs}: {err}") from err
    model.pretrained_cfg.update(mean=list(splits.mean), std=list(splits.std))  # saved with its weights
    cfg = resolve_config(cfg, model_arch(model), splits.img_size, _channels_last_on_cpu(cfg, model, splits, world),
                         streamed=stream)
    if ckpt is not None:
        _check_resumable(cfg, ckpt["config"], out)
    if cfg.sync_bn:
        model = ddp.convert_sync_batchnorm(model, cfg.device)

    device = ddp.process_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    norm = {"device": device, "channels_last": cfg.channels_last, "rank": rank, "world_size": world,
            "workers": cfg.workers or 0}
    train_loader, eval_loaders = _loaders(cfg, splits, batch, norm)

    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch, total_steps)
    run = _Run(cfg=cfg, out=out, rank=rank, world=world, device=device, model=model, train_loader=train_loader,
               eval_loaders=eval_loaders, select="val_acc" if "val" in eval_loaders else "test_acc",
               steps_per_epoch=steps_per_epoch, total_steps=total_steps, optimizer=optimizer, scheduler=scheduler,
               extras=_Extras(model, cfg, splits, device), state=_RunState(), num_train=split_size(splits, "train"),
               data_source=source)
    if cfg.probe_every > 0:
        probe_loader = make_loader(splits, "test", PROBE_BATCH, train=False, first=PROBE_BATCH,
                                   **{**norm, "workers": 0})
        run.probe_batch = next(iter(probe_loader))
    return run, ckpt


def _channels_last_on_cpu(cfg: TrainConfig, model: nn.Module, splits: Any, world: int) -> bool:
    """What ``channels_last: auto`` picks for a CNN on the CPU: the layout a few training steps
    measured faster for this model, input and batch on this machine (cached; pnnh.train.speed).
    Several processes use the model's width rule instead: their separate measurements could disagree."""
    rule = getattr(model, "prefers_channels_last_on_cpu", True)
    if cfg.channels_last != "auto" or model_arch(model) != "cnn" or resolve_device(cfg.device) != "cpu" or world > 1:
        return rule
    shape = (cfg.batch_size, splits.in_chans, splits.img_size, splits.img_size)
    return measured_channels_last(model, shape, resolve_precision(cfg.precision, "cpu"))


def _load_splits(cfg: TrainConfig, data: Any) -> tuple[Any, bool, str]:
    """The run's data: ``(splits, streamed, where it comes from)``; a ConfigError if it cannot be had."""
    from pnnh.data import load_dataset
    from pnnh.data.memory import IN_MEMORY, memory_splits
    from pnnh.data.streaming import load_streaming, stream_choice

    subsets = {"val_size": cfg.val_size, "seed": cfg.seed, "train_subset": cfg.train_subset,
               "test_subset": cfg.test_subset, "img_size": cfg.img_size}
    if cfg.data == IN_MEMORY:
        if data is None:
            raise ConfigError(f"data {IN_MEMORY!r} names data held in memory: pass it as pnnh.train(config, "
                              "data=(images, labels)) (a resumed run too), or name a dataset")
        try:
            return memory_splits(data, **subsets), False, "(in memory)"
        except ValueError as err:
            raise ConfigError(str(err)) from None
    try:
        stream, source = stream_choice(cfg.stream, cfg.data, cfg.data_dir, cfg.img_size, cfg.memory_budget_gb)
        splits = (load_streaming(cfg.data_dir, **subsets) if stream else
                  load_dataset(cfg.data, data_dir=cfg.data_dir, download=cfg.download, **subsets))
    except (ValueError, OSError) as err:
        raise ConfigError(f"cannot load dataset {cfg.data!r}: {err}") from err
    return splits, stream, source


def _loaders(cfg: TrainConfig, splits: Any, batch: int, norm: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The training loader (this rank's ``batch`` of every step) and one evaluation loader per split."""
    from pnnh.data.streaming import make_loader, split_size

    world = norm["world_size"]
    try:
        train_loader = make_loader(splits, "train", batch, train=True, crop_pad=cfg.crop_pad, seed=cfg.seed, **norm)
    except ValueError:  # a batch larger than the training set
        n = split_size(splits, "train")
        over = f" over {world} processes" if world > 1 else ""
        raise ConfigError(f"batch_size={cfg.batch_size}{over} is more than the {n} training images of {cfg.data!r}: "
                          f"pass --batch-size {n - n % world} or less") from None
    # Evaluation keeps no activations for backward, so it affords twice the batch. Each rank
    # evaluates its shard of the split; _evaluate all-reduces the sums.
    try:
        eval_loaders = {name: make_loader(splits, name, 2 * batch, train=False, **norm)
                        for name in ("val", "test") if split_size(splits, name)}
    except ValueError as err:  # fewer images than ranks
        raise ConfigError(f"cannot split the evaluation data of {cfg.data!r} over {world} processes: {err}") from err
    return train_loader, eval_loaders


def _restore(run: _Run, ckpt: dict[str, Any]) -> None:
    """Continue from a checkpoint: weights, optimizer, schedule, progress and every RNG state."""
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.state = _RunState(**ckpt["state"])
    set_rng_state(ckpt["rng"])


def _start_files(run: _Run, resume: bool) -> None:
    """Write the resolved config; on resume, clear a killed write's leftovers and rebuild the log."""
    if run.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.out / "config.yaml", dump_config(run.cfg))
        if resume:
            remove_stale_temp_files(run.out)
            # Lines logged after last.pt was saved (a kill between the two) are dropped.
            atomic_write_text(run.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in run.state.history))
    ddp.barrier()  # the run directory is set up before any rank goes on


def _prepare_steps(run: _Run) -> None:
    """The models that step and evaluate (DDP-wrapped, compiled), and the probe at init."""
    from pnnh.models import count_params

    run.params = count_params(run.model)
    step_model = ddp.wrap_model(run.model, run.device)
    run.step_model = torch.compile(step_model) if run.cfg.compile else step_model
    # Evaluation runs each rank's shard through the bare model (no DDP collectives, so
    # shards of unequal length are fine) and all-reduces the sums afterwards.
    run.eval_model = (run.step_model if run.world == 1
                      else torch.compile(run.model) if run.cfg.compile else run.model)
    if run.probe_batch is not None and run.state.epoch == 0 and not run.state.history:
        _log(run.out, run.state, {"epoch": 0, "probe": _probe(run.model, run.probe_batch)}, run.is_main)


def _end_epoch(run: _Run, epoch: int, stats: dict[str, float]) -> dict[str, Any]:
    """Evaluate, probe, log the epoch's record and save the checkpoints; return the record."""
    cfg, state = run.cfg, run.state
    record = {"epoch": epoch, "step": state.step, "train_loss": stats["train_loss"],
              "train_acc": stats["train_acc"]}
    ddp.broadcast_buffers(run.model)  # every rank evaluates (and rank 0 saves) the same BatchNorm statistics
    for name, loader in run.eval_loaders.items():
        record[f"{name}_loss"], record[f"{name}_acc"] = _evaluate(run.eval_model, loader, cfg, run.device)
    record.update(lr=stats["lr"], images_per_s=stats["images_per_s"], seconds=state.seconds)
    if run.probe_batch is not None and (epoch % cfg.probe_every == 0 or epoch == cfg.epochs
                                        or state.step >= run.total_steps):
        record["probe"] = _probe(run.model, run.probe_batch)
    state.epoch = epoch
    _log(run.out, state, record, run.is_main)
    improved = state.best_acc is None or record[run.select] > state.best_acc
    if improved:
        state.best_acc, state.best_epoch = record[run.select], epoch
    if run.is_main:
        snapshot = _checkpoint(run.model, run.optimizer, run.scheduler, state, cfg)
        if improved:  # best.pt before last.pt: a kill in between re-runs this epoch identically
            save_checkpoint(run.out / "best.pt", snapshot)
            save_pretrained_files(run.model, run.out)
        save_checkpoint(run.out / "last.pt", snapshot)
    ddp.barrier()  # no rank runs ahead of the saved checkpoint
    return record


class _Extras:
    """The optional training-loss and gradient additions (pnnh.train.regularizers)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, splits: Any, device: torch.device):
        from pnnh.train.regularizers import GradientNoise, Guidance, build_guide

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.noise = GradientNoise(cfg.grad_noise, seed=cfg.seed) if cfg.grad_noise is not None else None
        self.guidance = None
        if cfg.guide is not None:
            guide = build_guide(cfg.guide, num_classes=splits.num_classes, in_chans=splits.in_chans,
                                img_size=splits.img_size).to(device)
            if cfg.channels_last:
                guide.to(memory_format=torch.channels_last)
            self.guidance = Guidance(model, guide, cfg.guide_weight)

    def loss(self, x: torch.Tensor) -> torch.Tensor | float:
        return self.guidance.loss(x) if self.guidance is not None else 0.0

    def after_backward(self, step: int) -> None:
        if self.noise is not None:
            self.noise.add_(self.params, step)


def _train_epoch(run: _Run, epoch: int, show: bool, callbacks: CallbackList) -> dict[str, float]:
    """One pass over the training loader (stopping early at ``total_steps``); updates ``run.state``.

    In a multi-process run each step's loss sum, correct count and batch size are summed over
    the ranks, so the divergence check sees the global loss and every rank stops at the same
    step, and the returned metrics cover the global batch.
    """
    cfg, state, model, step_model, optimizer = run.cfg, run.state, run.model, run.step_model, run.optimizer
    loader, device, extras = run.train_loader, run.device, run.extras
    step_model.train()
    done = state.epoch_step  # steps of this epoch before a mid-epoch checkpoint this run resumed from
    loss_sum, correct, seen, before = state.epoch_sums
    correct, seen = int(correct), int(seen)
    lr = optimizer.param_groups[0]["lr"]
    bar = tqdm(total=len(loader), initial=done, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch",
               leave=False, dynamic_ncols=True, disable=not show)
    start = time.perf_counter()
    for batch, (x, y) in enumerate(loader, start=done + 1):
        ddp.fault_point(state.step + 1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            logits = step_model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing) + extras.loss(x)
        totals = torch.stack([loss.detach().double() * len(y), (logits.argmax(dim=1) == y).sum().double(),
                              torch.tensor(float(len(y)), dtype=torch.float64, device=y.device)])
        # One sync per step (a collective in a multi-process run): catches divergence at the step
        # it happens, on every rank alike.
        step_loss, step_correct, step_seen = ddp.all_reduce_sum(totals).tolist()
        loss_value = step_loss / step_seen
        if not math.isfinite(loss_value):
            bar.close()
            raise _NonFiniteLoss(batch, loss_value)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        extras.after_backward(state.step)
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        run.scheduler.step()
        state.step += 1
        callbacks.on_step(state.step, loss_value)
        loss_sum += step_loss
        correct += int(step_correct)
        seen += int(step_seen)
        bar.update()
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.2%}",
                        img_s=f"{seen / (before + time.perf_counter() - start):.0f}", refresh=False)
        if state.step >= run.total_steps:
            break
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and batch < len(loader):
            state.epoch_step, state.epoch_sums = batch, [loss_sum, correct, seen, before + time.perf_counter() - start]
            _save_last(run)
    seconds = before + time.perf_counter() - start
    bar.close()
    state.seconds += seconds
    state.images += seen
    state.epoch_step, state.epoch_sums = 0, [0.0, 0.0, 0.0, 0.0]
    return {"train_loss": loss_sum / seen, "train_acc": correct / seen, "lr": lr, "images_per_s": seen / seconds}


def _save_last(run: _Run) -> None:
    """Save last.pt inside an epoch (``checkpoint_every``); best.pt and the log wait for its end."""
    if run.is_main:
        save_checkpoint(run.out / "last.pt", _checkpoint(run.model, run.optimizer, run.scheduler, run.state, run.cfg))
    ddp.barrier()  # no rank runs ahead of the saved checkpoint


@torch.no_grad()
def _evaluate(step_model: nn.Module, loader: Any, cfg: TrainConfig, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy (no label smoothing) and accuracy over a whole split.

    ``loader`` yields this rank's shard; the sums are all-reduced over the ranks.
    """
    step_model.eval()
    totals = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, correct, seen
    for x, y in loader:
        if not len(y):  # a rank's share of the last step can be empty
            continue
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            logits = step_model(x)
        totals[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
        totals[1] += (logits.argmax(dim=1) == y).sum()
        totals[2] += len(y)
    step_model.train()
    loss_sum, correct, seen = ddp.all_reduce_sum(totals).tolist()
    return loss_sum / seen, correct / seen


def _probe(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """``pnnh.probe.probe_summary`` on the fixed batch, with no effect on training.

    The probe leaves the model as it found it; the global RNG streams are forked around
    it as well, so a run is the same with or without probes.
    """
    from pnnh.probe import probe_summary

    x, y = batch
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        return _jsonable(probe_summary(model, x, y))


def _log(out: Path, state: _RunState, record: dict[str, Any], is_main: bool) -> None:
    state.history.append(record)
    if is_main:
        append_json_line(out / "metrics.jsonl", record)


def _checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, state: _RunState,
                cfg: TrainConfig) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": dataclasses.asdict(state),
        "rng": rng_state(),
        "config": cfg.to_dict(),
    }


def _checkpoint_to_resume(out: Path) -> dict[str, Any] | None:
    """last.pt of ``out``; None for a run killed before its first checkpoint (it restarts)."""
    path = out / "last.pt"
    if path.is_file():
        return load_checkpoint(path)
    # The loggers' folders (tensorboard/, wandb/) are made at the start of training.
    if (out / "config.yaml").is_file() and all(p.name in RUN_FILES or p.name in LOGGERS
                                               or p.name.endswith(TEMP_SUFFIX) for p in out.iterdir()):
        return None
    raise ConfigError(f"cannot resume: {path} does not exist and {out} is not a pnnh run directory; "
                      "check --out, or start a new run without --resume")


def _refuse_non_empty(out: Path) -> None:
    """A new run needs ``out`` empty or absent, and creatable: refused now, before any data is read."""
    try:
        check_creatable_dir(out)
    except OSError as err:  # /proc, a read-only disk, a path under a file: one line, nothing made
        raise ConfigError(f"--out {out}: {err}") from None
    if out.exists() and any(out.iterdir()):
        entries = sorted(p.name for p in out.iterdir())[:5]
        listing = f" (contains {', '.join(entries)}{', ...' if len(entries) == 5 else ''})"
        raise ConfigError(f"output directory {out} is not empty{listing}; pass --resume to continue that run "
                          "or choose another --out")


def _check_resumable(cfg: TrainConfig, saved: dict[str, Any], out: Path) -> None:
    changed = [f"{k}: {saved.get(k, FIELD_DEFAULTS.get(k))!r} -> {v!r}" for k, v in cfg.to_dict().items()
               if k not in RESUMABLE_CHANGES and saved.get(k, FIELD_DEFAULTS.get(k)) != v]
    if changed:
        raise ConfigError(f"cannot resume {out}: the config differs from the checkpoint's in "
                          f"{'; '.join(changed)}. Only {', '.join(sorted(RESUMABLE_CHANGES))} may change on resume.")


def _diverged(err: _NonFiniteLoss, epoch: int, steps_per_epoch: int, state: _RunState, out: Path,
              params: int, is_main: bool) -> TrainingDiverged:
    kept = (f"{out / 'last.pt'} keeps the last good state (epoch {state.epoch}"
            f"{f' and {state.epoch_step} steps of epoch {state.epoch + 1}' if state.epoch_step else ''})"
            if state.epoch or state.epoch_step else "no epoch finished, so there is no checkpoint")
    message = (f"training diverged: loss = {err.loss} at epoch {epoch}, batch {err.batch}/{steps_per_epoch} "
               f"(global step {state.step + 1}); {kept}. "
               "Try a lower --lr, a longer --warmup-epochs or --grad-clip.")
    result = _result(out, state, params, "diverged")
    if is_main:
        atomic_write_text(out / "result.json", json.dumps({**result.to_dict(), "error": message}, indent=2) + "\n")
    return TrainingDiverged(message, result)


def _result(out: Path, state: _RunState, params: int, status: str) -> TrainResult:
    epochs = [r for r in state.history if "train_loss" in r]
    return TrainResult(
        out_dir=str(out),
        metrics=epochs[-1] if epochs else {},
        best_acc=state.best_acc,
        best_epoch=state.best_epoch,
        params=params,
        images_per_s=state.images / state.seconds if state.seconds else 0.0,
        seconds=state.seconds,
        status=status,
    )


def _summary(record: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}", f"train loss {record['train_loss']:.4f} acc {record['train_acc']:.2%}"]
    parts += [f"{name} loss {record[f'{name}_loss']:.4f} acc {record[f'{name}_acc']:.2%}"
              for name in ("val", "test") if f"{name}_acc" in record]
    parts += [f"lr {record['lr']:.3g}", f"{record['images_per_s']:.0f} img/s", f"{record['seconds']:.1f}s"]
    return " | ".join(parts)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _jsonable(value: Any) -> Any:
    """Probe output as strict JSON: tensors/arrays to lists, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
