"""Training callbacks: user code the trainer calls at fixed points of a run.

A callback is any object with some of the methods of :class:`Callback`; subclassing it is
optional and a method it lacks is simply not called. Pass them as
``pnnh.train(config, callbacks=[...])``. The trainer calls, in this order:

- ``on_train_start(info)`` once, after the run is set up (checkpoint restored on resume) and
  before the first step. ``info`` holds ``config`` (the resolved ``TrainConfig``), ``model``
  (the ``nn.Module`` being trained), ``out_dir``, ``params``, ``steps_per_epoch``,
  ``total_steps``, ``start_epoch`` (the first epoch this call trains) and ``rank`` /
  ``world_size``;
- ``on_step(step, loss)`` after every optimizer step: ``step`` is the global step count
  (1 after the first step of a run), ``loss`` the step's training loss over the whole batch;
- ``on_epoch_end(epoch, record)`` after the epoch is evaluated, logged and checkpointed:
  ``record`` is the dict written to metrics.jsonl for that epoch;
- ``on_train_end(result)`` with the ``TrainResult`` once the run completed (not when it
  diverged or a callback raised).

An exception a callback raises stops training and propagates out of ``train`` unchanged
(e.g. Optuna's ``TrialPruned`` from ``on_epoch_end``); the run directory then holds the
checkpoint of the last finished epoch, so ``resume=True`` can continue it. In a multi-process
run every process calls its callbacks.
"""
from __future__ import annotations

from typing import Any, Iterable

HOOKS = ("on_train_start", "on_step", "on_epoch_end", "on_train_end")


class Callback:
    """The callback protocol, with every method a no-op: subclass it and override what you need."""

    def on_train_start(self, info: dict[str, Any]) -> None:
        """Once, before the first step of this call."""

    def on_step(self, step: int, loss: float) -> None:
        """After every optimizer step."""

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        """After every epoch, with its metrics.jsonl record."""

    def on_train_end(self, result: Any) -> None:
        """Once, with the ``TrainResult`` of a completed run."""


class CallbackList:
    """Calls one hook on every callback that has it, in the order given."""

    def __init__(self, callbacks: Iterable[Any] = ()) -> None:
        self.callbacks = list(callbacks)
        # Bound methods looked up once: on_step runs every step.
        self.hooks = {name: [getattr(c, name) for c in self.callbacks if callable(getattr(c, name, None))]
                      for name in HOOKS}

    def on_train_start(self, info: dict[str, Any]) -> None:
        for hook in self.hooks["on_train_start"]:
            hook(info)

    def on_step(self, step: int, loss: float) -> None:
        for hook in self.hooks["on_step"]:
            hook(step, loss)

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        for hook in self.hooks["on_epoch_end"]:
            hook(epoch, record)

    def on_train_end(self, result: Any) -> None:
        for hook in self.hooks["on_train_end"]:
            hook(result)
