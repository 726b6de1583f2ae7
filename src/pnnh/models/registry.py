"""A registry of named model constructors: ``create_model("pnnh56", num_classes=10)``."""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch.nn as nn

from pnnh.models.features import FeatureExtractor
from pnnh.models.layers import as_annotated
from pnnh.models.pretrained import load_pretrained, model_config

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_FIXED: dict[str, dict] = {}  # keyword arguments a registered name pins (e.g. depth for pnnh56)
# timm's shared sizes, checked once here (depth is each model's to check: it names the valid depths)
SIZE_ARGS = ("width", "num_classes", "in_chans", "img_size")


class UnknownModelError(ValueError):
    """Raised by :func:`create_model` for a name that is not registered."""


_PREFIXES: dict[str, Callable[[str, dict], nn.Module]] = {}  # "convert:" -> builds "convert:NAME" from NAME


def register_model(name: str | Callable[..., nn.Module] | None = None, fn: Callable[..., nn.Module] | None = None,
                   **fixed):
    """Register a model constructor under a name; ``fixed`` keyword arguments are pinned by the name.

    A call, or a decorator as in timm (the constructor is returned unchanged)::

        register_model("pnnh56", cifar_pnnh, depth=56)
        @register_model                   # registered as "my_net"
        def my_net(num_classes=10, in_chans=3, **kwargs): ...
        @register_model("my-net-8", depth=8)
        def my_net_any_depth(depth, **kwargs): ...

    ``create_model`` passes ``num_classes``, ``in_chans`` and ``img_size`` when ``pnnh train``
    builds the model, so a constructor should accept them (or ``**kwargs``).
    """
    if callable(name):  # @register_model without arguments
        return register_model(name.__name__, name, **fixed)
    if fn is None:
        return lambda f: register_model(f.__name__ if name is None else name, f, **fixed)
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"model name {name!r} is not valid: use a non-empty string without ':' "
                         "(':' is for model specs such as 'convert:NAME', the PNNH twin of a registered model)")
    if not callable(fn):
        raise TypeError(f"register_model({name!r}, fn): fn must be a callable that builds the model, "
                        f"got {type(fn).__name__}")
    if name in _MODELS:
        raise ValueError(f"model name {name!r} is already registered")
    _MODELS[name] = fn
    _FIXED[name] = fixed
    return fn


def register_prefix(prefix: str, build: Callable[[str, dict], nn.Module]) -> None:
    """Make ``create_model(prefix + NAME, **kwargs)`` return ``build(NAME, kwargs)`` for a registered
    NAME (:mod:`pnnh.models.convert` registers ``convert:``, the PNNH twin of a model)."""
    _PREFIXES[prefix] = build


class ModelImportError(ValueError):
    """Raised by :func:`import_models` for a module that cannot be found or fails on import."""


def import_models(entries: str | Sequence[str] | None) -> list[str]:
    """Import the modules that register a user's models, so ``create_model`` (and ``pnnh train``,
    ``pnnh sweep``, ``pnnh tune`` with ``--import``) know their names; return the entries as kept.

    Each entry is a module name (``mynet``, ``lab.models``: found on ``sys.path`` and in the
    current directory, as ``python -m`` would) or the path of a Python file (``models/mynet.py``,
    imported as module ``mynet`` and kept as an absolute path, so a resumed run finds it from
    any directory). A module already imported is not run again, so its ``register_model`` calls
    run once. Raises :class:`ModelImportError` naming the entry: missing module or file, or the
    exception the module raised (the names it registered before raising are removed again).
    """
    if entries is None:
        return []
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, (list, tuple)) or not all(isinstance(e, str) and e.strip() for e in entries):
        raise ModelImportError(f"imports={entries!r} is not valid: give module names or .py files, "
                               "e.g. [mynet] or [models/mynet.py]")
    kept = []
    for entry in (e.strip() for e in entries):
        before = set(_MODELS)
        try:
            kept.append(_import_file(entry) if entry.endswith(".py") else _import_module(entry))
        except ModelImportError:
            for name in set(_MODELS) - before:  # a module that failed halfway registers nothing:
                del _MODELS[name], _FIXED[name]  # importing it again (fixed) must not find its names taken
            raise
    return kept


def _import_file(entry: str) -> str:
    path = Path(entry).expanduser().resolve()
    if not path.is_file():
        raise ModelImportError(f"imports: {entry!r} is not a file (give an existing .py file, or a module name "
                               "such as 'mynet')")
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None:
        if getattr(loaded, "__file__", None) and Path(loaded.__file__).resolve() == path:
            return str(path)
        raise ModelImportError(f"imports: {entry!r} would be module {name!r}, but {name!r} is already "
                               f"{getattr(loaded, '__file__', None) or 'a built-in module'}; rename the file")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise ModelImportError(f"imports: running {path} raised {type(err).__name__}: {err}") from err
    return str(path)


