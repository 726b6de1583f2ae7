"""A grid of training runs (variant x depth x seed) through one trainer, resumable.

A sweep config (YAML) has two sections::

    sweep:
      models: [plain, resnet, pnnh]        # shorthand for variants {plain: {model: plain}, ...}
      variants:                            # or named variants, for ablations
        pnnh-copy: {model: pnnh, model_kwargs: {coder_init: copy}, train: {lr: 0.05}}
      depths: [20, 56, 110]
      seeds: 3                             # or a list of seeds
    train:                                 # TrainConfig fields shared by every cell
      data: fashion-mnist
      epochs: 10

A sweep's ``model`` is a registered model name that takes ``depth=`` (``pnnh``, ``resnet``,
``vit``, ...). Recipes written before the key had this name say ``families:`` and ``family:``;
they are read the same, with a deprecation note.

Every cell trains ``create_model(model, depth=depth, **model_kwargs)`` in
``OUT/cells/<variant>-d<depth>-s<seed>/`` and records ``cell.json`` when it ends (ok, diverged or
failed, with the reason). Re-running the same command skips recorded cells and resumes an
interrupted one from its ``last.pt``.
"""
from __future__ import annotations

import json
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import torch
import yaml
from tqdm.auto import tqdm

from pnnh.io import atomic_write_text, check_creatable_dir, versions
from pnnh.train.config import ConfigError, TrainConfig, load_config

PROBE_IMAGES = 256
# Train settings that change how a cell runs, not what it learns: processes sharing one sweep
# directory may differ in them (e.g. one compiled, one not; each cell's config.yaml says which).
EXECUTION_KEYS = frozenset({"compile", "device", "data_dir", "download", "dist_timeout", "workers",
                            "memory_budget_gb", "log", "checkpoint_every", "imports"})


@dataclass
class Cell:
    variant: str
    model: str
    depth: int
    seed: int
    model_kwargs: dict
    train: dict

    @property
    def id(self) -> str:
        return f"{self.variant}-d{self.depth}-s{self.seed}"

    def config(self, out: Path) -> TrainConfig:
        kwargs = {**self.model_kwargs, "depth": self.depth}
        return load_config({**self.train, "model": self.model, "model_kwargs": kwargs, "seed": self.seed,
                            "out": str(out / "cells" / self.id)})


@dataclass
class SweepSpec:
    variants: dict[str, dict]
    depths: list[int]
    seeds: list[int]
    train: dict = field(default_factory=dict)
    cluster: dict = field(default_factory=dict)  # how jobs run (pnnh.experiments.launch), not what cells learn

    def cells(self) -> list[Cell]:
        cells = []
        for name, variant in self.variants.items():
            for depth in self.depths:
                for seed in self.seeds:
                    cells.append(Cell(name, variant["model"], depth, seed, dict(variant.get("model_kwargs", {})),
                                      {**self.train, **variant.get("train", {})}))
        return cells

    def to_dict(self) -> dict:
        return {"sweep": {"variants": self.variants, "depths": self.depths, "seeds": self.seeds},
                "train": self.train}


