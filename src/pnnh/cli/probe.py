"""``pnnh probe``: measure dissipating inputs for several models on one batch of test images."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from pnnh.cli import add_import_flag
from pnnh.io import atomic_write_text, format_table, versions, write_csv
from pnnh.probe.core import CROSSING_MARGIN, crossing_layer, probe_model
from pnnh.probe.dists import DISTS
from pnnh.probe.hooks import BN_STATS
from pnnh.probe.plots import plot_probe
from pnnh.train.checkpoint import CheckpointError
from pnnh.train.load import load, weights_file
from pnnh.train.config import ConfigError, resolve_device

DEFAULT_DATA = "fashion-mnist"


class ProbeError(ValueError):
    """A bad argument or input file; the message says which and what is valid."""


def register(subparsers) -> None:
    """Add the ``pnnh probe`` subcommand."""
    p = subparsers.add_parser(
        "probe",
        help="dissipating inputs: per-layer similarity to the input, survival, signal stats",
        description="Run one batch of test images through each model and measure, per layer, "
                    "linear CKA and ridge recoverability of the input (with a noise floor), "
                    "neuron survival, signal-propagation statistics and gradient norms. Writes "
                    "OUT/probe.json, OUT/summary.csv and PNG plots.")
    p.add_argument("--models", required=True, metavar="LIST",
                   help="comma-separated model names, e.g. plain56,resnet56,pnnh56")
    p.add_argument("--data", default=None, metavar="NAME",
                   help=f"dataset name (default: the checkpoint's dataset, else {DEFAULT_DATA})")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="where the dataset lives (see pnnh.data)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    p.add_argument("--checkpoint", default=None, metavar="RUN_DIR",
                   help="trained run directory or a .pt file in one, loaded by pnnh.load (the best "
                        "epoch's weights); a comma list gives one per model in --models order. "
                        "Default: models at initialisation")
    p.add_argument("--batch-size", type=int, default=256, metavar="N",
                   help="test images probed (a seeded class-balanced subset; default 256)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed for the image subset, the model init, the noise and the split")
    p.add_argument("--width", type=int, default=None, metavar="W",
                   help="model width (default: the model's own); not with --checkpoint")
    p.add_argument("--bn-stats", choices=BN_STATS, default="batch",
                   help="BatchNorm statistics: 'batch' (train-mode batch statistics, buffers "
                        "restored; right at init) or 'running' (eval mode; for trained models)")
    p.add_argument("--dists-weights", type=Path, default=None, metavar="FILE",
                   help="enable DISTS (the paper's measure) by giving a VGG16 state_dict file: "
                        "torchvision's vgg16 layout ('features.N.weight') or the DISTS "
                        "repository's ('stageK.N.weight'). ImageNet-pretrained weights are "
                        "needed for meaningful scores; pnnh downloads none")
    p.add_argument("--dists-alpha-beta", type=Path, default=None, metavar="FILE",
                   help="DISTS alpha/beta weights file (tensors 'alpha', 'beta'); default: "
                        "those in --dists-weights if any, else uniform")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    add_import_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``pnnh probe``."""
    try:
        return _run(args)
    except (ProbeError, FileNotFoundError) as err:
        print(f"pnnh probe: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from pnnh.data import load_dataset
    from pnnh.models import list_models

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if not names:
        raise ProbeError(f"--models {args.models!r} names no model")
    if len(set(names)) != len(names):
        raise ProbeError(f"--models {args.models!r} names a model twice")
    unknown = [n for n in names if n not in list_models()]
    if unknown:
        raise ProbeError(f"unknown model(s) {unknown}; `pnnh models` lists the valid names")
    if args.batch_size < 4:
        raise ProbeError(f"--batch-size must be >= 4 (half fits the ridge probe, half scores it), got {args.batch_size}")
    runs = _run_configs(args.checkpoint, names) if args.checkpoint else None
    if runs and args.width is not None:
        raise ProbeError("--width conflicts with --checkpoint: the run's config.yaml fixes the model")
    device = _device(args.device)
    dists = _load_dists(args).to(device) if args.dists_weights else None

    first = runs[0][1] if runs else {}
    data = args.data or first.get("data") or DEFAULT_DATA
    img_size = first.get("img_size") if runs and data == first.get("data") else None
    try:
        splits = load_dataset(data, data_dir=args.data_dir, test_subset=args.batch_size,
                              seed=args.seed, img_size=img_size)
    except ValueError as err:
        raise ProbeError(f"cannot load dataset {data!r}: {err}") from err
    mean = torch.tensor(splits.mean).view(1, -1, 1, 1)
    std = torch.tensor(splits.std).view(1, -1, 1, 1)
    x = ((splits.test_x.float() / 255 - mean) / std).to(device)
    y = splits.test_y.to(device)

    results = {}
    for i, name in enumerate(tqdm(names, desc="probe", unit="model", disable=len(names) < 2)):
        model = _build(name, splits, args, runs[i] if runs else None).to(device)
        results[name] = probe_model(model, x, y, seed=args.seed, bn_stats=args.bn_stats, dists=dists)
        results[name]["checkpoint"] = str(runs[i][0]) if runs else None

    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "models": results,
        "data": {"name": data, "split": "test", "examples": len(x), "subset_seed": args.seed,
                 "shape": list(x.shape[1:]), "mean": list(splits.mean), "std": list(splits.std)},
        "command": _command(args, data),
        "versions": versions(),
        "crossing_margin": CROSSING_MARGIN,
    }
    atomic_write_text(args.out / "probe.json", json.dumps(payload, indent=1))
    rows = _summary_rows(results)
    write_csv(args.out / "summary.csv", rows)
    state = "trained" if runs else "init"
    plot_probe(results, args.out, title=f"{data}, {state}, batch {len(x)}")
    print(_format_rows(rows))
    print(f"wrote {args.out}/probe.json, summary.csv and plots")
    return 0


