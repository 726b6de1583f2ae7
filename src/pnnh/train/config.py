"""Training configuration: one dataclass, validated on construction, resolved before a run.

A config goes through two stages:

1. ``load_config(path_or_dict, overrides)`` reads YAML (or a dict), applies overrides (CLI
   flags; ``None`` means "not given") and validates every field. Fields whose best value
   depends on the model's architecture are left ``None`` / ``"auto"``.
2. ``resolve_config(cfg, arch, img_size)`` fills those from the architecture defaults below and
   the machine (device, precision), so the ``config.yaml`` saved beside a run holds only
   concrete values and re-running it reproduces the run.

Architecture defaults (used only for fields the user left unset):

====== ========= ========================== ============= ========= ============
arch   optimizer lr / wd / momentum         warmup epochs schedule  label smooth
====== ========= ========================== ============= ========= ============
cnn    sgd       0.1 / 5e-4 / 0.9 nesterov  1             cosine    0
vit    adamw     1e-3 / 0.05 / beta1 0.9    5             cosine    0.1
mlp    adamw     1e-3 / 0.05 / beta1 0.9    1             cosine    0
====== ========= ========================== ============= ========= ============

The default learning rates are per 128 images and scale with ``batch_size``: linearly for
SGD, with the square root for AdamW (its update size does not grow with the gradient).
For AdamW ``momentum`` is beta1. ``crop_pad`` defaults to 4 for images of 28 px and more
and 0 below, for every architecture, so the nets compared in one study see the same data.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the value and what is valid."""


OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
TRACKERS = ("tensorboard", "wandb")  # for --log; pnnh.train.loggers implements each

OPTIMIZER_DEFAULTS = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
    "adamw": {"lr": 1e-3, "momentum": 0.9, "nesterov": False, "weight_decay": 0.05},
}
ARCH_DEFAULTS = {
    "cnn": {"optimizer": "sgd", "warmup_epochs": 1.0, "schedule": "cosine", "label_smoothing": 0.0},
    "vit": {"optimizer": "adamw", "warmup_epochs": 5.0, "schedule": "cosine", "label_smoothing": 0.1},
    "mlp": {"optimizer": "adamw", "warmup_epochs": 1.0, "schedule": "cosine", "label_smoothing": 0.0},
}
LR_REFERENCE_BATCH = 128