def load_sweep(path: str | Path | None = None, *, models: list[str] | None = None,
               depths: list[int] | None = None, seeds: int | list[int] | None = None,
               train: Mapping[str, Any] | None = None, model_kwargs: Mapping[str, Any] | None = None) -> SweepSpec:
    """Read a sweep YAML (optional) and apply command-line overrides.

    ``models`` replaces the variants by one variant per model name; ``model_kwargs`` are added
    to every variant (``coder_*`` keys only to PNNH models and ``convert:`` twins, which take them).
    """
    raw: dict = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read sweep config {path}: {err}") from None
        unknown = set(raw) - {"sweep", "train", "cluster"}
        if unknown:
            raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}; valid: sweep, train, cluster")
    section = _renamed(dict(raw.get("sweep") or {}), "families", "models", path)
    unknown = set(section) - {"models", "variants", "depths", "seeds"}
    if unknown:
        raise ConfigError(f"unknown sweep keys {sorted(unknown)}; valid: models, variants, depths, seeds")
    if models:
        variants = {m: {"model": m} for m in models}
    elif section.get("variants"):
        variants = {str(k): _renamed(dict(v or {}), "family", "model", path) for k, v in section["variants"].items()}
        for name, v in variants.items():
            v.setdefault("model", name)
            bad = set(v) - {"model", "model_kwargs", "train"}
            if bad:
                raise ConfigError(f"variant {name!r}: unknown keys {sorted(bad)}; valid: model, model_kwargs, train")
    else:
        variants = {m: {"model": m} for m in section.get("models") or ["plain", "resnet", "pnnh"]}
    for v in variants.values():
        for key, value in (model_kwargs or {}).items():
            if not key.startswith("coder_") or "pnnh" in v["model"] or v["model"].startswith("convert:"):
                v.setdefault("model_kwargs", {})[key] = value
    depths = list(depths or section.get("depths") or [20, 56])
    seeds_value = seeds if seeds is not None else section.get("seeds", 1)
    seed_list = list(range(seeds_value)) if isinstance(seeds_value, int) else list(seeds_value)
    if not seed_list or not all(isinstance(s, int) and s >= 0 for s in seed_list):
        raise ConfigError(f"seeds={seeds_value!r}: give a count >= 1 or a list of non-negative integers")
    if not all(isinstance(d, int) and d > 0 for d in depths):
        raise ConfigError(f"depths={depths!r}: give positive integers, e.g. 20,56,110")
    spec = SweepSpec(variants, depths, seed_list, {**(raw.get("train") or {}), **(train or {})},
                     dict(raw.get("cluster") or {}))
    return spec


def _renamed(section: dict, old: str, new: str, source: str | Path | None) -> dict:
    """``section`` with the deprecated key ``old`` read as ``new`` (a note says so once per read)."""
    if old not in section:
        return section
    if new in section:
        raise ConfigError(f"{source or 'sweep'}: give {new!r} only ({old!r} is its old name)")
    warnings.warn(f"{source or 'sweep'}: the sweep key {old!r} is now {new!r}; {old!r} is read as {new!r} "
                  "for now", DeprecationWarning, stacklevel=3)
    return {(new if k == old else k): v for k, v in section.items()}


def run_sweep(spec: SweepSpec, out: str | Path, *, command: str = "", retry_failed: bool = False,
              progress: bool = True, shard: tuple[int, int] = (0, 1), only: Collection[str] | None = None,
              ) -> list[dict]:
    """Train every cell of ``spec`` under ``out``; return the cell records (see module docstring).

    Cells train one seed at a time (every cell of the first seed before any of the second, so a
    sweep stopped part-way has a complete grid for its first seeds), deepest first within a seed.
    ``shard=(i, n)`` trains only cells i, i+n, i+2n, ... of that order, so n processes can share
    one sweep directory and each gets a fair mix of cheap and costly cells, the costly ones first;
    the records returned are this shard's. A cell being trained by another process on ``out``
    (a lock per cell, :func:`_claim`) is skipped, so running the same command twice is safe.
    ``only``: train just these cell ids (a cluster job's cells, see ``pnnh.experiments.launch``)."""
    out = Path(out)
    index, count = shard
    if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
        raise ConfigError(f"shard={shard!r} is not valid: need (i, n) with 0 <= i < n")
    configs = prepare_sweep(spec, out, command)
    cells = [c for c in _training_order(spec)[index::count] if only is None or c.id in only]
    records = []
    todo = []
    for cell in cells:
        record = read_cell(out / "cells" / cell.id)
        if record is not None and not (retry_failed and record["status"] == "failed"):
            records.append(record)
        else:
            todo.append(cell)
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="sweep", unit="cell", disable=not progress,
               position=0, dynamic_ncols=True)
    try:
        for cell in todo:
            bar.set_postfix_str(cell.id)
            cell_dir = out / "cells" / cell.id
            with _claim(out / ".locks" / cell.id, patience=CLAIM_PATIENCE_S) as mine:
                if not mine:
                    tqdm.write(f"{cell.id}: being trained by another process, skipped")
                    continue
                record = read_cell(cell_dir)  # another process may have finished it since the scan
                if record is None or (retry_failed and record["status"] == "failed"):
                    record = _train_cell(cell, configs[cell.id], cell_dir, retry_failed, progress)
            records.append(record)
            bar.update(1)
            if progress:
                tqdm.write(f"[{bar.n}/{len(cells)}] {cell.id}: {_one_line(record)}")
    finally:
        bar.close()
    return records