def _command(args: argparse.Namespace, data: str) -> str:
    """The command line that reproduces this run, every option explicit."""
    parts = ["pnnh", "probe", "--models", args.models, "--data", data, "--out", str(args.out),
             "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--bn-stats", args.bn_stats]
    for flag, value in (("--data-dir", args.data_dir), ("--checkpoint", args.checkpoint),
                        ("--width", args.width), ("--dists-weights", args.dists_weights),
                        ("--dists-alpha-beta", args.dists_alpha_beta)):
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def _summary_rows(results: dict[str, dict]) -> list[dict]:
    """One row per model: the table printed and saved as summary.csv."""
    return [{"model": name, "layers": len(r["layers"]),
             "final_cka": r["cka"][-1], "noise_floor": r["cka_noise"][-1],
             "crossing_layer": crossing_layer(r),
             "final_recoverability": r["recoverability"][-1],
             "recoverability_noise_floor": r["recoverability_noise"][-1],
             "crossing_layer_recoverability": crossing_layer(r, measure="recoverability")}
            for name, r in results.items()]


def _format_rows(rows: list[dict]) -> str:
    header = ("model", "layers", "final cka", "noise floor", "crossing", "final recov.",
              "recov. floor", "crossing (recov.)")
    body = [(r["model"], str(r["layers"]), f"{r['final_cka']:.3f}", f"{r['noise_floor']:.3f}",
             str(r["crossing_layer"]), f"{r['final_recoverability']:.3f}",
             f"{r['recoverability_noise_floor']:.3f}", str(r["crossing_layer_recoverability"]))
            for r in rows]
    return (format_table(header, body) + "\nnoise floor = the measure for the same layer's features of a noise "
            f"input; crossing = first layer index (0-based) within {CROSSING_MARGIN} of it, None = never")


def _run_configs(spec: str, names: list[str]) -> list[tuple[Path, dict]]:
    """(checkpoint file, run config) per model, checked against ``names``."""
    paths = [Path(p.strip()) for p in spec.split(",") if p.strip()]
    if len(paths) != len(names):
        raise ProbeError(f"--checkpoint gives {len(paths)} run(s) for {len(names)} model(s); "
                         "give one run directory per model in --models order")
    runs = []
    for path, name in zip(paths, names):
        try:
            ckpt = weights_file(path)
        except CheckpointError as err:
            raise ProbeError(str(err)) from None
        run_dir = ckpt.parent
        config_path = run_dir / "config.yaml"
        if not config_path.is_file():
            raise ProbeError(f"{str(config_path)!r} does not exist: the checkpoint's run config is needed")
        try:
            config = yaml.safe_load(config_path.read_text())
        except yaml.YAMLError as err:
            raise ProbeError(f"{config_path}: not valid YAML: {err}") from err
        if not isinstance(config, dict) or "model" not in config:
            raise ProbeError(f"{config_path}: expected a mapping with key 'model'")
        if config["model"] != name:
            raise ProbeError(f"{ckpt} holds a {config['model']!r} model, but --models lists {name!r} "
                             "at its position")
        runs.append((ckpt, config))
    return runs


def _build(name: str, splits, args: argparse.Namespace, run: tuple[Path, dict] | None) -> torch.nn.Module:
    from pnnh.models import create_model

    shape = {"num_classes": splits.num_classes, "in_chans": splits.in_chans, "img_size": splits.img_size}
    torch.manual_seed(args.seed)
    if run is None:
        return create_model(name, **shape, **({} if args.width is None else {"width": args.width}))
    try:
        return load(run[0])
    except CheckpointError as err:
        raise ProbeError(str(err)) from None


def _device(spec: str) -> torch.device:
    try:
        return torch.device(resolve_device(spec))
    except ConfigError as err:
        raise ProbeError(f"--device: {err}") from None


def _load_dists(args: argparse.Namespace) -> DISTS:
    try:
        return DISTS.from_files(args.dists_weights, args.dists_alpha_beta)
    except ValueError as err:
        raise ProbeError(str(err)) from err
