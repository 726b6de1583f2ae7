"""Plain-inference export of a trained run: fold, export, verify on real test images, time.

    report = export_run("runs/pnnh56-fashion-mnist", "pnnh56.onnx", fmt="onnx")

1. Load the run's model with ``pnnh.load`` (the best epoch's weights unless ``checkpoint="last"``)
   and, for the verification below, the run's dataset as ``config.yaml`` describes it.
2. ``pnnh.fold`` it: BatchNorm folded into the convolutions and, for PNNH, the shared
   coder into each layer's weight, so a PNNH net becomes a straight chain of conv + activation.
3. Export to a temporary file beside ``out``: TorchScript (``torch.jit.trace``; TorchScript is
   deprecated upstream but still the one-file format a C++ runtime loads) or ONNX
   (``torch.onnx.export``, dynamic batch; needs ``pip install 'pnnh[onnx]'``). A folded PNNH
   net exports as one ``Conv`` and one ``Max`` (the partial ReLU, ``ChannelFloor``) per layer;
   the file says how to feed it (:func:`export_metadata`: ONNX ``metadata_props``, one JSON
   value per key; TorchScript ``metadata.json`` among its extra files).
4. Load the exported file back (``torch.jit.load`` / onnxruntime) and compare its logits with
   the trained, unfolded model's on real test images of the run's dataset, in fp32. Only when
   the max abs difference is below ``tolerance`` (1e-4) does the file replace ``out``;
   otherwise ``ExportError`` is raised and ``out`` is left as it was.
5. Time inference (fp32, interleaved rounds as in ``pnnh bench``) of the exported model, the
   folded eager model, the unfolded trained model and a freshly built residual net of equal
   depth and width (``resnet{D}``, ``vit*``, ``residual_mlp``).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from pnnh.io import atomic_write_text, check_creatable_dir, format_table, package_version, write_png

FORMATS = ("torchscript", "onnx")
TOLERANCE = 1e-4
ONNX_HINT = "pip install 'pnnh[onnx]' (onnx, onnxruntime, onnxscript)"
# (prefix of a plain or PNNH model name, the residual kind's prefix) for the speed baseline.
RESIDUAL_PREFIXES = (("pnnh_vit", "vit"), ("plain_vit", "vit"), ("pnnh_mlp", "residual_mlp"),
                     ("plain_mlp", "residual_mlp"), ("pnnh", "resnet"), ("plain", "resnet"))


class ExportError(RuntimeError):
    """The run cannot be exported, or the exported model does not match the trained one."""


class ExportMismatch(ExportError):
    """The exported file computes other logits than the trained model (the file is not written)."""


@dataclass
class LoadedRun:
    """A trained run rebuilt in memory: eval-mode fp32 model on CPU, its config and data."""

    model: nn.Module
    config: object  # pnnh.train.TrainConfig
    checkpoint: Path
    splits: object  # pnnh.data.DataSplits


@dataclass
class ExportReport:
    """What ``export_run`` did: the file, the verification and the inference speeds."""

    out: str
    format: str
    model: str
    checkpoint: str
    check_images: int
    max_abs_diff: float
    tolerance: float
    argmax_agreement: float
    accuracy: float
    speed: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def load_run(run_dir: str | Path, checkpoint: str = "auto", data_dir: str | None = None) -> LoadedRun:
    """Rebuild the model of ``run_dir`` with its trained weights.

    ``checkpoint``: ``best`` (or ``auto``) or ``last``, read as ``pnnh.load``'s ``which``: the
    best epoch's weights, or the latest epoch's. ``data_dir`` overrides where the run's dataset
    is read from (for the verification images only; the model never needs it).
    """
    from pnnh.data import load_dataset
    from pnnh.train import load_config
    from pnnh.train.checkpoint import CheckpointError
    from pnnh.train.load import load, weights_file

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir} is not a pnnh run directory: it has no config.yaml "
                          "(a run directory is the --out of `pnnh train`)")
    if checkpoint not in ("auto", "best", "last"):
        raise ExportError(f"checkpoint={checkpoint!r} is not valid; choose auto, best or last")
    which = "last" if checkpoint == "last" else "best"
    try:
        path = weights_file(run_dir, which)
        model = load(run_dir, which)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    cfg = load_config(run_dir / "config.yaml")
    try:
        splits = load_dataset(cfg.data, data_dir=data_dir or cfg.data_dir, val_size=cfg.val_size, seed=cfg.seed,
                              train_subset=cfg.train_subset, test_subset=cfg.test_subset, img_size=cfg.img_size)
    except (ValueError, OSError) as err:
        raise ExportError(f"cannot load the run's dataset {cfg.data!r} for verification: {err} "
                          "(pass --data-dir if its files moved)") from err
    return LoadedRun(model, cfg, path, splits)


def check_batch(splits, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` test images, normalised as the trainer normalises them, and their labels."""
    from pnnh.data import TensorLoader

    n = min(n, len(splits.test_y))
    loader = TensorLoader(splits.test_x[:n], splits.test_y[:n], n, mean=splits.mean, std=splits.std, train=False)
    return next(iter(loader))