def prepare_sweep(spec: SweepSpec, out: Path, command: str) -> dict[str, TrainConfig]:
    """Validate every cell's config, create ``out`` and claim it with ``sweep.yaml`` (or check that
    it holds this sweep); return the configs by cell id. Nothing is trained or submitted before."""
    configs = {c.id: c.config(out) for c in spec.cells()}
    try:
        check_creatable_dir(out)
    except OSError as err:  # /proc, a read-only disk, a path under a file: one line, nothing made
        raise ConfigError(f"--out {out}: {err}") from None
    out.mkdir(parents=True, exist_ok=True)
    _write_manifest(out, spec, command)
    return configs


def pending_cells(spec: SweepSpec, out: Path, retry_failed: bool = False) -> list[str]:
    """Ids of the cells still to train, in training order: no record (or a failed one, with
    ``retry_failed``) and not being trained by another process now."""
    return [c.id for c in _training_order(spec)
            if ((record := read_cell(out / "cells" / c.id)) is None or (retry_failed and record["status"] == "failed"))
            and not _held_elsewhere(out / ".locks" / c.id)]


def _training_order(spec: SweepSpec) -> list[Cell]:
    """Seed by seed, deepest first within a seed, the recipe's variant order within a depth."""
    seed_rank = {seed: i for i, seed in enumerate(spec.seeds)}
    return sorted(spec.cells(), key=lambda c: (seed_rank[c.seed], -c.depth))  # stable sort


def _train_cell(cell: Cell, config: TrainConfig, cell_dir: Path, retry_failed: bool, progress: bool) -> dict:
    """Train (or resume) one cell, probe it, write its ``cell.json``; return the record."""
    from pnnh.train.loggers import build_loggers
    from pnnh.train.trainer import TrainingDiverged, train

    if retry_failed and (cell_dir / "cell.json").exists():
        _discard_failed(cell_dir)
    resume = (cell_dir / "last.pt").exists()
    if not resume and cell_dir.exists():
        # Stopped before its first checkpoint: nothing to resume, keep it aside, start afresh.
        cell_dir.rename(cell_dir.with_name(f"{cell.id}.incomplete-{int(time.time())}"))
    loggers = build_loggers(config.log)  # made here, so that the probe curves join the cell's logs
    try:
        result = train(config, resume=resume, progress=progress, callbacks=loggers)
        record = _record(cell, "ok", result.to_dict())
    except TrainingDiverged as err:
        record = _record(cell, "diverged", err.result.to_dict(), reason=str(err))
    except Exception as err:  # a broken cell must not stop the sweep
        record = _record(cell, "failed", {}, reason=f"{type(err).__name__}: {err}",
                         detail=traceback.format_exc(limit=8))
    if record["status"] != "failed":
        try:
            record["probe"] = probe_curves(cell, config)
            for logger in loggers:
                logger.log_probe_curves(record["probe"])
        except Exception as err:  # a probe problem must not cost the training result
            record["probe_error"] = f"{type(err).__name__}: {err}"
    for logger in loggers:
        logger.close()
    cell_dir.mkdir(parents=True, exist_ok=True)  # a cell may fail before the trainer made it
    atomic_write_text(cell_dir / "cell.json", json.dumps(record, indent=1) + "\n")
    return record


