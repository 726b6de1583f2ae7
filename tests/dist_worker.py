"""One rank of a test job for tests/test_distributed.py; run under torchrun, never by pytest.

    python -m torch.distributed.run --nproc-per-node 2 ... tests/dist_worker.py JOBS.json RESULTS_DIR

Sets up the process group once (gloo) and runs the jobs of JOBS.json in order, so one launch
covers several trainings. Each rank writes RESULTS_DIR/rank<R>.json: one entry per job, the
``TrainResult`` or the ``ConfigError`` message. Job kinds:

- ``{"kind": "train", "config": {...}}``: ``pnnh.train(config)``.
- ``{"kind": "coder_grad", "model_kwargs": {...}, "batch": B, "seed": S}``: one DDP
  forward/backward of pnnh20 with a trainable shared coder on this rank's half of a fixed
  batch of 2B random images; the gradients go to RESULTS_DIR/grads_rank<R>.pt, the batch to
  RESULTS_DIR/grad_batch.pt.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from pnnh.models import create_model
from pnnh.train import ConfigError, train
from pnnh.train import distributed as ddp


def coder_grad(job: dict, results: Path) -> dict:
    rank, world = ddp.rank_and_world()
    torch.manual_seed(job["seed"])
    model = create_model("pnnh20", num_classes=10, in_chans=1, img_size=28, **job["model_kwargs"])
    x, y = fixed_batch(job["seed"], world * job["batch"])
    b = job["batch"]
    net = ddp.wrap_model(model, torch.device("cpu"))
    loss = F.cross_entropy(net(x[rank * b:(rank + 1) * b]), y[rank * b:(rank + 1) * b])
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    torch.save(grads, results / f"grads_rank{rank}.pt")
    if rank == 0:
        torch.save({"x": x, "y": y}, results / "grad_batch.pt")
    return {"params_with_grad": sorted(grads)}


def fixed_batch(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same n normalised random images and labels in every process."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    results = Path(sys.argv[2])
    ddp.init_distributed("cpu", timeout=60)
    rank, world = ddp.rank_and_world()
    outcomes = []
    for job in jobs:
        if job["kind"] == "coder_grad":
            outcomes.append(coder_grad(job, results))
            continue
        try:
            result = train(job["config"], progress=False)
            outcomes.append({"result": result.to_dict()})
        except ConfigError as err:
            outcomes.append({"error": str(err)})
    (results / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world": world, "jobs": outcomes}))
    ddp.destroy_distributed()


if __name__ == "__main__":
    main()