def residual_counterpart(name: str) -> str | None:
    """The registered residual model of the same shape as ``name`` (itself if residual), or None."""
    from pnnh.models import list_models

    for prefix, residual in RESIDUAL_PREFIXES:
        if name.startswith(prefix):
            name = residual + name[len(prefix):]
            break
    return name if name in list_models() else None


def _onnx_runtime():
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
        import onnxruntime
        import onnxscript  # noqa: F401  (the torch.export-based exporter needs it)
    except ImportError as err:
        raise ExportError(f"ONNX export needs the optional packages onnx, onnxruntime and onnxscript "
                          f"({err.name} is missing): {ONNX_HINT}") from None
    return onnxruntime


def export_metadata(run: LoadedRun) -> dict[str, object]:
    """What the exported file records: how to feed it (``input_size`` [C, H, W], per-channel
    ``mean``/``std`` in pixel/255 units, ``num_classes``), the model's name and keyword arguments,
    the pnnh version, and whatever else its ``pretrained_cfg`` records (such as class names)."""
    splits = run.splits
    meta = {k: v for k, v in (getattr(run.model, "pretrained_cfg", None) or {}).items() if v is not None}
    meta.update(model=run.config.model, model_kwargs=run.config.model_kwargs, num_classes=splits.num_classes,
                input_size=[splits.in_chans, splits.img_size, splits.img_size], mean=list(splits.mean),
                std=list(splits.std), pnnh_version=package_version(),
                input="images: float32 (N, C, H, W), (pixels / 255 - mean) / std per channel",
                output="logits: float32 (N, num_classes)")
    return meta