CLAIM_PATIENCE_S = 2.0  # how long a sweep waits for a lock held only for a moment (a report's check)


@contextmanager
def _claim(lock_path: Path, patience: float = 0.0) -> Iterator[bool]:
    """Hold an exclusive lock on ``lock_path`` for the block; yield whether we got it.

    Two processes on one sweep directory (two shards, or the same command run twice) never
    train the same cell. The operating system drops the lock when its process dies, even by
    SIGKILL, so a crashed run never leaves a cell locked. A lock still held after ``patience``
    seconds of retrying means the cell is busy (``pnnh report`` holds one for microseconds to
    ask whether a cell is training; a sweep waits that out instead of skipping the cell).
    Without ``fcntl`` (Windows) every claim succeeds: run one process per sweep directory there."""
    if fcntl is None:
        yield True
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        deadline = time.monotonic() + patience
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.05)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _held_elsewhere(lock_path: Path) -> bool:
    """Whether another process holds the lock ``lock_path`` (a cell it is training)."""
    if not lock_path.exists():
        return False
    with _claim(lock_path) as mine:
        return not mine


def unfinished_cells(out: str | Path) -> tuple[list[str], list[str]]:
    """(cells being trained now, cells not started or interrupted) of the sweep in ``out``, by id,
    in training order; both empty without a ``sweep.yaml``. A cell is being trained when another
    process holds its lock."""
    out = Path(out)
    if not (out / "sweep.yaml").exists():
        return [], []
    section = _saved_sweep((yaml.safe_load((out / "sweep.yaml").read_text()) or {}).get("sweep"))
    spec = SweepSpec(section.get("variants") or {}, section.get("depths") or [], section.get("seeds") or [])
    running, waiting = [], []
    for cell in _training_order(spec):
        if read_cell(out / "cells" / cell.id) is None:
            (running if _held_elsewhere(out / ".locks" / cell.id) else waiting).append(cell.id)
    return running, waiting


def read_cell(cell_dir: Path) -> dict | None:
    path = cell_dir / "cell.json"
    if not path.exists():
        return None
    return _saved_record(json.loads(path.read_text()))


def read_cells(out: str | Path) -> list[dict]:
    """Every recorded cell under ``out/cells``, in a stable order."""
    paths = sorted(Path(out, "cells").glob("*/cell.json"))
    return [_saved_record(json.loads(p.read_text())) for p in paths]


def _saved_record(record: dict) -> dict:
    """A cell record as this version writes it (records written before "family" became "model")."""
    if "family" in record and "model" not in record:
        record = {("model" if k == "family" else k): v for k, v in record.items()}
    return record


def _saved_sweep(section: dict | None) -> dict:
    """A saved ``sweep:`` section as this version writes it (variants' "family" is now "model")."""
    section = dict(section or {})
    section["variants"] = {name: _saved_record(dict(v or {})) for name, v in (section.get("variants") or {}).items()}
    return section


def probe_curves(cell: Cell, cfg: TrainConfig) -> dict:
    """Similarity to the input per layer, at init (same seed) and after training (``pnnh.load``:
    the best epoch's weights)."""
    from pnnh.data import load_dataset
    from pnnh.data.streaming import load_streaming, make_loader, split_size
    from pnnh.models import create_model
    from pnnh.probe import probe_model
    from pnnh.train.load import load

    run = Path(cfg.out)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    subsets = {"seed": saved["seed"], "test_subset": saved.get("test_subset"), "img_size": saved.get("img_size")}
    # A streamed run's data is probed streamed too: its first test images, not the whole split in memory.
    splits = (load_streaming(saved.get("data_dir"), **subsets) if saved.get("stream") is True else
              load_dataset(saved["data"], data_dir=saved.get("data_dir"), **subsets))
    n = min(PROBE_IMAGES, split_size(splits, "test"))
    x, y = next(iter(make_loader(splits, "test", n, train=False, first=n)))
    curves = {}
    stages = ("init", "end") if (run / "last.pt").exists() else ("init",)  # none if epoch 1 diverged
    for stage in stages:
        torch.manual_seed(cell.seed)
        model = load(run) if stage == "end" else create_model(
            saved["model"], num_classes=splits.num_classes, in_chans=splits.in_chans, img_size=splits.img_size,
            **saved["model_kwargs"])
        result = probe_model(model, x, y, grad=False)
        curves[stage] = {k: result[k] for k in ("layers", "cka", "cka_noise", "survival")}
    return curves


