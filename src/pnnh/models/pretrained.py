"""Self-describing weights: a model as ``model.safetensors`` + ``config.json`` in one folder.

The layout is the one ``huggingface_hub`` expects of a model repository, so the same folder is
what ``pnnh train`` writes beside its checkpoints, what ``save_pretrained`` writes and uploads,
and what ``create_model(name, pretrained=FOLDER)`` or ``pnnh.load(FOLDER)`` read back.
``config.json`` is the model's ``pretrained_cfg`` (timm's name for it)::

    {"model": "pnnh20", "model_kwargs": {"coder_ratio": 0.5}, "num_classes": 10, "in_chans": 1,
     "img_size": 28, "input_size": [1, 28, 28], "mean": [0.286], "std": [0.353],
     "pnnh_version": "0.1.0"}

``mean``/``std`` are the per-channel normalisation of the training data in pixel/255 units
(``None`` for a model never trained by ``pnnh train``): feed the model ``(x / 255 - mean) / std``.
Reading never runs code: safetensors holds tensors only, the config is JSON.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from pnnh.io import atomic_write, atomic_write_text, package_version

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
SHAPE_KEYS = ("num_classes", "in_chans", "img_size")


def model_config(name: str, kwargs: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The ``pretrained_cfg`` of a model built by ``create_model(name, **kwargs)``.

    The shape comes from ``kwargs`` where given, else from what the model records of its
    constructor's defaults (``num_classes``, ``in_chans``, ``img_size`` attributes).
    """
    shape = {k: kwargs.get(k, getattr(model, k, None)) for k in SHAPE_KEYS}
    c, s = shape["in_chans"], shape["img_size"]
    return {"model": name, "model_kwargs": {k: v for k, v in kwargs.items() if k not in SHAPE_KEYS}, **shape,
            "input_size": [c, s, s] if c and s else None, "mean": None, "std": None}


def save_pretrained_files(model: nn.Module, directory: str | Path) -> None:
    """Write ``model.safetensors`` and ``config.json`` (``model.pretrained_cfg``) into ``directory``.

    Each file is replaced atomically; a parameter shared by several layers (a PNNH coder) is
    stored once. Raises ``ValueError`` for a model that ``create_model`` did not build (it has
    no ``pretrained_cfg`` saying how to rebuild it).
    """
    from safetensors.torch import save

    cfg = getattr(model, "pretrained_cfg", None)
    if not cfg or not cfg.get("model"):
        raise ValueError(f"{type(model).__name__} has no pretrained_cfg naming its registered model: "
                         "build it with pnnh.create_model(...) so that it can be saved and rebuilt")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: t.detach().cpu().contiguous() for k, t in _unique_tensors(model.state_dict()).items()}
    blob = save(tensors, metadata={"format": "pt"})  # "pt": the Hub's tag for PyTorch weights
    atomic_write(directory / WEIGHTS_NAME, lambda f: f.write(blob))
    config = {**cfg, "pnnh_version": package_version()}
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2) + "\n")


def is_pretrained_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding both ``config.json`` and ``model.safetensors``."""
    return (Path(path) / CONFIG_NAME).is_file() and (Path(path) / WEIGHTS_NAME).is_file()


def read_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a saved-model folder, checked to name a model and its shape."""
    file = Path(path) / CONFIG_NAME
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {file}: {err}") from err
    missing = [k for k in ("model", *SHAPE_KEYS) if not isinstance(config, dict) or k not in config]
    if missing:
        raise ValueError(f"{file} is not a pnnh model config: it lacks {missing}")
    return config


