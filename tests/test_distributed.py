"""Multi-process training with real processes: torchrun, gloo on 127.0.0.1, Fashion-MNIST.

Equivalence design. 2 processes with global batch 2B (B per rank) must do the arithmetic of
1 process with batch 2B. Each run here has 64 training images and batch 64, so every epoch is
one optimizer step and the logged ``train_loss`` of epoch k is the loss of step k; the test
compares steps 1..3, the sharded-and-reduced test metrics (101 images: shards of 51 and 50)
and the final weights in ``last.pt``.

- The ViT normalises with LayerNorm (per image), so the 2-process run must match the plain
  1-process run.
- BatchNorm nets: torch's SyncBatchNorm only works on GPUs, so on this CPU machine each rank's
  BatchNorm normalises over its own B images. That is *exactly* what 1 process computes when
  every BatchNorm sees each half of the batch separately, and the running statistics are
  those of the first half (DDP broadcasts rank 0's buffers). ``ghost_batchnorm`` builds that
  reference from the ordinary trainer by patching the model's forward; the test also checks
  that the plain 1-process run differs, i.e. that the comparison can tell the two apart.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pnnh
import pnnh.models
from pnnh.models import create_model
from pnnh.train import ConfigError, load_config, train
from pnnh.train.checkpoint import load_checkpoint
from pnnh.train.distributed import launch_env, per_rank_batch

SRC = Path(pnnh.__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_worker.py")
TIMING_KEYS = {"images_per_s", "seconds"}
BASE = {"data": "fashion-mnist", "train_subset": 64, "test_subset": 101, "batch_size": 64, "epochs": 3,
        "device": "cpu", "precision": "fp32", "seed": 0,
        # One layout for both: under "auto" one process measures its layout, several use the width rule.
        "channels_last": False}
MODELS = {
    "resnet20": {"model": "resnet20", "model_kwargs": {"width": 4}, "lr": 0.2},
    "pnnh20": {"model": "pnnh20", "model_kwargs": {"width": 8}, "lr": 0.2},
    "pnnh_vit_tiny": {"model": "pnnh_vit_tiny", "model_kwargs": {"width": 16, "depth": 2, "heads": 2},
                      "lr": 0.01},
}
BN_MODELS = ("resnet20", "pnnh20")
VIT_FLAGS = ["--model", "pnnh_vit_tiny", "--set", "width=16", "--set", "depth=2", "--set", "heads=2",
             "--data", "fashion-mnist", "--train-subset", "64", "--test-subset", "101", "--batch-size", "64",
             "--epochs", "3", "--device", "cpu", "--precision", "fp32", "--seed", "0", "--lr", "0.01"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread per test process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env_vars(fault: str | None = None) -> dict[str, str]:
    """The environment of a launched job: one thread, this checkout's pnnh, optional fault."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("PNNH_FAULT", None)
    if fault:
        env["PNNH_FAULT"] = fault
    return env


def torchrun(args: list[str], *, fault: str | None = None, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m torch.distributed.run --nproc-per-node 2 ARGS`` on 127.0.0.1; (process, seconds)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=launch_env_vars(fault), capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - start


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "last.pt")["model"]


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa if wa[k].is_floating_point())


def assert_same_run(a: Path, b: Path) -> None:
    """Per-step losses, reduced test metrics and final weights agree to float rounding."""
    ma, mb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [1, 2, 3]  # one step per epoch
    for ra, rb in zip(ma, mb):
        assert ra.keys() == rb.keys()
        for key in ra.keys() - TIMING_KEYS:
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (ra["epoch"], key)
    assert max_weight_diff(a, b) < 1e-5


