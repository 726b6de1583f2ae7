"""``pnnh.load(path)``: a trained model, ready to run, from a run directory or a saved folder.

    model = pnnh.load("runs/p20")          # eval mode, on the CPU; the dataset is never read
    model.pretrained_cfg["mean"]           # how to normalise its inputs

The one loader of the project: ``pnnh export``, ``pnnh probe --checkpoint``, ``--guide
MODEL:RUN`` and the sweep's probe curves all rebuild runs through it, with one rule for which
weights a run gives:

- ``which="best"`` (the default): the best epoch's weights (by ``val_acc``, else ``test_acc``):
  ``model.safetensors``, which the trainer writes with ``best.pt``; for a run saved before
  that file existed, ``best.pt``, else ``last.pt``;
- ``which="last"``: the latest epoch's weights, ``last.pt``.

and one rule for the model's description: ``config.json`` (see :mod:`pnnh.models.pretrained`);
for a run saved before it, the training config inside the checkpoint, the class count read off
the head's weight and the input shape of the run's dataset (``NATIVE_INPUT``, or the run's
``img_size``); such a model's ``mean``/``std`` are unknown (``None``). Every ``.pt`` file is read
through :func:`pnnh.train.checkpoint.load_checkpoint` (tensors only, never code).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn
import yaml
from safetensors import SafetensorError

from pnnh.models import create_model
from pnnh.models.registry import is_model
from pnnh.models.pretrained import CONFIG_NAME, WEIGHTS_NAME, is_pretrained_dir, read_config
from pnnh.train.checkpoint import CheckpointError, load_checkpoint, run_checkpoint

WHICH = ("best", "last")
# (channels, side) of each built-in dataset's images, for runs saved before config.json existed.
NATIVE_INPUT = {"fashion-mnist": (1, 28), "mnist": (1, 28), "digits": (1, 8), "cifar10": (3, 32),
                "cifar100": (3, 32), "folder": (3, 32), "synthetic": (3, 32)}


def load(path: str | Path, which: str = "best") -> nn.Module:
    """The model saved at ``path`` (a ``pnnh train`` run directory, a ``save_pretrained``
    folder or a run's ``.pt`` checkpoint), in eval mode on the CPU; ``which``: see the module
    docstring. Raises ``CheckpointError`` (one line, naming the path) when nothing there loads."""
    file = weights_file(path, which)
    if file.name == WEIGHTS_NAME:
        try:
            name = read_config(file.parent)["model"]
            known = is_model(name)
            if known:
                return create_model(name, pretrained=file.parent).eval()
        except (ValueError, RuntimeError, OSError, SafetensorError) as err:
            raise CheckpointError(f"cannot load the model saved in {file.parent}: {str(err).splitlines()[0]}") from None
        raise CheckpointError(_unknown_model(name, file.parent))
    saved = load_checkpoint(file)
    config = read_config(file.parent) if (file.parent / CONFIG_NAME).is_file() else _legacy_config(saved, file)
    if not is_model(config["model"]):
        raise CheckpointError(_unknown_model(config["model"], file.parent))
    try:
        model = create_model(config["model"], num_classes=config["num_classes"], in_chans=config["in_chans"],
                             img_size=config["img_size"], **config["model_kwargs"])
        model.load_state_dict(saved["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot rebuild {config['model']!r} from {file}: {str(err).splitlines()[0]}") from None
    model.pretrained_cfg.update(mean=config.get("mean"), std=config.get("std"))
    return model.float().eval()


def _unknown_model(name: str, folder: Path) -> str:
    """Why a saved model cannot be rebuilt: its name is not registered in this process. Loading
    never runs code, so the modules the run imported (its config.yaml's ``imports``) are named,
    not imported."""
    imports = []
    try:
        imports = (yaml.safe_load((folder / "config.yaml").read_text()) or {}).get("imports") or []
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    where = (f"the run imported it from {', '.join(map(str, imports))}: import that first (loading runs no code)"
             if imports else "import the module that registers it (register_model) first")
    return f"cannot load the model saved in {folder}: model {name!r} is not registered here; {where}"


def weights_file(path: str | Path, which: str = "best") -> Path:
    """The file ``load(path, which)`` reads its weights from."""
    if which not in WHICH:
        raise ValueError(f"which={which!r} is not valid; choose one of {WHICH}")
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist (give a run directory, a saved model folder or a .pt file)")
    if which == "best" and is_pretrained_dir(path):
        return path / WEIGHTS_NAME
    names = ("best.pt", "last.pt") if which == "best" else ("last.pt",)
    file = run_checkpoint(path, names)
    if file is None:
        has = f"{WEIGHTS_NAME} and {CONFIG_NAME}" if which == "best" else " or ".join(names)
        raise CheckpointError(f"{path} holds no trained model: it has no {has} (a run directory is the --out "
                              "of pnnh train; a run killed before its first epoch saved none)")
    return file


def _legacy_config(saved: dict[str, Any], file: Path) -> dict[str, Any]:
    """The model description of a checkpoint written before runs had ``config.json``."""
    cfg = saved.get("config") or {}
    head = saved["model"].get("head.weight")
    if "model" not in cfg or cfg.get("data") not in NATIVE_INPUT or head is None:
        raise CheckpointError(f"{file} does not say how to rebuild its model (no {CONFIG_NAME} beside it, and "
                              f"its training config names no built-in dataset); load it with create_model(...) "
                              "and load_state_dict")
    in_chans, side = NATIVE_INPUT[cfg["data"]]
    return {"model": cfg["model"], "model_kwargs": cfg.get("model_kwargs") or {}, "num_classes": head.shape[0],
            "in_chans": in_chans, "img_size": cfg.get("img_size") or side}
