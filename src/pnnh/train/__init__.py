"""Training engine: config, trainer loop, optimizers/schedules, checkpoints, callbacks.

``train(config, callbacks=...)`` runs one training run end to end; ``load_config`` validates a
config; see ``pnnh.train.trainer`` for the files a run writes and ``pnnh.train.callbacks`` for
the hooks a callback may have.
"""
from __future__ import annotations

import sys

from pnnh.train.callbacks import Callback
from pnnh.train.config import ConfigError, TrainConfig, load_config, resolve_config
from pnnh.train.trainer import TrainingDiverged, TrainResult, train

__all__ = ["Callback", "ConfigError", "TrainConfig", "TrainResult", "TrainingDiverged", "load_config",
           "resolve_config", "train"]


class _CallableModule(type(sys.modules[__name__])):
    """Lets ``pnnh.train(config)`` run :func:`train` while ``pnnh.train.*`` stays a package."""

    def __call__(self, *args, **kwargs) -> TrainResult:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
