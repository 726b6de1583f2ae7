"""A registry of named model constructors: ``create_model("pnnh56", num_classes=10)``."""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_FIXED: dict[str, dict] = {}  # keyword arguments a registered name pins (e.g. depth for pnnh56)
SIZE_ARGS = ("depth", "width", "num_classes", "in_chans", "img_size")  # timm's shared sizes: positive ints


class UnknownModelError(ValueError):
    """Raised by :func:`create_model` for a name that is not registered."""


def register_model(name: str, fn: Callable[..., nn.Module], **fixed) -> None:
    """Register ``fn`` under ``name``; ``fixed`` keyword arguments are pinned by the name."""
    if name in _MODELS:
        raise ValueError(f"model name {name!r} is already registered")
    _MODELS[name] = fn
    _FIXED[name] = fixed


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, sorted naturally."""
    names = [n for n in _MODELS if fnmatch.fnmatchcase(n, pattern)]
    return sorted(names, key=_natural_key)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the model registered as ``name``; ``kwargs`` go to its constructor.

    Raises :class:`UnknownModelError` listing the closest names when ``name`` is unknown.
    """
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=5, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}{hint}. pnnh.list_models() lists all {len(_MODELS)} models"
        )
    for key, value in _FIXED[name].items():
        if key in kwargs and kwargs[key] != value:
            base = name.rstrip("0123456789")
            raise ValueError(
                f"model {name!r} fixes {key}={value}; got {key}={kwargs[key]}. "
                f"Use create_model({base!r}, {key}={kwargs[key]}) for another {key}"
            )
    for key in SIZE_ARGS:  # caught here, one clear line, rather than as a tensor-shape error deep inside
        value = kwargs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key}={value!r} is not valid for {name!r}: it must be an integer >= 1")
    model = _MODELS[name](**{**kwargs, **_FIXED[name]})
    model.model_name = name
    return model


def count_params(model: nn.Module) -> int:
    """Number of unique parameters: a coder shared by several layers counts once."""
    return sum(p.numel() for p in model.parameters())


def _natural_key(name: str):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
