"""How far trained PNNH coders moved from their initialisation (issue 19, objection 5).

For every distinct coder of a run's last-epoch model: ||K - K0||_F / ||K0||_F, with K0 the
coder of a freshly built model of the same config. Meant for identity-initialised coders
(signed, accumulate, copy), which every build initialises identically; a random coder's K0
would be another draw.

    python -m pnnh.experiments.drift SWEEP_DIR    # one line per cell; writes SWEEP_DIR/coder_drift.csv
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn

from pnnh.io import write_csv
from pnnh.models import PNNHConv, create_model
from pnnh.train.load import load


def coders(model: nn.Module) -> list[torch.Tensor]:
    """The weights of every distinct coder of ``model``, in layer order (a shared coder once)."""
    seen: dict[int, torch.Tensor] = {}
    for layer in model.modules():
        if isinstance(layer, PNNHConv):
            seen.setdefault(id(layer.coder), layer.coder.weight.detach())
    return list(seen.values())


def coder_drift(trained: nn.Module, initial: nn.Module) -> list[float]:
    """Relative Frobenius distance of each coder of ``trained`` from the same coder of ``initial``."""
    return [float((k - k0).norm() / k0.norm()) for k, k0 in zip(coders(trained), coders(initial), strict=True)]


def run_drift(run_dir: str | Path) -> list[float]:
    """Drift of every coder of a run directory's last epoch from its initialisation."""
    trained = load(run_dir, which="last")
    cfg = trained.pretrained_cfg  # how create_model built it
    shape = {k: cfg[k] for k in ("num_classes", "in_chans", "img_size") if cfg.get(k) is not None}
    initial = create_model(cfg["model"], **shape, **cfg["model_kwargs"])
    return coder_drift(trained, initial)


def main(argv: list[str]) -> int:
    sweep = Path(argv[0])
    rows = []
    for cell in sorted((sweep / "cells").iterdir()):
        if not (cell / "last.pt").is_file():
            continue
        drift = run_drift(cell)
        if drift:
            rows.append({"cell": cell.name, "max_drift": max(drift), "mean_drift": sum(drift) / len(drift),
                         "per_coder": " ".join(f"{d:.4g}" for d in drift)})
            print(f"{cell.name}: max {max(drift):.4g}, mean {rows[-1]['mean_drift']:.4g} over {len(drift)} coders")
    write_csv(sweep / "coder_drift.csv", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
