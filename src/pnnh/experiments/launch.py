"""Sweep cells as cluster jobs: Slurm through submitit, or submitit's local processes.

    pnnh sweep --config configs/pnnh-confirmation-cifar10-slurm.yaml --launcher slurm --out /shared/runs/c10 \\
        --partition gpu --gpus 1 --time 240 --array-size 16

Each job trains its cells with the same ``run_sweep`` a local sweep uses, in the same sweep
directory, which must therefore be on a file system every node sees: records, cell locks and
checkpoints are shared, and the command returns once the jobs are submitted.

- One job per cell (``cells_per_job`` groups cells, in training order), submitted as one Slurm
  job array of which at most ``array_size`` run at once.
- Preemption and time limits: Slurm signals a job 90 s before it stops it (submitit asks for
  USR2); submitit then calls ``CellJob.checkpoint``, which hands back the same job, and requeues
  it. The requeued job resumes each unfinished cell from its ``last.pt`` (saved every epoch, so
  at most one epoch is trained again). A job stopped outright (``scancel``, a lost node) is not
  requeued: run the same command again; it submits jobs for the cells that have no record and
  are not being trained (cells still queued in Slurm would be submitted twice: the second job
  finds the record, or the lock, and stops at once).
- ``pnnh report DIR`` works while jobs run: ``DIR/.jobs/<cell>.json`` says which job holds a
  cell, on which host, in which state (queued, running, requeued) and how often it started.

``cluster="local"`` runs the jobs as processes on this machine through submitit's
``LocalExecutor``, the same path as Slurm (signals, checkpoint, requeue): for tests and trials.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pnnh.train.config import ConfigError

CLUSTERS = ("slurm", "local")
JOBS_DIR = ".jobs"


@dataclass
class ClusterOptions:
    """What each job asks the scheduler for. ``time`` is the limit per job in minutes; a cell
    longer than that goes on in the requeued job (up to ``max_timeouts`` times)."""

    partition: str | None = None
    gpus: int = 1
    cpus: int = 8
    time: int = 240
    array_size: int | None = None  # at most this many jobs of the array at once (None: no limit)
    cells_per_job: int = 1
    mem_gb: float | None = None
    account: str | None = None
    qos: str | None = None
    max_timeouts: int = 10

    def __post_init__(self) -> None:
        for name, low in (("gpus", 0), ("cpus", 1), ("time", 1), ("cells_per_job", 1), ("max_timeouts", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"cluster option {name} must be an integer >= {low}, got {value!r}")
        if self.array_size is not None and (not isinstance(self.array_size, int) or self.array_size < 1):
            raise ConfigError(f"cluster option array_size must be an integer >= 1, got {self.array_size!r}")
        if self.mem_gb is not None and (not isinstance(self.mem_gb, (int, float)) or self.mem_gb <= 0):
            raise ConfigError(f"cluster option mem_gb must be a number > 0, got {self.mem_gb!r}")


FIELDS = tuple(f.name for f in dataclasses.fields(ClusterOptions))


def cluster_options(section: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None) -> ClusterOptions:
    """``ClusterOptions`` from a sweep config's ``cluster:`` section and flags (None: not given)."""
    values = dict(section or {})
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown cluster keys {unknown}; valid: {', '.join(FIELDS)}")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return ClusterOptions(**values)


class CellJob:
    """One job: train ``cells`` (ids) of ``spec`` in ``out``. Checkpointable: on preemption or
    time-out submitit calls ``checkpoint`` and requeues what it returns (this same job); the
    cells' own checkpoints make the rerun a resumption."""

    def __init__(self, spec: Any, out: str, cells: list[str], command: str):
        self.spec, self.out, self.cells, self.command = spec, out, cells, command

    def __call__(self) -> list[dict]:
        from pnnh.experiments.sweep import run_sweep

        for cell in self.cells:
            _update_state(self.out, cell, state="running", host=socket.gethostname(), pid=os.getpid(),
                          started=_now(), starts=_state(self.out, cell).get("starts", 0) + 1)
        records = run_sweep(self.spec, self.out, command=self.command, progress=False, only=self.cells)
        for cell in self.cells:
            _update_state(self.out, cell, state="finished", finished=_now())
        return records

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        for cell in self.cells:
            _update_state(self.out, cell, state="requeued", requeued=_now())
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def make_executor(out: Path, options: ClusterOptions, cluster: str, name: str):
    """A submitit executor for ``cluster`` with the options; logs in ``out/.jobs/logs``."""
    import submitit

    if cluster not in CLUSTERS:
        raise ConfigError(f"unknown cluster {cluster!r}; valid: {', '.join(CLUSTERS)}")
    kwargs = {"slurm_max_num_timeout": options.max_timeouts} if cluster == "slurm" else {}
    try:
        executor = submitit.AutoExecutor(out / JOBS_DIR / "logs", cluster=cluster, **kwargs)
    except RuntimeError as err:  # no srun: not on a Slurm cluster
        raise ConfigError(f"cannot submit to {cluster}: {err}; on a machine without Slurm use --launcher local "
                          "(or submitit-local to try the job path)") from None
    params: dict[str, Any] = {"name": name, "timeout_min": options.time, "gpus_per_node": options.gpus,
                              "cpus_per_task": options.cpus, "tasks_per_node": 1, "nodes": 1}
    if options.mem_gb is not None:
        params["mem_gb"] = options.mem_gb
    slurm = {"partition": options.partition, "array_parallelism": options.array_size,
             "account": options.account, "qos": options.qos}
    params.update({f"slurm_{k}": v for k, v in slurm.items() if v is not None})
    executor.update_parameters(**params)
    return executor


def submit_sweep(spec: Any, out: str | Path, options: ClusterOptions, *, cluster: str = "slurm",
                 command: str = "", retry_failed: bool = False) -> list:
    """Submit one job per group of ``options.cells_per_job`` cells still to train; return the jobs.

    Cells already recorded (and, unless ``retry_failed``, failed ones too) and cells another
    process is training are left out. Every cell's config is validated and the sweep
    directory claimed (``sweep.yaml``) before anything is submitted.
    """
    from pnnh.experiments.sweep import pending_cells, prepare_sweep

    out = Path(out).resolve()  # jobs may start in another directory
    prepare_sweep(spec, out, command)
    todo = pending_cells(spec, out, retry_failed=retry_failed)
    if not todo:
        return []
    groups = [todo[i:i + options.cells_per_job] for i in range(0, len(todo), options.cells_per_job)]
    executor = make_executor(out, options, cluster, name=f"pnnh-{out.name}")
    for cell in todo:  # before submitting: a job that starts at once must not find its "running" overwritten
        _update_state(out, cell, state="queued", submitted=_now(), cluster=cluster)
    with executor.batch():  # one job array
        jobs = [executor.submit(CellJob(spec, str(out), group, command)) for group in groups]
    for job, group in zip(jobs, groups):
        for cell in group:
            _update_state(out, cell, job=str(job.job_id))
    return jobs


def job_states(out: str | Path) -> dict[str, dict]:
    """Cell id -> its job record (``.jobs/<cell>.json``) for every cell submitted as a job."""
    folder = Path(out) / JOBS_DIR
    states = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            states[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):  # being replaced this instant: skip it this time
            continue
    return states


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _state(out: str | Path, cell: str) -> dict:
    try:
        return json.loads((Path(out) / JOBS_DIR / f"{cell}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _update_state(out: str | Path, cell: str, **fields: Any) -> None:
    from pnnh.io import atomic_write_text

    path = Path(out) / JOBS_DIR / f"{cell}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({**_state(out, cell), **fields}, indent=1) + "\n")