@contextlib.contextmanager
def ghost_batchnorm(parts: int):
    """``create_model`` patched so a training forward runs each of ``parts`` equal slices of the
    batch on its own (BatchNorm statistics per slice) and keeps the running statistics the first
    slice left: the arithmetic of ``parts`` DDP ranks without SyncBatchNorm."""
    original = pnnh.models.create_model

    def create(*args, **kwargs):
        model = original(*args, **kwargs)
        forward = model.forward

        def ghost(x):
            if not model.training:
                return forward(x)
            outs, kept = [], None
            for chunk in x.chunk(parts):
                outs.append(forward(chunk))
                if kept is None:
                    kept = [(m, name, b.clone()) for m in model.modules() for name, b in m._buffers.items()
                            if b is not None]
            for m, name, b in kept:  # new tensors: the graph keeps the ones it saved unmodified
                m._buffers[name] = b
            return torch.cat(outs)

        model.forward = ghost
        return model

    pnnh.models.create_model = create
    try:
        yield
    finally:
        pnnh.models.create_model = original


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-process launch running every model and the error cases, plus the 1-process references."""
    root = tmp_path_factory.mktemp("dist")
    (root / "taken").mkdir()
    (root / "taken" / "mine.txt").write_text("keep")
    jobs = [{"kind": "train", "config": {**BASE, **MODELS[name], "out": str(root / f"{name}-2p")}}
            for name in MODELS]
    jobs.append({"kind": "coder_grad", "model_kwargs": {"width": 8, "coder_trainable": True}, "batch": 8, "seed": 3})
    vit = {**BASE, **MODELS["pnnh_vit_tiny"]}
    errors = {
        "batch": {**vit, "batch_size": 63, "out": str(root / "e-batch")},
        "sync_bn": {**BASE, **MODELS["resnet20"], "sync_bn": True, "out": str(root / "e-syncbn")},
        "too_few_train": {**vit, "train_subset": 40, "out": str(root / "e-few")},
        "too_few_test": {**vit, "test_subset": 1, "out": str(root / "e-test")},
        "taken": {**vit, "out": str(root / "taken")},
    }
    jobs += [{"kind": "train", "config": cfg} for cfg in errors.values()]
    (root / "jobs.json").write_text(json.dumps(jobs))
    proc, seconds = torchrun([str(WORKER), str(root / "jobs.json"), str(root)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]
    n = len(MODELS)
    results = {"root": root, "seconds": seconds, "ranks": ranks,
               "train": {name: [rk["jobs"][i] for rk in ranks] for i, name in enumerate(MODELS)},
               "errors": {name: [rk["jobs"][n + 1 + i] for rk in ranks] for i, name in enumerate(errors)}}
    for name in MODELS:  # 1-process references with the global batch
        cfg = {**BASE, **MODELS[name]}
        train({**cfg, "out": str(root / f"{name}-1p")}, progress=False)
        if name in BN_MODELS:
            with ghost_batchnorm(2):
                train({**cfg, "out": str(root / f"{name}-1p-ghost")}, progress=False)
    return results


@pytest.mark.parametrize("name", list(MODELS))
def test_two_processes_match_one_process_with_the_global_batch(runs, name):
    root = runs["root"]
    two = root / f"{name}-2p"
    outcomes = runs["train"][name]
    assert all("result" in o for o in outcomes), outcomes
    # Every rank reports the same all-reduced metrics; only rank 0 wrote the run directory.
    m0, m1 = (o["result"]["metrics"] for o in outcomes)
    assert {k: v for k, v in m0.items() if k not in TIMING_KEYS} == {k: v for k, v in m1.items() if k not in TIMING_KEYS}
    assert sorted(p.name for p in two.iterdir()) == ["best.pt", "config.json", "config.yaml", "last.pt",
                                                     "metrics.jsonl", "model.safetensors", "result.json"]
    assert load_config(two / "config.yaml").batch_size == 64  # the global batch is what is saved
    if name in BN_MODELS:
        assert_same_run(two, root / f"{name}-1p-ghost")
        # BatchNorm over 32 vs 64 images: the plain 1-process run is measurably different.
        assert max_weight_diff(two, root / f"{name}-1p") > 1e-3
    else:
        assert_same_run(two, root / f"{name}-1p")
    losses = [r["train_loss"] for r in read_metrics(two)]
    assert losses[-1] < losses[0]  # it trains


def test_shared_trainable_coder_gets_one_identical_gradient_on_every_rank(runs):
    root = runs["root"]
    grads = [torch.load(root / f"grads_rank{r}.pt", weights_only=True) for r in (0, 1)]
    coder = [k for k in grads[0] if "coder" in k]
    assert coder and grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        assert torch.equal(grads[0][key], grads[1][key]), key  # all-reduced: bit-identical
    # Reference: the gradient of the mean of the two ranks' losses, computed in one process
    # (each half through the BatchNorms on its own, as on its rank).
    torch.manual_seed(3)
    model = create_model("pnnh20", num_classes=10, in_chans=1, img_size=28, width=8, coder_trainable=True)
    shared = {id(m.coder.weight) for m in model.modules() if hasattr(m, "coder") and hasattr(m.coder, "weight")}
    uses = [sum(getattr(getattr(m, "coder", None), "weight", None) is p for m in model.modules())
            for n, p in model.named_parameters() if "coder" in n]
    assert len(shared) == len(coder) and max(uses) > 1  # the checked coders are shared by several layers
    batch = torch.load(root / "grad_batch.pt", weights_only=True)
    x, y = batch["x"], batch["y"]
    assert len(x) == 16
    loss = (F.cross_entropy(model(x[:8]), y[:8]) + F.cross_entropy(model(x[8:]), y[8:])) / 2
    loss.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[0][name], p.grad, rtol=1e-4, atol=1e-6), name
    assert all(grads[0][k].abs().sum() > 0 for k in coder)
    # A frozen coder (the default) has no gradient: DDP must leave it out, not fail.
    frozen = create_model("pnnh20", num_classes=10, in_chans=1, img_size=28, width=8)
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if "coder" in n)


def test_config_errors_are_clear_and_the_same_on_every_rank(runs):
    errors = runs["errors"]
    for name, outcomes in errors.items():
        assert all("error" in o for o in outcomes), (name, outcomes)
        assert outcomes[0] == outcomes[1], name
    msg = {name: outcomes[0]["error"] for name, outcomes in errors.items()}
    assert "batch_size=63" in msg["batch"] and "world size 2" in msg["batch"] and "62 or 64" in msg["batch"]
    assert "sync_bn needs CUDA" in msg["sync_bn"] and "'cpu'" in msg["sync_bn"]
    assert ("batch_size=64 over 2 processes is more than the 40 training images of 'fashion-mnist': "
            "pass --batch-size 40 or less") in msg["too_few_train"]
    assert "1 samples cannot be split over world_size=2" in msg["too_few_test"]
    assert "is not empty" in msg["taken"] and "mine.txt" in msg["taken"]
    root = runs["root"]
    assert (root / "taken" / "mine.txt").read_text() == "keep" and len(list((root / "taken").iterdir())) == 1
    assert not any((root / d).exists() for d in ("e-batch", "e-syncbn", "e-few", "e-test"))


def test_killed_rank_ends_the_job_and_resume_completes_it(runs, tmp_path):
    out = tmp_path / "run"
    # Rank 1 dies before step 2 (epoch 1 is saved): the job must end, naming rank 1, not hang.
    proc, seconds = torchrun(["-m", "pnnh", "train", *VIT_FLAGS, "--dist-timeout", "30", "--out", str(out)],
                             fault="exit:1:2")
    assert proc.returncode != 0 and seconds < 60
    root_cause = proc.stderr.split("Root Cause")[-1]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", root_cause), proc.stderr[-2000:]
    assert "PNNH_FAULT: rank 1 exits before step 2" in proc.stderr
    assert [r["epoch"] for r in read_metrics(out)] == [1]
    assert load_checkpoint(out / "last.pt")["state"]["step"] == 1
    # Resuming with the saved config finishes the run as if nothing had happened.
    proc, _ = torchrun(["-m", "pnnh", "train", "--resume", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done:") == 1  # rank 0 alone reports
    assert_same_run(out, runs["root"] / "pnnh_vit_tiny-1p")


def test_two_machine_rendezvous_matches_one_process(runs, tmp_path):
    # Two torchrun agents (as on two machines, one process each) meet through c10d rendezvous.
    out = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "pnnh-test",
           "-m", "pnnh", "train", *VIT_FLAGS, "--out", str(out)]
    agents = [subprocess.Popen(cmd, env=launch_env_vars(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    try:
        outputs = [agent.communicate(timeout=120) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    assert [agent.returncode for agent in agents] == [0, 0], [err[-2000:] for _, err in outputs]
    assert sum(stdout.count("done:") for stdout, _ in outputs) == 1  # global rank 0 alone reports
    assert_same_run(out, runs["root"] / "pnnh_vit_tiny-1p")


def test_stalled_rank_times_out_with_a_clear_error(tmp_path):
    proc, seconds = torchrun(["-m", "pnnh", "train", *VIT_FLAGS, "--dist-timeout", "4", "--out", str(tmp_path / "r")],
                             fault="hang:1:2")
    assert proc.returncode != 0
    assert seconds < 45  # the 4 s timeout, not the hour rank 1 sleeps
    assert "pnnh train: error: rank 0 of 2 lost the other ranks" in proc.stderr
    assert "dist_timeout=4s" in proc.stderr


def test_cli_batch_not_divisible_by_world_size(tmp_path):
    flags = list(VIT_FLAGS)
    flags[flags.index("--batch-size") + 1] = "63"
    proc, _ = torchrun(["-m", "pnnh", "train", *flags, "--out", str(tmp_path / "r")])
    assert proc.returncode != 0
    line = "pnnh train: error: batch_size=63 is the global batch and must be divisible by the world size 2"
    assert proc.stderr.count(line) == 1, proc.stderr[-2000:]  # printed by rank 0 only
    assert not (tmp_path / "r").exists()


def test_per_rank_batch_and_launch_environment(monkeypatch):
    assert per_rank_batch(128, 1) == 128 and per_rank_batch(128, 4) == 32
    with pytest.raises(ConfigError, match=r"batch_size=10 .* world size 4 .* use e\.g\. 8 or 12"):
        per_rank_batch(10, 4)
    with pytest.raises(ConfigError, match=r"batch_size=3 .* world size 4 .* use e\.g\. 4$"):
        per_rank_batch(3, 4)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert launch_env() == (0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match=r"RANK=2 is invalid for WORLD_SIZE=2: valid ranks are 0\.\.1"):
        launch_env()
    with pytest.raises(ConfigError, match="RANK=2"):  # train refuses before touching anything
        train({**BASE, **MODELS["pnnh_vit_tiny"], "out": "/nonexistent/never-created"}, progress=False)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two' is not an integer"):
        launch_env()


def test_sync_batchnorm_conversion_reaches_partial_batchnorm():
    # convert_sync_batchnorm recurses into children, so PNNH's PartialBatchNorm(.bn) is covered.
    model = create_model("pnnh20", num_classes=10, in_chans=1, img_size=28, width=8)
    keys = set(model.state_dict())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    partial = [m for m in model.modules() if type(m).__name__ == "PartialBatchNorm"]
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert n_bn > 0 and partial and not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == n_bn
    assert all(isinstance(m.bn, nn.SyncBatchNorm) for m in partial)
    assert set(converted.state_dict()) == keys  # checkpoints stay interchangeable


def test_gpu_launch_is_checked_before_the_process_group_starts(monkeypatch):
    # No GPU here: pretend one is visible to check the NCCL-path validation of init_distributed.
    from pnnh.train import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=1 needs GPU cuda:1 but only 1 CUDA device"):
        distributed.init_distributed("cuda", timeout=5)
    with pytest.raises(ConfigError, match=r"device 'cuda:0' names one GPU.*pass --device cuda"):
        distributed.init_distributed("cuda:0", timeout=5)
    assert not torch.distributed.is_initialized()


def test_fault_injection_is_inert_unless_set_and_checks_its_spec(monkeypatch):
    from pnnh.train.distributed import fault_point

    monkeypatch.delenv("PNNH_FAULT", raising=False)
    fault_point(1)  # unset: nothing happens
    monkeypatch.setenv("PNNH_FAULT", "exit:1:2")
    fault_point(2)  # this process is rank 0 of 1: not the targeted rank
    monkeypatch.setenv("PNNH_FAULT", "crash:1")
    with pytest.raises(ValueError, match=r"PNNH_FAULT='crash:1' is not valid: use exit:RANK:STEP or hang:RANK:STEP"):
        fault_point(1)
