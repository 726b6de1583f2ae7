"""``pnnh train``: train one model on one dataset.

Every ``TrainConfig`` field is a flag (``--batch-size`` for ``batch_size``; booleans as
``--compile`` / ``--no-compile``). Flags override ``--config FILE.yaml``; a flag not given
overrides nothing. ``--set key=value`` passes a model keyword argument (value read as YAML,
so ``--set width=8`` is an int). ``--resume --out DIR`` alone continues DIR with the config
saved there.
"""
from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

from pnnh.cli import add_import_flag
from pnnh.train.config import FIELDS, OPTIMIZERS, PRECISIONS, SCHEDULES, ConfigError, TrainConfig, load_config

HELP = {
    "model": "model name (see `pnnh models`), e.g. resnet20, pnnh20, vit_tiny",
    "data": "dataset name, e.g. fashion-mnist, digits, cifar10",
    "data_dir": "directory holding the dataset files",
    "download": "download the dataset if it is missing",
    "epochs": "number of epochs (default 10)",
    "batch_size": "global training batch size, split evenly over the processes of a torchrun job (default 128)",
    "lr": "peak learning rate (default: the architecture's, scaled per 128 images)",
    "optimizer": f"one of {', '.join(OPTIMIZERS)} (default: sgd for CNNs, adamw otherwise)",
    "momentum": "SGD momentum, or AdamW beta1 (default 0.9)",
    "schedule": f"lr schedule after warm-up: {', '.join(SCHEDULES)} (default cosine)",
    "precision": f"{', '.join(PRECISIONS)}; auto = bf16 where the hardware has it",
    "device": "auto, cpu, cuda or cuda:N (default auto = cuda if available)",
    "channels_last": "channels-last memory format (default: on for CNNs)",
    "compile": "torch.compile the model",
    "sync_bn": "multi-process runs: BatchNorm statistics over the global batch (SyncBatchNorm; needs CUDA)",
    "dist_timeout": "multi-process runs: seconds a rank waits for the others before failing (default 300)",
    "img_size": "resize images to this side in pixels",
    "stream": "read data: folder from disk in worker processes as training goes (default auto: when its decoded images exceed --memory-budget-gb; tar shards always)",
    "memory_budget_gb": "per-process memory the in-memory dataset may take before auto streams it (default 8)",
    "workers": "streaming: DataLoader worker processes decoding images (default: CPUs per process, at most 8)",
    "train_subset": "train on a class-balanced subset of this many images",
    "test_subset": "evaluate on a class-balanced subset of this many test images",
    "val_size": "images carved from the training set for model selection (default 0)",
    "nesterov": "Nesterov momentum (SGD; default on)",
    "weight_decay": "decoupled (AdamW) or L2 (SGD) weight decay; never on norms and biases",
    "label_smoothing": "label smoothing of the training loss (default 0, ViT 0.1)",
    "warmup_epochs": "linear lr warm-up, in epochs (fractions allowed; at most half the run)",
    "grad_clip": "clip the global gradient norm to this value (default: no clipping)",
    "grad_noise": "annealed gradient noise: variance ETA / (1 + step)^0.55 (Neelakantan et al. 2015; e.g. 0.01)",
    "guide": "align the layers to a frozen guide net by CKA: MODEL (untrained) or MODEL:RUN_DIR_OR_PT",
    "guide_weight": "weight of the guidance loss, mean over layers of 1 - CKA (default 1)",
    "scalar_lr_scale": "learning-rate multiplier for Fixup's scalar biases and multipliers (default 0.1)",
    "seed": "seed of initialisation, data order and augmentation (default 0)",
    "out": "run directory (default runs/<model>-<data>-<timestamp>)",
    "probe_every": "run the dissipating-inputs probe every K epochs, at init and at the end (0 = never)",
    "log": "also log to these trackers, a comma list: tensorboard (<out>/tensorboard/), wandb (offline unless "
           "WANDB_MODE is set); metrics.jsonl is always written",
    "max_steps": "stop after this many optimizer steps (for tests and benchmarks)",
    "checkpoint_every": "also save last.pt every N optimizer steps inside an epoch, so a killed or preempted run "
                        "loses at most N steps (default: at the end of each epoch only)",
    "crop_pad": "random-crop padding in pixels (default 4 for images >= 28 px, else 0)",
    "coder_lr_scale": "learning-rate multiplier for PNNH coder parameters (default 1)",
    "coder_weight_decay": "weight decay of PNNH coder weights (default: same as --weight-decay)",
}


