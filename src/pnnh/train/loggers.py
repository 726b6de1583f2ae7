"""Experiment tracking: a run's metrics sent to TensorBoard or W&B while it trains.

    pnnh train --model pnnh20 --data digits --log tensorboard --out runs/p20
    tensorboard --logdir runs                        # every run with --log tensorboard

    pnnh.train(config, callbacks=[TensorBoardLogger()])   # the same from Python

``metrics.jsonl`` stays the run's record; a logger is a view of it in a dashboard. A logger is
a training callback (:mod:`pnnh.train.callbacks`) that turns the trainer's hooks into three
calls a backend implements: ``log_scalars(step, scalars)``, ``log_hparams(config, metrics)``
and ``close()`` (and ``log_curve`` for a curve over layers). To plug in another tracker
(MLflow, ...), subclass :class:`Logger`, implement those, and pass an instance in
``callbacks=``. What is logged, every value against the global optimizer step:

- every step: ``train/loss``, the step's training loss over the whole batch;
- every epoch: ``epoch/<key>`` for each number of the epoch's metrics.jsonl record
  (``train_loss``, ``test_acc``, ``lr``, ``images_per_s``, ...) and ``probe/<key>`` for the
  dissipating-inputs summary when ``probe_every`` computed one;
- at the end of a completed run: the resolved config as hyperparameters, with ``final/<key>``
  (``best_acc`` and the last epoch's numbers) as their metrics;
- in a sweep, each cell's similarity-to-input curves at init and after training:
  ``probe_curve/<init|end>/<cka|cka_noise|survival>``, one point per layer (x = layer index).

Only rank 0 of a multi-process run logs. The trainer closes the loggers it made from the
config's ``log``; a logger passed in ``callbacks=`` is the caller's to close (after logging
more, as a sweep does with its probe curves).
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from pnnh.train.callbacks import Callback
from pnnh.train.config import ConfigError, parse_log

HINTS = {"tensorboard": "pip install 'pnnh[track]' (tensorboard)", "wandb": "pip install wandb"}


class Logger(Callback):
    """A tracking backend driven by the trainer's callbacks.

    ``dir`` is where the backend writes; ``None`` means :meth:`default_dir` of the run
    directory, known once training starts. A subclass implements :meth:`open` and the three
    logging methods.
    """

    name = "logger"

    def __init__(self, dir: str | Path | None = None):
        self.dir = Path(dir) if dir is not None else None
        self.step = 0
        self.config: dict[str, Any] = {}
        self.active = False

    # -- what a backend implements ------------------------------------------------------------

    def default_dir(self, run_dir: Path) -> Path:
        return run_dir / self.name

    def open(self, dir: Path, config: dict[str, Any]) -> None:
        """Start writing to ``dir``; ``config`` is the run's resolved config (plain data)."""
        raise NotImplementedError

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        raise NotImplementedError

    def log_hparams(self, config: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        raise NotImplementedError

    def log_curve(self, tag: str, values: list[float]) -> None:
        """A curve over layers (x = layer index); by default one scalar per layer."""
        for i, value in enumerate(values):
            if _is_number(value):
                self.log_scalars(i, {tag: value})

    def log_probe_curves(self, curves: Mapping[str, Mapping[str, Any]]) -> None:
        """A run's probe curves, ``{stage: {measure: [one value per layer]}}`` (as a sweep
        computes them after training), as ``probe_curve/<stage>/<measure>``."""
        if self.active:
            for stage, measures in curves.items():
                for measure, values in measures.items():
                    if measure != "layers" and isinstance(values, list):
                        self.log_curve(f"probe_curve/{stage}/{measure}", values)

    def close(self) -> None:
        self.active = False

    # -- the trainer's callbacks ------------------------------------------------------------

    def on_train_start(self, info: dict[str, Any]) -> None:
        if info.get("rank", 0) != 0:
            return
        cfg = info["config"]
        self.config = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        if not self.active:
            self.open(self.dir or self.default_dir(Path(info["out_dir"])), self.config)
            self.active = True

    def on_step(self, step: int, loss: float) -> None:
        if self.active:
            self.step = step
            self.log_scalars(step, {"train/loss": loss})

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        if self.active:
            self.step = record.get("step", self.step)
            self.log_scalars(self.step, epoch_scalars(record))

    def on_train_end(self, result: Any) -> None:
        if self.active:
            metrics = {"best_acc": result.best_acc, **result.metrics}
            self.log_hparams(self.config, {f"final/{k}": v for k, v in metrics.items()
                                           if k not in ("epoch", "step") and _is_number(v)})


class TensorBoardLogger(Logger):
    """TensorBoard event files (``torch.utils.tensorboard``), by default in ``<run>/tensorboard/``."""

    name = "tensorboard"

    def open(self, dir: Path, config: dict[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError(f"--log tensorboard needs the tensorboard package: {HINTS['tensorboard']}") from None
        self.writer = SummaryWriter(log_dir=str(dir))

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def log_hparams(self, config: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams

        # Written into this run's own event file (SummaryWriter.add_hparams would open a new
        # sub-directory per call), then the metrics as scalars under the same tags: the
        # HParams dashboard reads a metric's value from the run's scalar of that tag.
        writer = self.writer._get_file_writer()
        for summary in hparams(flat_hparams(config), dict(metrics)):
            writer.add_summary(summary)
        self.log_scalars(self.step, metrics)

    def close(self) -> None:
        if self.active:
            self.writer.close()
        super().close()


class WandbLogger(Logger):
    """Weights & Biases in ``<dir>/wandb/`` (by default the run directory); offline unless
    ``WANDB_MODE`` says otherwise.

    Offline runs need no account or network; ``wandb sync <run>/wandb/offline-run-*``
    uploads them later. A run directory keeps one W&B run id: a resumed pnnh run (and a
    sweep's probe curves) log to the same W&B run.
    """

    name = "wandb"

    def __init__(self, dir: str | Path | None = None, project: str = "pnnh", **init_kwargs: Any):
        super().__init__(dir)
        self.project, self.init_kwargs = project, init_kwargs

    def default_dir(self, run_dir: Path) -> Path:
        return run_dir  # wandb adds its own wandb/ folder

    def open(self, dir: Path, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise ImportError(f"--log wandb needs the wandb package: {HINTS['wandb']}") from None
        dir.mkdir(parents=True, exist_ok=True)
        kwargs = {"project": self.project, "name": Path(config.get("out") or dir).name,
                  "id": _previous_wandb_id(dir), "mode": os.environ.get("WANDB_MODE", "offline"),
                  "settings": wandb.Settings(console="off", silent=True), **self.init_kwargs}
        self.run = wandb.init(dir=str(dir), config=config, reinit="create_new", **kwargs)

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log(dict(scalars), step=step)

    def log_hparams(self, config: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)
        self.run.summary.update(dict(metrics))

    def log_curve(self, tag: str, values: list[float]) -> None:
        # W&B's step axis only moves forward: a curve over layers goes to the summary.
        self.run.summary[tag] = list(values)

    def close(self) -> None:
        if self.active:
            self.run.finish()
        super().close()


LOGGERS = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}  # one per config.TRACKERS


def build_loggers(log: str | None, callbacks: Iterable[Any] = ()) -> list[Logger]:
    """The loggers a config's ``log`` names, writing under the run directory, less those of a
    backend already among ``callbacks`` (a logger passed in, e.g. with another ``dir``, wins).

    Raises ``ConfigError`` naming the install command when a backend's package is missing,
    so a run fails before it writes anything rather than after its setup.
    """
    given = {c.name for c in callbacks if isinstance(c, Logger)}
    names = [name for name in (parse_log(log) or "").split(",") if name and name not in given]
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"--log {name} needs the {name} package: {HINTS[name]}")
    return [LOGGERS[name]() for name in names]


def epoch_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl record: ``epoch/<key>``, ``probe/<key>`` for the probe summary."""
    scalars = {f"epoch/{k}": v for k, v in record.items() if k != "step" and _is_number(v)}
    probe = record.get("probe") or {}
    scalars.update({f"probe/{k}": v for k, v in probe.items() if _is_number(v)})
    return scalars


def flat_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config as TensorBoard hyperparameters: nested keys joined by dots, values that are not
    numbers, strings or booleans (None, lists) as text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flat_hparams(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _previous_wandb_id(dir: Path) -> str | None:
    """The id of the W&B run already in ``dir/wandb`` (its folders are ``*run-<time>-<id>``)."""
    runs = sorted(dir.glob("wandb/*run-*-*"))
    return runs[-1].name.rsplit("-", 1)[-1] if runs else None
