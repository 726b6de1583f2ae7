"""The trainer on real data (sklearn digits): learning, run files, resume, crashes, divergence."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pnnh.cli import main as cli_main
from pnnh.data import TensorLoader, load_dataset
from pnnh.models import create_model, list_models, register_model
from pnnh.train import ConfigError, TrainingDiverged, load_config, resolve_config, train
from pnnh.io import atomic_write
from pnnh.train import checkpoint as checkpoint_module
from pnnh.train.checkpoint import load_checkpoint, save_checkpoint
from pnnh.train.optim import build_optimizer, lr_factor, param_groups

ROOT = Path(__file__).resolve().parents[1]
# Every metric but wall-clock ones must replay exactly on resume.
TIMING_KEYS = {"images_per_s", "seconds"}
SMALL = {"model": "resnet8", "model_kwargs": {"width": 8}, "data": "digits", "train_subset": 512,
         "test_subset": 256, "val_size": 128, "epochs": 4, "batch_size": 64, "device": "cpu",
         "precision": "fp32", "seed": 0}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread per test process


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "small"
    return train({**SMALL, "out": str(out)}, progress=False), out


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(a: list[dict], b: list[dict]) -> None:
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra.keys() - TIMING_KEYS:
            assert ra[key] == pytest.approx(rb[key], abs=1e-6, rel=0), (ra["epoch"], key)


def test_learns_digits(small_run):
    result, out = small_run
    lines = read_metrics(out)
    assert result.status == "ok" and [r["epoch"] for r in lines] == [1, 2, 3, 4]
    assert lines[-1]["train_loss"] < 0.5 * lines[0]["train_loss"]
    assert result.metrics["test_acc"] > 0.6  # chance is 0.1
    assert result.metrics == lines[-1]
    assert result.params == sum(p.numel() for p in create_model("resnet8", width=8, in_chans=1).parameters())


def test_run_files(small_run):
    result, out = small_run
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.json", "config.yaml", "last.pt",
                                                     "metrics.jsonl", "model.safetensors", "result.json"]
    saved = load_config(out / "config.yaml")  # the resolved config is itself a valid config
    assert (saved.optimizer, saved.lr, saved.schedule, saved.nesterov) == ("sgd", 0.05, "cosine", True)
    assert saved.channels_last in (True, False)  # auto resolved: the layout measured faster (pnnh.train.speed)
    assert saved.crop_pad == 0 and saved.out == str(out)
    lines = read_metrics(out)
    for line in lines:
        assert {"epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr",
                "images_per_s", "seconds"} <= line.keys()
    assert [r["step"] for r in lines] == [8, 16, 24, 32]  # 512 images / batch 64
    assert all(b["seconds"] > a["seconds"] for a, b in zip(lines, lines[1:]))
    last, best = load_checkpoint(out / "last.pt"), load_checkpoint(out / "best.pt")
    assert {"model", "optimizer", "scheduler", "state", "rng", "config"} <= last.keys()
    assert set(last["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert last["state"]["epoch"] == 4 and last["config"] == saved.to_dict()
    weights = load_file(str(out / "model.safetensors"))  # the best epoch's model, beside best.pt
    assert weights and all(torch.equal(t, best["model"][k]) for k, t in weights.items())
    best_epoch = max(lines, key=lambda r: r["val_acc"])["epoch"]  # val split present: select on val
    assert best["state"]["epoch"] == best_epoch == result.best_epoch
    assert result.best_acc == lines[best_epoch - 1]["val_acc"]
    assert json.loads((out / "result.json").read_text())["metrics"] == lines[-1]


def test_checkpoint_reproduces_logged_accuracy(small_run):
    _, out = small_run
    model = create_model("resnet8", width=8, num_classes=10, in_chans=1, img_size=8)
    model.load_state_dict(load_checkpoint(out / "last.pt")["model"])
    model.eval()
    splits = load_dataset("digits", val_size=128, train_subset=512, test_subset=256)
    loader = TensorLoader(splits.test_x, splits.test_y, 256, mean=splits.mean, std=splits.std, train=False)
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    assert correct / len(splits.test_y) == pytest.approx(read_metrics(out)[-1]["test_acc"], abs=1e-9)


def test_refuses_non_empty_out_dir(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError) as info:
        train({**SMALL, "out": str(tmp_path)}, progress=False)
    assert str(tmp_path) in str(info.value) and "notes.txt" in str(info.value) and "--resume" in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"
    for target in (tmp_path, tmp_path / "new"):  # not a run directory / nothing there
        with pytest.raises(ConfigError, match="cannot resume"):
            train({**SMALL, "out": str(target)}, resume=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_resume_restarts_a_run_killed_in_its_first_epoch(small_run, tmp_path):
    # What a kill during epoch 1 leaves: the config, a log and a half-written checkpoint.
    (tmp_path / "config.yaml").write_text((small_run[1] / "config.yaml").read_text())
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "train_lo')
    (tmp_path / ".last.pt.x1y2.tmp").write_bytes(b"torn")
    train({**SMALL, "out": str(tmp_path)}, resume=True, progress=False)
    assert_same_metrics(read_metrics(tmp_path), read_metrics(small_run[1]))
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_refuses_a_changed_config(small_run):
    _, out = small_run
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(ConfigError, match=r"lr: 0\.05 -> 0\.2"):
        train({**SMALL, "lr": 0.2, "out": str(out)}, resume=True, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    flags = ["--model", "resnet8", "--set", "width=32", "--data", "digits", "--train-subset", "1200",
             "--test-subset", "256", "--val-size", "128", "--epochs", "3", "--batch-size", "16", "--device", "cpu",
             "--precision", "fp32", "--seed", "3"]
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pnnh", "train", *flags, "--out", str(out)]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.pt").exists():  # appears, atomically, once epoch 1 is complete
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "epoch 1 did not finish in 120 s"
            time.sleep(0.01)
        time.sleep(0.25)  # into epoch 2 (an epoch takes about 1 s here)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert load_checkpoint(out / "last.pt")["state"]["epoch"] == 1, "the kill came after epoch 2 finished"
    # A kill between logging epoch 2 and saving it leaves a line ahead of last.pt, possibly torn.
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "train_loss": 9.9}) + '\n{"epoch": 3, "tra')

    resumed = subprocess.run([sys.executable, "-m", "pnnh", "train", "--resume", "--out", str(out)], env=env,
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    reference = train(load_config(out / "config.yaml", {"out": str(tmp_path / "reference")}), progress=False)
    assert_same_metrics(read_metrics(out), read_metrics(tmp_path / "reference"))
    assert read_metrics(out)[-1]["test_acc"] == pytest.approx(reference.metrics["test_acc"], abs=1e-6)
    resumed_weights = load_checkpoint(out / "last.pt")["model"]
    for name, tensor in load_checkpoint(tmp_path / "reference" / "last.pt")["model"].items():
        torch.testing.assert_close(resumed_weights[name], tensor, atol=1e-6, rtol=0)


def test_checkpoint_every_resumes_inside_an_epoch_to_the_uninterrupted_result(tmp_path):
    """--checkpoint-every N: a run killed mid-epoch loses at most N steps and, resumed, logs and
    saves exactly what the run that never stopped does (here: killed before step 13 of 2 x 8)."""
    flags = ["--model", "resnet8", "--set", "width=8", "--data", "digits", "--train-subset", "512",
             "--test-subset", "128", "--val-size", "64", "--epochs", "2", "--batch-size", "64", "--device", "cpu",
             "--precision", "fp32", "--seed", "5", "--grad-noise", "0.01", "--checkpoint-every", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-m", "pnnh", "train", *flags, "--out", str(out)],
                            env={**env, "PNNH_FAULT": "exit:0:13"}, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == 1 and "exits before step 13" in killed.stderr, killed.stderr
    saved = load_checkpoint(out / "last.pt")["state"]
    assert (saved["step"], saved["epoch"], saved["epoch_step"]) == (12, 1, 4)  # 8 steps/epoch: 4 into epoch 2
    assert [r["epoch"] for r in read_metrics(out)] == [1]

    resumed = subprocess.run([sys.executable, "-m", "pnnh", "train", "--resume", "--out", str(out)], env=env,
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    reference = tmp_path / "reference"
    train(load_config(out / "config.yaml", {"out": str(reference)}), progress=False)
    assert_same_metrics(read_metrics(out), read_metrics(reference))
    assert load_checkpoint(out / "last.pt")["state"]["epoch_step"] == 0  # the epoch's end clears it
    resumed_weights = load_checkpoint(out / "last.pt")["model"]
    for name, tensor in load_checkpoint(reference / "last.pt")["model"].items():
        torch.testing.assert_close(resumed_weights[name], tensor, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match=r"checkpoint_every=0 .*>= 1|checkpoint_every"):
        load_config({**SMALL, "checkpoint_every": 0})


def test_atomic_write_keeps_old_file_when_writer_crashes(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "model": {"w": torch.arange(4.0)}})

    def crash(f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, crash)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_crash_while_saving_epoch_checkpoint_then_resume(small_run, tmp_path, monkeypatch):
    out = tmp_path / "crashed"
    real_write = checkpoint_module.atomic_write
    saves = []

    def torn(f):
        f.write(b"torn")
        raise RuntimeError("injected crash")

    def crash_on_second_last_pt(path, write):
        saves.append(Path(path).name)
        real_write(path, torn if saves.count("last.pt") == 2 else write)  # epoch 2's last.pt

    monkeypatch.setattr(checkpoint_module, "atomic_write", crash_on_second_last_pt)
    with pytest.raises(RuntimeError, match="injected crash"):
        train({**SMALL, "out": str(out)}, progress=False)
    monkeypatch.setattr(checkpoint_module, "atomic_write", real_write)
    assert load_checkpoint(out / "last.pt")["state"]["epoch"] == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2]  # logged before the failed save

    train({**SMALL, "out": str(out)}, resume=True, progress=False)
    assert_same_metrics(read_metrics(out), read_metrics(small_run[1]))


class NaNAfter(nn.Module):
    """A linear classifier whose output turns NaN after a set number of training steps."""

    arch = "mlp"

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 8, good_steps: int = 6):
        super().__init__()
        self.fc = nn.Linear(in_chans * img_size * img_size, num_classes)
        self.good_steps, self.calls = good_steps, 0

    def feature_layers(self):
        return [("fc", self.fc)]

    def forward(self, x):
        logits = self.fc(x.flatten(1))
        if self.training:
            self.calls += 1
            if self.calls > self.good_steps:
                logits = logits * float("nan")
        return logits


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path):
    if "test_nan_after" not in list_models():
        register_model("test_nan_after", NaNAfter)
    out = tmp_path / "nan"
    config = {**SMALL, "model": "test_nan_after", "model_kwargs": {}, "train_subset": 256, "epochs": 3,
              "out": str(out)}
    with pytest.raises(TrainingDiverged) as info:
        train(config, progress=False)
    message = str(info.value)
    assert "epoch 2" in message and "batch 3/4" in message and "nan" in message and "last.pt" in message
    assert info.value.result.status == "diverged" and info.value.result.metrics["epoch"] == 1
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["state"]["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert [r["epoch"] for r in read_metrics(out)] == [1]
    assert json.loads((out / "result.json").read_text())["status"] == "diverged"


def test_cli_exit_codes(tmp_path, capsys):
    base = ["train", "--data", "digits", "--train-subset", "256", "--test-subset", "128", "--epochs", "2",
            "--batch-size", "64", "--device", "cpu"]
    assert cli_main([*base, "--model", "plain_mlp", "--lr", "1e6", "--warmup-epochs", "0",
                     "--out", str(tmp_path / "diverged")]) == 1
    err = capsys.readouterr().err
    assert "training diverged" in err and "epoch 1" in err and "no checkpoint" in err
    assert cli_main([*base, "--model", "resnet2", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "'resnet2'" in err and "resnet20" in err and not (tmp_path / "bad").exists()


def test_probe_at_init_every_k_epochs_and_without_side_effects(small_run, tmp_path):
    train({**SMALL, "probe_every": 3, "out": str(tmp_path)}, progress=False)
    lines = read_metrics(tmp_path)
    assert lines[0].keys() == {"epoch", "probe"} and lines[0]["epoch"] == 0
    assert [r["epoch"] for r in lines if "probe" in r] == [0, 3, 4]  # init, every 3rd, the end
    layers = len(create_model("resnet8", width=8, in_chans=1).feature_layers())
    assert all(r["probe"]["layers"] == layers and 0 <= r["probe"]["final_cka"] <= 1 for r in lines if "probe" in r)
    without_probe = [{k: v for k, v in r.items() if k != "probe"} for r in lines[1:]]
    assert_same_metrics(without_probe, read_metrics(small_run[1]))
    assert load_checkpoint(tmp_path / "last.pt")["state"]["history"] == lines


def test_max_steps_and_bf16(tmp_path):
    result = train({**SMALL, "model": "plain_mlp", "model_kwargs": {}, "precision": "bf16", "max_steps": 11,
                    "val_size": 0, "out": str(tmp_path)}, progress=False)
    lines = read_metrics(tmp_path)
    assert [r["step"] for r in lines] == [8, 11]  # stopped inside epoch 2
    assert load_config(tmp_path / "config.yaml").precision == "bf16"
    assert math.isfinite(result.metrics["train_loss"]) and result.metrics["test_acc"] > 0.3
    assert result.best_epoch == max(lines, key=lambda r: r["test_acc"])["epoch"]  # no val: select on test


def test_param_groups_exempt_norms_biases_and_scale_the_coder():
    # A trainable coder (the default coder is frozen and so in no group at all).
    model = create_model("pnnh8", width=8, num_classes=10, in_chans=1, coder_trainable=True)
    groups = {g["name"]: g for g in param_groups(model, lr=0.1, weight_decay=5e-4, coder_lr_scale=0.5,
                                                 coder_weight_decay=0.0)}
    assert set(groups) == {"decay", "no_decay", "coder"}
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim <= 1 for p in groups["no_decay"]["params"]) and groups["no_decay"]["weight_decay"] == 0
    assert all("coder" in names[id(p)] for p in groups["coder"]["params"])
    assert groups["coder"]["lr"] == 0.05 and groups["coder"]["weight_decay"] == 0.0
    assert all(p.ndim > 1 and "coder" not in names[id(p)] for p in groups["decay"]["params"])

    # With zero gradients only weight decay moves parameters: exactly the decay group moves.
    cfg = resolve_config(load_config({"model": "pnnh8", "data": "digits", "lr": 0.1, "weight_decay": 0.1,
                                      "coder_weight_decay": 0.0, "device": "cpu"}), "cnn", 8)
    optimizer = build_optimizer(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (p.ndim > 1 and "coder" not in name and before[name].abs().sum() > 0), name


def test_lr_schedules():
    warm, total = 10, 110
    cosine = [lr_factor(s, warm, total, "cosine") for s in range(total)]
    assert cosine[0] == pytest.approx(0.1) and cosine[warm - 1] == 1.0 and cosine[warm] == 1.0
    assert cosine[warm + 50] == pytest.approx(0.5) and cosine[-1] < 1e-3
    assert all(a >= b for a, b in zip(cosine[warm:], cosine[warm + 1:]))
    assert lr_factor(60, warm, total, "onecycle") == pytest.approx(0.5)
    assert lr_factor(109, warm, total, "constant") == 1.0


def test_atomic_write_gives_the_usual_file_permissions(tmp_path):
    from pnnh.io import _UMASK, atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    # mkstemp alone would leave 0o600 (unreadable to the group even with umask 022).
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~_UMASK


def test_compiled_training_matches_eager_and_saves_plain_weights(small_run, tmp_path):
    """--compile trains the same function (same metrics up to fused-kernel rounding) and its
    checkpoints load into an uncompiled model (no torch.compile wrapper names)."""
    eager = read_metrics(small_run[1])
    train({**SMALL, "compile": True, "out": str(tmp_path)}, progress=False)
    compiled = read_metrics(tmp_path)
    assert len(compiled) == len(eager)
    for a, b in zip(eager, compiled):
        # fused kernels round differently; SGD lets the difference grow (measured: 1e-5 relative
        # after epoch 1, 1.2e-3 after epoch 4, one test image of 256)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=5e-3)
        assert b["test_acc"] == pytest.approx(a["test_acc"], abs=3 / 256)
    assert compiled[0]["train_loss"] == pytest.approx(eager[0]["train_loss"], rel=1e-4)
    model = create_model("resnet8", width=8, num_classes=10, in_chans=1, img_size=8)
    model.load_state_dict(load_checkpoint(tmp_path / "last.pt")["model"])  # strict: names match


class _Counting:
    """A user callback: plain object, no base class, every hook recorded."""

    def __init__(self):
        self.calls = {"start": [], "step": [], "epoch": [], "end": []}

    def on_train_start(self, info):
        self.calls["start"].append(info)

    def on_step(self, step, loss):
        self.calls["step"].append((step, loss))

    def on_epoch_end(self, epoch, record):
        self.calls["epoch"].append((epoch, record))

    def on_train_end(self, result):
        self.calls["end"].append(result)


class _Stop(Exception):
    pass


def test_callbacks_are_called_at_each_step_and_epoch(tmp_path):
    from pnnh.train import Callback

    class EpochsOnly(Callback):  # subclass of the protocol: the hooks it does not override are no-ops
        def __init__(self):
            self.epochs = []

        def on_epoch_end(self, epoch, record):
            self.epochs.append(epoch)

    counting, epochs_only = _Counting(), EpochsOnly()
    cfg = {**SMALL, "epochs": 2, "val_size": 0, "out": str(tmp_path / "run")}
    result = train(cfg, progress=False, callbacks=[counting, epochs_only, object()])  # object(): has no hook
    calls, lines = counting.calls, read_metrics(tmp_path / "run")
    assert len(calls["start"]) == 1 and calls["end"] == [result]
    info = calls["start"][0]
    assert info["steps_per_epoch"] == 8 and info["total_steps"] == 16 and info["start_epoch"] == 1
    assert info["params"] == result.params and info["config"].lr == 0.05  # the resolved config
    assert [s for s, _ in calls["step"]] == list(range(1, 17))  # 512 images / batch 64, 2 epochs
    assert all(math.isfinite(loss) for _, loss in calls["step"])
    assert [e for e, _ in calls["epoch"]] == [1, 2] and epochs_only.epochs == [1, 2]
    assert [r for _, r in calls["epoch"]] == lines  # the record is the metrics.jsonl line
    # the mean of an epoch's step losses is its train_loss (equal batches here)
    assert sum(loss for _, loss in calls["step"][:8]) / 8 == pytest.approx(lines[0]["train_loss"], rel=1e-9)


def test_a_callback_exception_stops_training_and_propagates(tmp_path):
    class StopAfterFirstEpoch:
        def on_epoch_end(self, epoch, record):
            raise _Stop(f"pruned at epoch {epoch}")

    out = tmp_path / "run"
    with pytest.raises(_Stop, match="pruned at epoch 1"):
        train({**SMALL, "epochs": 3, "out": str(out)}, progress=False, callbacks=[StopAfterFirstEpoch()])
    assert [r["epoch"] for r in read_metrics(out)] == [1]
    assert load_checkpoint(out / "last.pt")["state"]["epoch"] == 1  # the stopped run resumes from there
    assert not (out / "result.json").exists()