@dataclass
class TrainConfig:
    """Everything that defines a training run. ``None`` / ``"auto"`` = resolved per architecture."""

    model: str | None = None
    data: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    imports: list = field(default_factory=list)  # modules / .py files that register the model (import_models)
    data_dir: str | None = None
    download: bool = False
    img_size: int | None = None
    stream: bool | str = "auto"  # read a folder dataset from disk as training goes (pnnh.data.streaming)
    memory_budget_gb: float = 8.0  # stream: auto streams data whose decoded images exceed this
    workers: int | None = None  # streaming: DataLoader worker processes (None: CPUs per process, <= 8)
    train_subset: int | None = None
    test_subset: int | None = None
    val_size: int = 0
    epochs: int = 10
    batch_size: int = 128
    optimizer: str | None = None
    lr: float | None = None
    momentum: float | None = None
    nesterov: bool | None = None
    weight_decay: float | None = None
    coder_lr_scale: float = 1.0
    coder_weight_decay: float | None = None
    scalar_lr_scale: float = 0.1
    label_smoothing: float | None = None
    warmup_epochs: float | None = None
    schedule: str | None = None
    grad_clip: float | None = None
    grad_noise: float | None = None
    guide: str | None = None
    guide_weight: float = 1.0
    crop_pad: int | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | str = "auto"
    compile: bool = False
    sync_bn: bool = False
    dist_timeout: float = 300.0
    max_steps: int | None = None
    checkpoint_every: int | None = None  # also save last.pt every N steps inside an epoch
    probe_every: int = 0
    log: str | None = None  # trackers, a comma list: tensorboard, wandb (pnnh.train.loggers)
    out: str | None = None

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data dict (YAML/JSON safe), in field order."""
        return dataclasses.asdict(self)


FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def load_config(
    path_or_dict: str | Path | Mapping[str, Any] | TrainConfig | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Build a validated ``TrainConfig`` from a YAML file or dict plus overrides.

    Overrides whose value is ``None`` are ignored (an unset CLI flag); ``model_kwargs``
    overrides are merged into the file's ``model_kwargs`` key by key, ``imports`` are added to the
    file's. Raises ``ConfigError``
    for anything invalid (bad YAML, unknown keys, wrong types or values).
    """
    if isinstance(path_or_dict, TrainConfig):
        values = path_or_dict.to_dict()
        source = "config"
    elif path_or_dict is None:
        values, source = {}, "config"
    elif isinstance(path_or_dict, Mapping):
        values, source = dict(path_or_dict), "config"
    elif isinstance(path_or_dict, (str, Path)):
        values, source = _read_yaml(Path(path_or_dict)), str(path_or_dict)
    else:
        raise ConfigError(
            f"config must be a YAML path, a dict or a TrainConfig, got {type(path_or_dict).__name__}"
        )
    _check_keys(values, source)
    for key, value in (overrides or {}).items():
        _check_keys({key: value}, "overrides")
        if value is None:
            continue
        if key == "model_kwargs" and isinstance(values.get(key), Mapping) and isinstance(value, Mapping):
            value = {**values[key], **value}
        if key == "imports" and isinstance(values.get(key), (list, tuple)) and isinstance(value, (list, tuple)):
            value = [*values[key], *(v for v in value if v not in values[key])]  # --import adds to the file's
        values[key] = value
    return TrainConfig(**values)


def resolve_config(cfg: TrainConfig, arch: str, img_size: int, channels_last_on_cpu: bool = True,
                   streamed: bool = False) -> TrainConfig:
    """Return a copy of ``cfg`` with every architecture- or machine-dependent field made concrete.

    ``arch`` is the model's architecture ("cnn", "vit", "mlp"; ``pnnh.models.registry.model_arch``), ``img_size`` the dataset's image
    side in pixels; ``channels_last_on_cpu=False`` makes ``channels_last="auto"`` choose NCHW
    on the CPU (a model's ``prefers_channels_last_on_cpu``); ``streamed``: whether the data is
    read from disk (``stream: auto`` decided by ``pnnh.data.streaming.stream_choice``). Raises
    ``ConfigError`` when the requested device cannot be used.
    """
    if arch not in ARCH_DEFAULTS:
        raise ConfigError(f"unknown model architecture {arch!r}; expected one of {sorted(ARCH_DEFAULTS)}")
    fam = ARCH_DEFAULTS[arch]
    optimizer = cfg.optimizer or fam["optimizer"]
    opt = OPTIMIZER_DEFAULTS[optimizer]
    if cfg.lr is None:
        ratio = cfg.batch_size / LR_REFERENCE_BATCH
        lr = opt["lr"] * (ratio if optimizer == "sgd" else math.sqrt(ratio))
    else:
        lr = cfg.lr
    weight_decay = opt["weight_decay"] if cfg.weight_decay is None else cfg.weight_decay
    momentum = opt["momentum"] if cfg.momentum is None else cfg.momentum
    device = resolve_device(cfg.device)
    return dataclasses.replace(
        cfg,
        optimizer=optimizer,
        lr=lr,
        momentum=momentum,
        nesterov=(opt["nesterov"] and momentum > 0) if cfg.nesterov is None else cfg.nesterov,
        weight_decay=weight_decay,
        coder_weight_decay=weight_decay if cfg.coder_weight_decay is None else cfg.coder_weight_decay,
        label_smoothing=fam["label_smoothing"] if cfg.label_smoothing is None else cfg.label_smoothing,
        warmup_epochs=fam["warmup_epochs"] if cfg.warmup_epochs is None else cfg.warmup_epochs,
        schedule=cfg.schedule or fam["schedule"],
        crop_pad=(4 if img_size >= 28 else 0) if cfg.crop_pad is None else cfg.crop_pad,
        device=device,
        precision=resolve_precision(cfg.precision, device),
        channels_last=(arch == "cnn" and (channels_last_on_cpu or device != "cpu")
                       if cfg.channels_last == "auto" else cfg.channels_last),
        stream=streamed if cfg.stream == "auto" else cfg.stream,
        out=cfg.out or default_out_dir(cfg.model, cfg.data),
    )


