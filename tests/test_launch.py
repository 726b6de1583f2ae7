"""Sweeps as submitit jobs, run by submitit's LocalExecutor (real processes, real signals):
two tiny cells on digits run to completion; a preempted job (USR2, as Slurm sends before it
stops a job) checkpoints, is requeued and resumes its cell; a job killed outright is resumed
by submitting the same sweep again; and the report reads the directory while jobs run."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import pytest

from pnnh.cli import main
from pnnh.experiments.launch import ClusterOptions, cluster_options, job_states, submit_sweep
from pnnh.experiments.report import write_report
from pnnh.experiments.sweep import load_sweep, read_cells
from pnnh.train.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"data": "digits", "img_size": 8, "batch_size": 128, "device": "cpu", "precision": "fp32"}
OPTIONS = ClusterOptions(gpus=0, cpus=1, time=60)  # 60 min: a signal before 48 min is a preemption


@pytest.fixture(autouse=True)
def one_thread_jobs(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the job processes inherit it: 2 shared cores


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def epochs_logged(cell_dir: Path) -> list[int]:
    path = cell_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["epoch"] for line in lines if line.strip().endswith("}")]


def test_two_cells_on_digits_run_as_jobs_to_completion(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--launcher", "submitit-local", "--models", "resnet,pnnh", "--depths", "8", "--seeds", "1",
            "--data", "digits", "--img-size", "8", "--epochs", "2", "--device", "cpu", "--precision", "fp32",
            "--gpus", "0", "--cpus", "1", "--time", "60", "--cells-per-job", "2", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "submitted 1 job(s) to local" in printed and "report:" in printed  # both cells in one job
    records = read_cells(out)
    assert sorted(r["id"] for r in records) == ["pnnh-d8-s0", "resnet-d8-s0"]
    assert all(r["status"] == "ok" and r["epochs"] == 2 for r in records)
    states = job_states(out)
    assert {s["state"] for s in states.values()} == {"finished"} and all(s["starts"] == 1 for s in states.values())
    report = (out / "report.md").read_text()
    assert "| resnet | 8 |" in report and "| pnnh | 8 |" in report and "Part-way" not in report
    assert main(argv) == 0 and "nothing to submit" in capsys.readouterr().out


def job_log(out: Path) -> str:
    """Everything the jobs wrote (submitit's own log lines too)."""
    return "".join(p.read_text() for p in sorted((out / ".jobs" / "logs").glob("*_log.*")))


def test_preempted_job_is_requeued_and_a_killed_one_resubmitted_both_resume(tmp_path, monkeypatch):
    recipe = tmp_path / "sweep.yaml"
    recipe.write_text("sweep: {variants: {short: {model: resnet, train: {epochs: 2}}, long: {model: resnet}}, "
                      "depths: [8], seeds: 1}\n")
    spec = load_sweep(recipe, train={**TINY, "epochs": 12})
    out = tmp_path / "sweep"
    cell, hang = out / "cells" / "long-d8-s0", "PNNH_FAULT: rank 0 hangs before step 25"
    # One job, two cells: the short one (20 steps) finishes; the long one stalls in epoch 3 (10
    # steps per epoch), after last.pt of epoch 2, until a signal comes.
    monkeypatch.setenv("PNNH_FAULT", "hang:0:25")
    [job] = submit_sweep(spec, out, dataclasses.replace(OPTIONS, cells_per_job=2), cluster="local")
    wait_for(lambda: job_log(out).count(hang) == 1, 120, "the job to reach step 25")
    # the report reads the directory while the job runs: one cell recorded, the other held by its job
    report = write_report(out).read_text()
    assert "Part-way: 1 of 2 cells recorded.** Training now: long-d8-s0" in report
    assert "long-d8-s0: running on" in report and f"job {job.job_id}" in report
    assert epochs_logged(cell) == [1, 2]
    os.kill(job_states(out)["long-d8-s0"]["pid"], signal.SIGUSR2)  # preemption, as Slurm signals it
    # submitit calls CellJob.checkpoint, requeues; the new start resumes from epoch 2 and stalls again
    wait_for(lambda: job_log(out).count(hang) == 2, 120, "the requeued job to reach step 25")
    log = job_log(out)
    assert "this job is preempted" in log and "Calling checkpoint method" in log and "Requeued job" in log
    assert job_states(out)["long-d8-s0"]["starts"] == 2 and epochs_logged(cell) == [1, 2]
    os.kill(job_states(out)["long-d8-s0"]["pid"], signal.SIGKILL)  # no checkpoint, no requeue
    wait_for(lambda: job.done(force_check=True), 60, "the killed job to end")  # not requeued
    assert [c["id"] for c in read_cells(out)] == ["short-d8-s0"]
    monkeypatch.delenv("PNNH_FAULT")
    [again] = submit_sweep(spec, out, OPTIONS, cluster="local")  # the same sweep, submitted again
    [record] = again.result()
    assert record["status"] == "ok" and record["epochs"] == 12
    assert epochs_logged(cell) == list(range(1, 13))  # every epoch once: resumed, not restarted
    assert job_states(out)["long-d8-s0"]["starts"] == 3


def test_cluster_options_and_bad_values(tmp_path, capsys):
    opts = cluster_options({"partition": "gpu", "time": 60, "array_size": 4}, {"gpus": 2, "time": None})
    assert (opts.partition, opts.time, opts.array_size, opts.gpus) == ("gpu", 60, 4, 2)
    with pytest.raises(ConfigError, match="unknown cluster keys \\['partion'\\]"):
        cluster_options({"partion": "gpu"})
    with pytest.raises(ConfigError, match="cluster option time must be an integer >= 1, got 0"):
        ClusterOptions(time=0)
    spec = load_sweep(models=["resnet"], depths=[8], seeds=1, train={**TINY, "epochs": 1})
    with pytest.raises(ConfigError, match="cannot submit to slurm: .*srun"):
        submit_sweep(spec, tmp_path, OPTIONS, cluster="slurm")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("sweep: {models: [resnet], depths: [8]}\ntrain: {data: digits}\ncluster: {gpus: -1}\n")
    for extra, message in ((["--config", str(recipe)], "cluster option gpus must be an integer >= 0, got -1"),
                           (["--shard", "0/2"], "--shard splits a sweep over local processes")):
        argv = ["sweep", "--launcher", "slurm", "--models", "resnet", "--depths", "8", "--data", "digits",
                "--out", str(tmp_path / "x"), *extra]
        assert main(argv) == 2 and message in capsys.readouterr().err


def test_slurm_jobs_are_one_array_with_the_options(tmp_path, monkeypatch, capsys):
    """The Slurm path up to the scheduler: fake ``sbatch``/``srun`` on PATH record what submitit
    hands to Slurm (the cluster itself is not here)."""
    bin_dir, seen = tmp_path / "bin", tmp_path / "sbatch"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {seen}\necho Submitted batch job 4242\n")
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("sweep: {models: [resnet, pnnh, plain], depths: [8], seeds: 1}\ntrain: {data: digits}\n"
                      "cluster: {partition: gpu, time: 90, array_size: 2, account: lab}\n")
    argv = ["sweep", "--config", str(recipe), "--launcher", "slurm", "--gpus", "2", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    assert "submitted 3 job(s) to slurm (4242_0, 4242_1, 4242_2)" in capsys.readouterr().out
    script = seen.read_text()
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --account=lab",
                 "#SBATCH --gpus-per-node=2", "#SBATCH --cpus-per-task=8", "#SBATCH --signal=USR2@90"):
        assert line in script
    assert {s["state"] for s in job_states(tmp_path / "out").values()} == {"queued"}
    assert job_states(tmp_path / "out")["pnnh-d8-s0"]["job"] == "4242_1"  # training order: resnet, pnnh, plain