def _write_export(folded: nn.Module, example: torch.Tensor, fmt: str, path: Path,
                  metadata: dict[str, object]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Export ``folded`` to ``path`` and return a function running the file as loaded back."""
    if fmt == "torchscript":
        with torch.no_grad():
            torch.jit.trace(folded, example).save(str(path), _extra_files={"metadata.json": json.dumps(metadata)})
        loaded = torch.jit.load(str(path))

        def run(x):
            with torch.no_grad():
                return loaded(x)
        return run
    ort = _onnx_runtime()
    batch = torch.export.Dim("batch")
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress lines
        torch.onnx.export(folded, (example,), str(path), dynamo=True, external_data=False,
                          input_names=["images"], output_names=["logits"], dynamic_shapes=({0: batch},))
    import onnx

    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {key: json.dumps(value) for key, value in metadata.items()})
    onnx.save(model, str(path))
    options = ort.SessionOptions()
    # onnxruntime's threads spin-wait between runs by default, stealing the CPU from the
    # torch models timed right after; share the cores the way torch does instead.
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x):
        return torch.from_numpy(session.run(None, {"images": x.contiguous().numpy()})[0])
    return run


def export_run(run_dir: str | Path, out: str | Path, fmt: str = "torchscript", *, check_images: int = 256,
               checkpoint: str = "auto", data_dir: str | None = None, tolerance: float = TOLERANCE,
               batch_size: int = 128, repeats: int = 5, steps: int = 3, progress: bool = True,
               overwrite: bool = False) -> ExportReport:
    """Fold the trained model of ``run_dir``, export it to ``out`` as ``fmt``, verify, time.

    See the module docstring. Raises ``ExportError`` for a bad run, a missing optional
    package, an ``out`` that exists (unless ``overwrite``) or cannot be written, and
    ``ExportMismatch`` for a failed verification (then ``out`` is not touched).
    """
    from pnnh.experiments.bench import interleave, timed
    from pnnh.models.fold import fold
    from pnnh.models import create_model

    if fmt not in FORMATS:
        raise ExportError(f"format={fmt!r} is not valid; choose one of {FORMATS}")
    for name, value in (("check_images", check_images), ("batch_size", batch_size), ("repeats", repeats),
                        ("steps", steps)):
        if not isinstance(value, int) or value < 1:
            raise ExportError(f"{name}={value!r} is not valid; it must be an int >= 1")
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out} is a directory: name the file to write, e.g. {out / 'model.pt'}")
    if out.exists() and not overwrite:
        raise ExportError(f"--out {out} exists: pass --force (overwrite=True) to replace it, or another --out")
    try:
        check_creatable_dir(out.parent)
    except OSError as err:  # /proc, a read-only disk, a path under a file
        raise ExportError(f"--out {out}: {err}") from None
    if fmt == "onnx":
        _onnx_runtime()  # fail before any work
    run = load_run(run_dir, checkpoint, data_dir)
    x, y = check_batch(run.splits, check_images)
    folded = fold(run.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        try:
            exported = _write_export(folded, x[:2], fmt, Path(tmp), export_metadata(run))
        except ExportError:
            raise
        except Exception as err:  # the exporters raise many types; name the step that failed
            raise ExportError(f"{fmt} export of {run.config.model} failed: {type(err).__name__}: {err}") from err
        with torch.no_grad():
            expected = run.model(x)
        got = exported(x)
        diff = (got - expected).abs().max().item()
        if not diff < tolerance:  # also catches NaN
            raise ExportMismatch(f"the exported model differs from the trained one: max |logits diff| = {diff:.3g} "
                              f">= {tolerance:g} on {len(x)} test images of {run.config.data}; {out} not written")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; an exported model is meant to be shared
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)

    contenders: dict[str, Callable] = {f"exported ({fmt})": exported, "folded (eager)": folded,
                                       f"{run.config.model} (trained, eager)": run.model}
    residual = residual_counterpart(run.config.model)
    if residual is not None:
        kwargs = {k: v for k, v in run.config.model_kwargs.items() if not k.startswith("coder_")}
        contenders[f"{residual} (fresh, eager)"] = create_model(
            residual, num_classes=run.splits.num_classes, in_chans=run.splits.in_chans,
            img_size=run.splits.img_size, **kwargs).eval()
    speed_x = x[:batch_size]  # fp32, contiguous, on CPU for every contender
    device = torch.device("cpu")

    def block(fn):
        def task():
            with torch.no_grad():
                return steps * len(speed_x) / timed(lambda: fn(speed_x), steps, device)
        return task

    with tqdm(total=len(contenders) * (repeats + 1), desc="inference speed", unit="block",
              disable=not progress, leave=False) as bar:
        values = interleave({name: block(fn) for name, fn in contenders.items()}, repeats, 1, bar)
    base = f"{run.config.model} (trained, eager)"
    speed = [{"model": name, "images_per_s": statistics.median(v), "images_per_s_min": min(v),
              "images_per_s_max": max(v),
              "ratio_to_trained": statistics.median(a / b for a, b in zip(v, values[base]))}
             for name, v in values.items()]
    return ExportReport(out=str(out), format=fmt, model=run.config.model, checkpoint=str(run.checkpoint),
                        check_images=len(x), max_abs_diff=diff, tolerance=tolerance,
                        argmax_agreement=(got.argmax(1) == expected.argmax(1)).float().mean().item(),
                        accuracy=(got.argmax(1) == y).float().mean().item(), speed=speed)


def format_report(report: ExportReport) -> str:
    """The verification line and the speed table, for people."""
    lines = [f"exported {report.model} ({report.checkpoint}) -> {report.out} ({report.format})",
             f"verified on {report.check_images} test images: max |logits diff| = {report.max_abs_diff:.2g} "
             f"(< {report.tolerance:g}), argmax agreement {report.argmax_agreement:.1%}, "
             f"accuracy {report.accuracy:.1%}",
             f"inference, fp32, {len(report.speed)} models interleaved:"]
    rows = [(s["model"], f"{s['images_per_s_min']:.0f}/{s['images_per_s']:.0f}/{s['images_per_s_max']:.0f}",
             f"{s['ratio_to_trained']:.2f}") for s in report.speed]
    table = format_table(("model", "images/s min/med/max", "x trained"), rows, align="<>>")
    return "\n".join(lines + ["  " + line for line in table.splitlines()])


def write_report(report: ExportReport) -> list[Path]:
    """``<out>.report.json`` and ``<out>.report.png`` (inference images/s per model) beside the export."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    stem = Path(report.out)
    paths = [stem.with_name(stem.name + ".report.json"), stem.with_name(stem.name + ".report.png")]
    atomic_write_text(paths[0], json.dumps(report.to_dict(), indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(report.speed) + 1.4))
    med = [s["images_per_s"] for s in report.speed]
    err = [[m - s["images_per_s_min"] for m, s in zip(med, report.speed)],
           [s["images_per_s_max"] - m for m, s in zip(med, report.speed)]]
    ax.barh(range(len(med)), med, xerr=err, color=[f"C{i}" for i in range(len(med))])
    ax.set_yticks(range(len(med)), [s["model"] for s in report.speed], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("inference images/s, fp32 (median, min-max)")
    ax.set_title(f"{report.model} exported as {report.format}", fontsize=9)
    fig.tight_layout()
    write_png(paths[1], fig)
    plt.close(fig)
    return paths