def _record(cell: Cell, status: str, result: dict, reason: str = "", detail: str = "") -> dict:
    metrics = result.get("metrics") or {}
    return {
        "id": cell.id, "variant": cell.variant, "model": cell.model, "depth": cell.depth, "seed": cell.seed,
        "model_kwargs": cell.model_kwargs, "status": status, "reason": reason, "detail": detail,
        "test_acc": metrics.get("test_acc"), "val_acc": metrics.get("val_acc"),
        "best_acc": result.get("best_acc"), "best_epoch": result.get("best_epoch"),
        "params": result.get("params"), "images_per_s": result.get("images_per_s"),
        "seconds": result.get("seconds"), "epochs": metrics.get("epoch"), "metrics": metrics,
    }


def _discard_failed(cell_dir: Path) -> None:
    (cell_dir / "cell.json").rename(cell_dir / f"cell.failed-{int(time.time())}.json")


def failure_summary(records: list[dict]) -> str | None:
    """``"2 of 9 cells failed: ID (reason); ..."`` for the failed cells of ``records``, None if none."""
    failed = [r for r in records if r["status"] == "failed"]
    if not failed:
        return None
    reasons = "; ".join(f"{r['id']} ({(r['reason'].splitlines() or [''])[0]})" for r in failed)
    return f"{len(failed)} of {len(records)} cells failed: {reasons} (each cell.json holds its traceback; " \
           "--retry-failed trains them again)"


def _one_line(record: dict) -> str:
    if record["status"] == "failed":
        return f"FAILED ({record['reason']})"
    acc = record["test_acc"]
    acc_text = f"test {100 * acc:.2f}%" if acc is not None else "no epoch finished"
    return f"{record['status']}, {acc_text}, {record['params']:,} params, {record['images_per_s']:.0f} img/s"


def _recipe(train: dict | None) -> dict:
    """The train settings that define what a cell learns (all but ``EXECUTION_KEYS``)."""
    return {k: v for k, v in (train or {}).items() if k not in EXECUTION_KEYS}


def _write_manifest(out: Path, spec: SweepSpec, command: str) -> None:
    """``sweep.yaml``: the resolved sweep, the command and the versions (the report cites them).

    A later run of the same sweep with another command line (execution settings such as
    ``--compile`` may differ) adds it to ``also_run_as``, so the report names every way its
    cells were trained, not only the first."""
    manifest = {**spec.to_dict(), "command": command or " ".join(sys.argv), "versions": versions()}
    path = out / "sweep.yaml"
    if path.exists():
        previous = yaml.safe_load(path.read_text()) or {}
        if _saved_sweep(previous.get("sweep")) != manifest["sweep"] or _recipe(previous.get("train")) != _recipe(manifest["train"]):
            raise ConfigError(f"{out} holds a different sweep (see {path}); use another --out or the same settings "
                              f"(only {', '.join(sorted(EXECUTION_KEYS))} may differ)")
        also = previous.get("also_run_as") or []
        if manifest["command"] != previous.get("command") and manifest["command"] not in also:
            atomic_write_text(path, yaml.safe_dump({**previous, "also_run_as": [*also, manifest["command"]]},
                                                   sort_keys=False))
        return
    atomic_write_text(path, yaml.safe_dump(manifest, sort_keys=False))