def default_out_dir(model: str | None, data: str | None) -> str:
    """``runs/<model>-<data>-<timestamp>``, the run directory when none is given."""
    return str(Path("runs") / f"{model}-{data}-{time.strftime('%Y%m%d-%H%M%S')}")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; an unknown or unusable device is a
    ConfigError. The one device resolution of pnnh (train, bench, probe)."""
    import torch

    if not _valid_device(device):
        raise ConfigError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu or auto")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> ``bf16`` when the device computes bf16 natively, else ``fp32``."""
    supported = bf16_supported(device)
    if precision == "auto":
        return "bf16" if supported else "fp32"
    if precision == "bf16" and device.startswith("cuda") and not supported:
        raise ConfigError(f"precision 'bf16' is not supported by {device}; use --precision fp32 or auto")
    return precision


def bf16_supported(device: str) -> bool:
    """Whether ``device`` has bf16 arithmetic in hardware (CUDA: Ampere+, CPU: AVX512-BF16/AMX/ARM BF16).

    On CPUs without it autocast still works but emulates bf16 and runs slower than fp32,
    so ``auto`` must not pick it there.
    """
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is None:  # torch < 2.8 has only the private AVX512 probe
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        return bool(probe and probe())
    flags = caps()
    return any(flags.get(key, False) for key in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))


def parse_guide(spec: str) -> tuple[str, str | None]:
    """``"resnet56"`` -> ("resnet56", None); ``"resnet56:runs/r56"`` -> ("resnet56", "runs/r56")."""
    if not isinstance(spec, str) or not spec or spec.startswith(":"):
        raise ConfigError(f"guide={spec!r} is not valid: use MODEL or MODEL:CHECKPOINT, e.g. resnet56 "
                          "or resnet56:runs/resnet56-run (a run directory or a .pt file)")
    name, _, ckpt = spec.partition(":")
    return name, (ckpt or None)


def parse_log(value: str | list[str] | tuple[str, ...] | None) -> str | None:
    """``"tensorboard, wandb"`` (or a list) as the normalised comma list of ``TRACKERS``."""
    if value is None:
        return None
    if not isinstance(value, (str, list, tuple)):
        raise _type_error("log", value, "a comma list of trackers, e.g. tensorboard,wandb")
    names = []
    for item in value.split(",") if isinstance(value, str) else value:
        name = str(item).strip().lower()
        if name not in TRACKERS:
            raise ConfigError(f"log={item!r} is not a known tracker; choose from {', '.join(TRACKERS)} "
                              "(a comma list, e.g. tensorboard,wandb)")
        if name not in names:
            names.append(name)
    return ",".join(names) or None