def load_pretrained(build: Callable[..., nn.Module], name: str, path: str | Path, kwargs: dict[str, Any]) -> nn.Module:
    """``create_model(name, pretrained=path, **kwargs)``: the saved model, re-headed and adapted.

    ``build(name, kwargs)`` builds a registered model. The model is rebuilt from the saved
    config with ``kwargs`` on top; a different ``num_classes`` gets a freshly initialised head
    (with a warning), a different ``in_chans`` an adapted input layer (summed over the saved
    channels for 1, else the saved channels repeated and scaled, as timm does), refused where
    the input layer does not see channels (an MLP sees flattened pixels).
    """
    path = Path(path)
    if not is_pretrained_dir(path):
        raise ValueError(f"pretrained={str(path)!r} is not a folder holding {CONFIG_NAME} and {WEIGHTS_NAME} "
                         "(a pnnh train run directory, or a save_pretrained folder)")
    config = read_config(path)
    if config["model"] != name:
        raise ValueError(f"{path} holds a {config['model']!r} model, not {name!r}: use "
                         f"create_model({config['model']!r}, pretrained=...) or pnnh.load({str(path)!r})")
    from safetensors.torch import load_file

    kwargs = dict(kwargs)
    num_classes = kwargs.pop("num_classes", config["num_classes"])  # the head is replaced after loading
    saved_chans = config["in_chans"]
    merged = {**config["model_kwargs"], **{k: config[k] for k in SHAPE_KEYS}, **kwargs}
    model = build(name, merged)
    state = load_file(str(path / WEIGHTS_NAME))
    if merged["in_chans"] != saved_chans:
        state = adapt_input_channels(state, model.state_dict(), saved_chans, merged["in_chans"], name)
    try:
        load_state(model, state)
    except RuntimeError as err:
        changed = {k: v for k, v in kwargs.items() if config.get(k, config["model_kwargs"].get(k)) != v}
        raise ValueError(f"the weights in {path} do not fit {name} built with {changed}: {err}") from None
    model.pretrained_cfg.update(mean=config.get("mean"), std=config.get("std"))
    if num_classes != config["num_classes"]:
        warnings.warn(f"{name} from {path}: the saved head has {config['num_classes']} classes; "
                      f"a new head for num_classes={num_classes} is initialised at random (train it)",
                      stacklevel=3)
        model.reset_classifier(num_classes)
    return model


def adapt_input_channels(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], old: int, new: int,
                         name: str) -> dict[str, torch.Tensor]:
    """``state`` with every input-layer kernel (a 4-D tensor whose dim 1 goes from ``old`` to
    ``new`` channels in ``target``) made to take ``new`` input channels, the way timm adapts."""
    adapted = dict(state)
    for key, saved in state.items():
        want = target.get(key)
        if want is None or saved.ndim != 4 or saved.shape[1] != old or want.shape[1] != new:
            continue
        if new == 1:
            adapted[key] = saved.sum(1, keepdim=True)
        else:  # cycle the saved channels; scale so the summed response to a constant image is kept
            adapted[key] = saved.repeat(1, math.ceil(new / old), 1, 1)[:, :new] * (old / new)
    if all(adapted[k] is state[k] for k in state):
        raise ValueError(f"cannot adapt {name} from in_chans={old} to in_chans={new}: its input layer has no "
                         f"kernel over {old} channels (an MLP sees flattened pixels); train it for {new} channels")
    return adapted


def load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state)`` for a state saved with each shared tensor once.

    Raises ``RuntimeError`` (as ``load_state_dict`` does) for unexpected keys, or for a
    missing key that is not another name of a loaded tensor.
    """
    result = model.load_state_dict(state, strict=False)
    own = model.state_dict()
    aliases: dict[tuple, set[str]] = {}
    for key, t in own.items():
        aliases.setdefault(_storage_key(t), set()).add(key)
    missing = [k for k in result.missing_keys if not aliases[_storage_key(own[k])] & state.keys()]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"missing keys {missing[:5]}, unexpected keys {result.unexpected_keys[:5]}")


def _unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` keeping the first name of each tensor that several names share."""
    seen, unique = set(), {}
    for key, t in state.items():
        if _storage_key(t) not in seen:
            seen.add(_storage_key(t))
            unique[key] = t
    return unique


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
