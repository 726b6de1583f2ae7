"""pnnh.train.loggers: TensorBoard and W&B logs, read back with each tool's own reader."""
from __future__ import annotations

import importlib.util
import json
import struct
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pnnh.train import train
from pnnh.train.config import TRACKERS, load_config, parse_log
from pnnh.train.loggers import LOGGERS, TensorBoardLogger, WandbLogger, build_loggers

STEP_LOSSES = [2.0, 1.5, 1.25, 1.0, 0.75, 0.5]
EPOCHS = [{"epoch": 1, "step": 3, "train_loss": 1.6, "test_acc": 0.5, "lr": 0.1,
           "probe": {"final_cka": 0.25, "crossing_layer": None}},
          {"epoch": 2, "step": 6, "train_loss": 0.8, "test_acc": 0.75, "lr": 0.05}]
RESULT = SimpleNamespace(best_acc=0.75, metrics=EPOCHS[-1])


CURVES = {"init": {"layers": ["a", "b", "c"], "cka": [1.0, 0.5, 0.25]}, "end": {"cka": [1.0, 0.75, 0.5]}}


def drive(logger, out: Path, rank: int = 0) -> None:
    """The trainer's calls for a 2-epoch run of 3 steps per epoch, in the trainer's order, then
    the probe curves a sweep logs after training."""
    config = load_config({"model": "pnnh8", "data": "digits", "model_kwargs": {"width": 8}, "out": str(out)})
    logger.on_train_start({"config": config, "out_dir": str(out), "rank": rank, "world_size": 1})
    for epoch, record in enumerate(EPOCHS):
        for step in range(3 * epoch + 1, 3 * epoch + 4):
            logger.on_step(step, STEP_LOSSES[step - 1])
        logger.on_epoch_end(record["epoch"], record)
    logger.on_train_end(RESULT)
    logger.log_probe_curves(CURVES)
    logger.close()


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in ``log_dir``, read by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tensorboard_hparams(log_dir: Path) -> dict[str, object]:
    """The hyperparameters of the run's HParams session, as TensorBoard's plugin decodes them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(log_dir))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: v.string_value or v.number_value for k, v in start.hparams.items()}


def test_tensorboard_events_hold_every_logged_scalar(tmp_path):
    pytest.importorskip("tensorboard", reason="optional: pip install 'pnnh[track]'")
    drive(TensorBoardLogger(), tmp_path)
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == list(enumerate(STEP_LOSSES, start=1))  # exact in float32
    assert scalars["epoch/test_acc"] == [(3, 0.5), (6, 0.75)]
    assert scalars["epoch/epoch"] == [(3, 1.0), (6, 2.0)]
    assert scalars["probe/final_cka"] == [(3, 0.25)]  # the probe's None is left out
    assert scalars["final/best_acc"] == [(6, 0.75)] and scalars["final/test_acc"] == [(6, 0.75)]
    assert "epoch/step" not in scalars and "final/epoch" not in scalars
    assert scalars["probe_curve/init/cka"] == [(0, 1.0), (1, 0.5), (2, 0.25)]  # x = layer index
    assert scalars["probe_curve/end/cka"] == [(0, 1.0), (1, 0.75), (2, 0.5)]
    assert not any(tag.startswith("probe_curve/init/layers") for tag in scalars)
    hparams = tensorboard_hparams(tmp_path / "tensorboard")
    assert hparams["model"] == "pnnh8" and hparams["model_kwargs.width"] == 8 and hparams["lr"] == "None"


def test_only_rank_zero_logs(tmp_path):
    pytest.importorskip("tensorboard", reason="optional: pip install 'pnnh[track]'")
    drive(TensorBoardLogger(), tmp_path, rank=1)
    assert not (tmp_path / "tensorboard").exists()


def wandb_records(run_file: Path) -> list:
    """The records of a W&B run file (``run-<id>.wandb``), decoded with W&B's own protobufs.

    The file is a 7-byte header (``:W&B``, magic, version) then LevelDB-log records: 32 KiB
    blocks of chunks, each ``crc32, length (u16), type (1 full, 2 first, 3 middle, 4 last)``.
    """
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
    return records


def wandb_logged(out: Path) -> tuple[list[dict], dict, dict]:
    """(history rows, final summary, config) of the offline W&B runs in ``out/wandb``."""
    import wandb

    wandb.teardown()  # W&B's service writes the run file in the background: wait for it
    history, summary, config = [], {}, {}
    for run_file in sorted(out.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            items = {"history": lambda: record.history.item, "summary": lambda: record.summary.update,
                     "config": lambda: record.config.update}.get(kind, lambda: [])()
            values = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
            if kind == "history":
                history.append(values)
            elif kind == "summary":
                summary.update(values)
            elif kind == "config":
                config.update(values)
    return history, summary, config


def test_wandb_offline_run_holds_the_scalars_summary_and_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="optional: pip install wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default: no account, no network
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    drive(WandbLogger(), tmp_path)
    history, summary, config = wandb_logged(tmp_path)
    assert [(row["_step"], row["train/loss"]) for row in history] == list(enumerate(STEP_LOSSES, start=1))
    assert [row["epoch/test_acc"] for row in history if "epoch/test_acc" in row] == [0.5, 0.75]
    assert history[2]["probe/final_cka"] == 0.25
    assert summary["final/best_acc"] == 0.75 and summary["probe_curve/end/cka"] == [1.0, 0.75, 0.5]
    assert config["model"] == "pnnh8" and config["model_kwargs"] == {"width": 8}

    # Resumed (a new session in the same run directory), it logs to the same W&B run id.
    (first,) = tmp_path.glob("wandb/offline-run-*")
    time.sleep(1)  # W&B names a session's folder by the second it started
    logger = WandbLogger()
    logger.on_train_start({"config": {"out": str(tmp_path)}, "out_dir": str(tmp_path), "rank": 0})
    logger.on_step(7, 0.25)
    logger.close()
    runs = sorted(tmp_path.glob("wandb/offline-run-*"))
    assert len(runs) == 2 and {p.name.rsplit("-", 1)[1] for p in runs} == {first.name.rsplit("-", 1)[1]}
    assert wandb_logged(tmp_path)[0][-1]["train/loss"] == 0.25


def test_parse_log_normalises_and_names_a_bad_entry():
    assert parse_log(" TensorBoard, wandb,tensorboard") == "tensorboard,wandb"
    assert parse_log(["wandb"]) == "wandb" and parse_log(None) is None
    assert [type(lg) for lg in build_loggers("tensorboard,wandb")] == [TensorBoardLogger, WandbLogger]
    mine = TensorBoardLogger("elsewhere")  # passed in callbacks=, it replaces the one --log would make
    assert [type(lg) for lg in build_loggers("tensorboard,wandb", [mine, object()])] == [WandbLogger]
    with pytest.raises(ValueError, match=r"log='mlflow' is not a known tracker; choose from tensorboard, wandb"):
        parse_log("tensorboard,mlflow")
    assert tuple(LOGGERS) == TRACKERS  # every name the config accepts has its logger


SMALL = {"model": "pnnh8", "model_kwargs": {"width": 4}, "data": "digits", "train_subset": 128, "test_subset": 64,
         "epochs": 2, "batch_size": 32, "device": "cpu", "precision": "fp32", "probe_every": 1}


class StepLosses:
    """A user callback beside the loggers: the losses the trainer hands every callback."""

    def __init__(self):
        self.losses = []

    def on_step(self, step, loss):
        self.losses.append((step, loss))


def test_train_with_log_writes_tensorboard_and_wandb_beside_metrics_jsonl(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="optional: pip install 'pnnh[track]'")
    pytest.importorskip("wandb", reason="optional: pip install wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    out, user = tmp_path / "run", StepLosses()
    result = train({**SMALL, "log": " TensorBoard,wandb", "out": str(out)}, progress=False, callbacks=[user])
    assert yaml.safe_load((out / "config.yaml").read_text())["log"] == "tensorboard,wandb"  # recorded, normalised
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if "train_loss" in r]

    scalars = tensorboard_scalars(out / "tensorboard")
    assert [s for s, _ in user.losses] == list(range(1, 9))  # 128 images / 32, 2 epochs: called 8 times
    assert scalars["train/loss"] == [(s, pytest.approx(v, rel=1e-6)) for s, v in user.losses]  # float32
    assert scalars["epoch/test_acc"] == [(r["step"], pytest.approx(r["test_acc"])) for r in epochs]
    assert [s for s, _ in scalars["probe/final_cka"]] == [4, 8]  # every epoch, with probe_every=1
    assert scalars["final/best_acc"] == [(8, pytest.approx(result.best_acc))]
    assert tensorboard_hparams(out / "tensorboard")["lr"] == pytest.approx(0.025)  # resolved: 0.1 x 32 / 128

    history, summary, config = wandb_logged(out)
    assert [row["train/loss"] for row in history if "train/loss" in row] == [loss for _, loss in user.losses]
    assert summary["final/best_acc"] == result.best_acc and config["log"] == "tensorboard,wandb"


def test_train_log_bad_name_or_missing_package_fails_before_writing(tmp_path, monkeypatch, capsys):
    from pnnh.cli import main

    out = tmp_path / "run"
    base = ["train", "--model", "pnnh8", "--data", "digits", "--out", str(out)]
    assert main([*base, "--log", "tensorboard,mlflow"]) == 2
    assert "log='mlflow' is not a known tracker; choose from tensorboard, wandb" in capsys.readouterr().err
    real_find_spec = importlib.util.find_spec  # wandb as if not installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    assert main([*base, "--log", "wandb"]) == 2
    assert "--log wandb needs the wandb package: pip install wandb" in capsys.readouterr().err
    assert not out.exists()


def test_sweep_cells_log_training_and_probe_curves(tmp_path):
    pytest.importorskip("tensorboard", reason="optional: pip install 'pnnh[track]'")
    from pnnh.experiments.sweep import load_sweep, run_sweep

    spec = load_sweep(models=["pnnh"], depths=[8], seeds=1, model_kwargs={"width": 4},
                      train={"data": "digits", "epochs": 1, "train_subset": 128, "test_subset": 64, "batch_size": 32,
                             "precision": "fp32", "log": "tensorboard"})
    (record,) = run_sweep(spec, tmp_path / "sweep", progress=False)
    scalars = tensorboard_scalars(tmp_path / "sweep" / "cells" / "pnnh-d8-s0" / "tensorboard")
    assert len(scalars["train/loss"]) == 4  # 128 images / 32
    for stage in ("init", "end"):
        assert [v for _, v in scalars[f"probe_curve/{stage}/cka"]] == pytest.approx(record["probe"][stage]["cka"])


def test_a_run_killed_before_its_first_checkpoint_resumes_with_its_logger_folder(tmp_path):
    pytest.importorskip("tensorboard", reason="optional: pip install 'pnnh[track]'")

    class Kill(Exception):
        pass

    class KillAtStep2:
        def on_step(self, step, loss):
            if step == 2:
                raise Kill

    out, cfg = tmp_path / "run", {**SMALL, "probe_every": 0, "epochs": 1, "log": "tensorboard"}
    with pytest.raises(Kill):
        train({**cfg, "out": str(out)}, progress=False, callbacks=[KillAtStep2()])
    assert (out / "tensorboard").is_dir() and not (out / "last.pt").exists()
    # The folder the logger made does not make the directory "not a pnnh run": it restarts.
    train({**cfg, "out": str(out)}, resume=True, progress=False)
    steps = [s for s, _ in tensorboard_scalars(out / "tensorboard")["train/loss"]]
    # The killed attempt's step 1 (flushed: the trainer closes its loggers on any exit; step 2
    # raised in the user callback, before the logger's turn), then the whole run's steps.
    assert steps == [1, 1, 2, 3, 4]