def dump_config(cfg: TrainConfig) -> str:
    """The config as YAML text (field order kept)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Reading and validation


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"invalid YAML in {where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


# Names other tools use for our keys, too far apart in spelling for difflib to connect.
KEY_ALIASES = {"learning_rate": "lr", "wd": "weight_decay", "bs": "batch_size", "dataset": "data",
               "num_epochs": "epochs", "opt": "optimizer", "output": "out", "out_dir": "out",
               "output_dir": "out", "warmup": "warmup_epochs", "lr_schedule": "schedule", "amp": "precision"}


def _check_keys(values: Mapping[Any, Any], source: str) -> None:
    for key in values:
        if key in FIELDS:
            continue
        close = [KEY_ALIASES[key]] if key in KEY_ALIASES else difflib.get_close_matches(str(key), FIELDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown config key {key!r} in {source}.{hint} Valid keys: {', '.join(FIELDS)}")


def _close(name: str, value: str, valid: list[str] | tuple[str, ...]) -> ConfigError:
    close = difflib.get_close_matches(value, valid, n=3)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    return ConfigError(f"unknown {name} {value!r}{hint} valid: {', '.join(valid)}")


def _type_error(name: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")


def _as_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(name, value, "an integer")
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ConfigError(f"{name} must be >= {minimum}{upper}, got {value}")
    return value


def _as_float(name: str, value: Any, minimum: float, *, strict: bool = False, below: float | None = None) -> float:
    # YAML 1.1 reads "1e-3" (no dot) as a string: accept numeric strings.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _type_error(name, value, "a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(name, value, "a number")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    if value < minimum or (strict and value == minimum) or (below is not None and value >= below):
        lower = f"> {minimum}" if strict else f">= {minimum}"
        upper = f" and < {below}" if below is not None else ""
        raise ConfigError(f"{name} must be {lower}{upper}, got {value}")
    return value


def _as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _type_error(name, value, "true or false")
    return value


def _as_str(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _type_error(name, value, "a non-empty string")
    return value


def _as_choice(name: str, value: Any, valid: tuple[str, ...]) -> str:
    value = _as_str(name, value).lower()
    if value not in valid:
        raise _close(name, value, valid)
    return value


def _check_plain_data(name: str, value: Any) -> None:
    """Model kwargs are saved to config.yaml, so they must be YAML-safe plain data."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be finite, got {value}")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain_data(f"{name}[{i}]", item)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise _type_error(f"a key in {name}", key, "a string")
            _check_plain_data(f"{name}.{key}", item)
        return
    raise _type_error(name, value, "plain data (number, string, bool, list or mapping)")