def register(subparsers: Any) -> None:
    """Add the ``train`` subcommand to the ``pnnh`` parser."""
    parser = subparsers.add_parser("train", help="train a model", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML config; flags override it")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    parser.add_argument("--set", dest="model_kwargs", action="append", default=[], metavar="KEY=VALUE",
                        help="model keyword argument, e.g. --set coder_init=copy (repeatable)")
    add_config_flags(parser)
    parser.set_defaults(func=run)


def add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> list[str]:
    """One flag per ``TrainConfig`` field (but ``model_kwargs`` and ``skip``), default None (= not
    given); return the field names added, which ``config_overrides`` reads back."""
    hints = typing.get_type_hints(TrainConfig)
    names = [name for name in FIELDS if name != "model_kwargs" and name not in skip]
    for name in names:
        if name == "imports":
            add_import_flag(parser, dest="imports", note="; kept in the run's config.yaml")
            continue
        kinds = set(typing.get_args(hints[name])) or {hints[name]}
        flag = "--" + name.replace("_", "-")
        if bool in kinds:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=HELP.get(name))
        else:
            kind = int if int in kinds else float if float in kinds else str
            parser.add_argument(flag, type=kind, default=None, help=HELP.get(name),
                                metavar=name.upper() if kind is str else kind.__name__.upper())
    return names


def config_overrides(args: argparse.Namespace, names: list[str] | tuple[str, ...] = FIELDS) -> dict[str, Any]:
    """The ``TrainConfig`` fields among ``names`` given as flags (``None`` = not given, left out)."""
    return {name: getattr(args, name) for name in names
            if name != "model_kwargs" and getattr(args, name, None) is not None}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` the parsed flags describe (YAML base, then flags)."""
    base = args.config
    if base is None and args.resume and args.out and (Path(args.out) / "config.yaml").is_file():
        base = Path(args.out) / "config.yaml"
    overrides = {**config_overrides(args), "model_kwargs": parse_set(args.model_kwargs) or None}
    return load_config(base, overrides)


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["width=8", "coder_init=copy"]`` -> ``{"width": 8, "coder_init": "copy"}`` (values as YAML)."""
    kwargs = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            kwargs[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({getattr(err, 'problem', err)})") from None
    return kwargs


def run(args: argparse.Namespace) -> int:
    """Run ``pnnh train``; exit status 0 ok, 1 diverged or lost a peer process, 2 bad configuration.

    Under torchrun only rank 0 prints (every rank meets the same config error or divergence),
    except for a failed collective, which each surviving rank reports.
    """
    from pnnh.train.distributed import DistributedError, launch_env
    from pnnh.train.trainer import TrainingDiverged, train

    main = True  # a bad launch environment is reported by every process
    try:
        main = launch_env()[0] == 0
        result = train(config_from_args(args), resume=args.resume)
    except ConfigError as err:
        if main:
            print(f"pnnh train: error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        if main:
            print(f"pnnh train: {err}", file=sys.stderr)
        return 1
    except DistributedError as err:
        print(f"pnnh train: error: {err}", file=sys.stderr)
        return 1
    if not main:
        return 0
    metrics = result.metrics
    test = f"test acc {metrics['test_acc']:.2%}, " if "test_acc" in metrics else ""
    print(f"done: {test}best {result.best_acc:.2%} at epoch {result.best_epoch}, "
          f"{result.images_per_s:.0f} img/s, {result.seconds:.1f}s training -> {result.out_dir}")
    return 0