def _import_module(entry: str) -> str:
    if not all(part.isidentifier() for part in entry.split(".")):
        raise ModelImportError(f"imports: {entry!r} is neither a module name (such as mynet or lab.models) "
                               "nor a .py file")
    if entry in sys.modules:
        return entry
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:  # the pnnh script's sys.path lacks the current directory
        sys.path.append(cwd)
    try:
        importlib.import_module(entry)
    except ModuleNotFoundError as err:
        if err.name is not None and (entry == err.name or entry.startswith(err.name + ".")):
            raise ModelImportError(f"imports: no module named {entry!r} in the current directory ({cwd}) or on "
                                   "sys.path; give its file (e.g. path/to/mynet.py) or run from its folder") from None
        raise ModelImportError(f"imports: importing {entry!r} failed: {err}") from err
    except Exception as err:
        raise ModelImportError(f"imports: importing {entry!r} raised {type(err).__name__}: {err}") from err
    return entry


def is_model(name: str) -> bool:
    """Whether ``create_model(name)`` knows ``name``: a registered model, or one under a prefix."""
    return name in _MODELS or any(name.startswith(p) and name[len(p):] in _MODELS for p in _PREFIXES)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, sorted naturally."""
    names = [n for n in _MODELS if fnmatch.fnmatchcase(n, pattern)]
    return sorted(names, key=_natural_key)


def create_model(name: str, pretrained: str | os.PathLike | bool | None = None, features_only: bool = False,
                 out_indices: Sequence[int] | None = None, **kwargs) -> nn.Module:
    """Build the model registered as ``name``; ``kwargs`` go to its constructor.

    timm's options: ``pretrained=FOLDER`` loads the weights saved in FOLDER (a ``pnnh train``
    run directory or a ``save_pretrained`` folder, see :mod:`pnnh.models.pretrained`), with a
    new head when ``num_classes`` differs and an adapted input layer when ``in_chans`` does;
    ``features_only=True`` returns the per-stage feature maps instead (``out_indices`` picks
    stages, see :mod:`pnnh.models.features`). Every model gets ``model_name`` and
    ``pretrained_cfg`` (the config saved with its weights).

    Raises :class:`UnknownModelError` listing the closest names when ``name`` is unknown.
    """
    if pretrained is True:
        raise ValueError("pretrained=True: pnnh ships no weights; pass the folder of a trained model "
                         "(a pnnh train run directory or a save_pretrained folder)")
    if out_indices is not None and not features_only:
        raise ValueError("out_indices picks the stages of features_only=True; pass both or neither")
    if pretrained not in (None, False):
        model = load_pretrained(_build, name, pretrained, kwargs)
    else:
        model = _build(name, kwargs)
    return FeatureExtractor(model, out_indices) if features_only else model


def _build(name: str, kwargs: dict) -> nn.Module:
    prefix = next((p for p in _PREFIXES if name.startswith(p)), None)
    if prefix is not None:
        model = _PREFIXES[prefix](name[len(prefix):], kwargs)
        model.model_name = name
        model.pretrained_cfg = model_config(name, kwargs, model)
        return model
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
    kwargs = _as_annotated(_MODELS[name], kwargs)
    for key in SIZE_ARGS:  # caught here, one clear line, rather than as a tensor-shape error deep inside
        value = kwargs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key}={value!r} is not valid for {name!r}: it must be an integer >= 1")
    model = _MODELS[name](**{**kwargs, **_FIXED[name]})
    model.model_name = name
    model.pretrained_cfg = model_config(name, kwargs, model)
    return model


def _as_annotated(fn: Callable[..., nn.Module], kwargs: dict) -> dict:
    """``kwargs`` with each number given as text made the type ``fn`` declares for it (``coder_*``
    keywords, passed on through ``**kwargs``, are typed by ``CoderSpec``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable: nothing declared
        return kwargs
    return {k: as_annotated(k, v, params[k].annotation) if k in params else v for k, v in kwargs.items()}


def model_arch(model: nn.Module) -> str:
    """The architecture a model is trained as ("cnn", "vit", "mlp": its recipe in pnnh.train.config):
    its ``arch`` attribute, else, for a model of one's own, read from its layers: LayerNorm or
    attention -> "vit" (AdamW), convolutions -> "cnn" (SGD), neither -> "mlp"."""
    arch = getattr(model, "arch", None)
    if isinstance(arch, str):
        return arch
    layers = [type(m) for m in model.modules()]
    if any(issubclass(t, (nn.LayerNorm, nn.MultiheadAttention)) for t in layers):
        return "vit"
    return "cnn" if any(issubclass(t, nn.modules.conv._ConvNd) for t in layers) else "mlp"


def count_params(model: nn.Module) -> int:
    """Number of unique parameters: a coder shared by several layers counts once."""
    return sum(p.numel() for p in model.parameters())


def _natural_key(name: str):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