def _validate(cfg: TrainConfig) -> None:
    """Check and normalise every field in place; raise ConfigError on the first bad one."""
    if cfg.model is None:
        raise ConfigError("model is required (e.g. model: resnet20); see `pnnh models`")
    if cfg.data is None:
        raise ConfigError("data is required (e.g. data: fashion-mnist)")
    cfg.model = _as_str("model", cfg.model)
    cfg.data = _as_str("data", cfg.data)
    from pnnh.data import list_datasets
    from pnnh.models import list_models
    from pnnh.models.registry import ModelImportError, import_models, is_model

    try:  # first: the modules may register cfg.model
        cfg.imports = import_models(cfg.imports)
    except ModelImportError as err:
        raise ConfigError(str(err)) from None
    models = list(list_models())
    if not is_model(cfg.model):  # a registered name, or convert:<name> (its PNNH twin)
        err = _close("model", cfg.model, models)
        raise ConfigError(f"{err}. A model of your own: import the module that registers it "
                          "(--import mynet, or imports: [mynet] in the config)")
    from pnnh.data.memory import IN_MEMORY

    datasets = list(list_datasets())
    if cfg.data not in datasets and cfg.data != IN_MEMORY:  # in-memory: pnnh.train(config, data=...)
        raise _close("dataset", cfg.data, datasets)
    if cfg.model_kwargs is None:  # an empty "model_kwargs:" in YAML
        cfg.model_kwargs = {}
    if not isinstance(cfg.model_kwargs, dict):
        raise _type_error("model_kwargs", cfg.model_kwargs, "a mapping of argument names to values")
    _check_plain_data("model_kwargs", cfg.model_kwargs)
    cfg.model_kwargs = dict(cfg.model_kwargs)

    for name in ("data_dir", "out"):
        if getattr(cfg, name) is not None:
            setattr(cfg, name, _as_str(name, getattr(cfg, name)))
    for name in ("download", "compile", "sync_bn"):
        setattr(cfg, name, _as_bool(name, getattr(cfg, name)))
    if cfg.nesterov is not None:
        cfg.nesterov = _as_bool("nesterov", cfg.nesterov)

    cfg.epochs = _as_int("epochs", cfg.epochs, 1)
    cfg.batch_size = _as_int("batch_size", cfg.batch_size, 1)
    cfg.val_size = _as_int("val_size", cfg.val_size, 0)
    cfg.seed = _as_int("seed", cfg.seed, 0, 2**32 - 1)  # numpy's seed range
    cfg.probe_every = _as_int("probe_every", cfg.probe_every, 0)
    if not (isinstance(cfg.stream, bool) or cfg.stream == "auto"):
        raise _type_error("stream", cfg.stream, "auto, true or false")
    cfg.memory_budget_gb = _as_float("memory_budget_gb", cfg.memory_budget_gb, 0.0, strict=True)
    if cfg.workers is not None:
        cfg.workers = _as_int("workers", cfg.workers, 0)
    for name, minimum in (("img_size", 1), ("train_subset", 1), ("test_subset", 1), ("crop_pad", 0), ("max_steps", 1),
                          ("checkpoint_every", 1)):
        if getattr(cfg, name) is not None:
            setattr(cfg, name, _as_int(name, getattr(cfg, name), minimum))

    if cfg.lr is not None:
        cfg.lr = _as_float("lr", cfg.lr, 0.0, strict=True)
    cfg.coder_lr_scale = _as_float("coder_lr_scale", cfg.coder_lr_scale, 0.0)
    cfg.scalar_lr_scale = _as_float("scalar_lr_scale", cfg.scalar_lr_scale, 0.0)
    cfg.guide_weight = _as_float("guide_weight", cfg.guide_weight, 0.0, strict=True)
    for name in ("grad_clip", "grad_noise"):
        if getattr(cfg, name) is not None:
            setattr(cfg, name, _as_float(name, getattr(cfg, name), 0.0, strict=True))
    if cfg.guide is not None:
        parse_guide(_as_str("guide", cfg.guide))
        if cfg.compile:
            raise ConfigError("guide needs the target's layer outputs (forward hooks): run it without compile")
    cfg.log = parse_log(cfg.log)
    cfg.dist_timeout = _as_float("dist_timeout", cfg.dist_timeout, 0.0, strict=True)
    for name in ("weight_decay", "coder_weight_decay", "warmup_epochs"):
        if getattr(cfg, name) is not None:
            setattr(cfg, name, _as_float(name, getattr(cfg, name), 0.0))
    for name in ("momentum", "label_smoothing"):
        if getattr(cfg, name) is not None:
            setattr(cfg, name, _as_float(name, getattr(cfg, name), 0.0, below=1.0))

    for name, valid in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
        if getattr(cfg, name) is not None:
            setattr(cfg, name, _as_choice(name, getattr(cfg, name), valid))
    cfg.precision = _as_choice("precision", cfg.precision, PRECISIONS)
    cfg.device = _as_str("device", cfg.device).lower()
    if not _valid_device(cfg.device):
        raise ConfigError(f"unknown device {cfg.device!r}; valid: auto, cpu, cuda, cuda:N")
    if not (isinstance(cfg.channels_last, bool) or cfg.channels_last == "auto"):
        raise _type_error("channels_last", cfg.channels_last, "auto, true or false")

    if cfg.nesterov and cfg.optimizer == "adamw":
        raise ConfigError("nesterov applies to optimizer 'sgd' only; drop it or use optimizer: sgd")
    if cfg.nesterov and cfg.momentum == 0.0:
        raise ConfigError("nesterov needs momentum > 0, got momentum 0.0")


def _valid_device(device: str) -> bool:
    if device in ("auto", "cpu", "cuda"):
        return True
    prefix, _, index = device.partition(":")
    return prefix == "cuda" and index.isdigit()
