"""Coder drift (experiments/drift.py): zero for the frozen default, positive for a trained coder."""
from __future__ import annotations

import pnnh
from pnnh.experiments.drift import main, run_drift

RUN = {"model": "pnnh", "model_kwargs": {"depth": 8, "width": 4}, "data": "digits", "img_size": 8,
       "train_subset": 256, "epochs": 1, "batch_size": 64}


def test_trained_coder_drifts_and_frozen_one_does_not(tmp_path):
    frozen = pnnh.train({**RUN, "out": str(tmp_path / "cells" / "frozen")}, progress=False).out_dir
    moving = pnnh.train({**RUN, "model_kwargs": {**RUN["model_kwargs"], "coder_trainable": True},
                         "coder_lr_scale": 0.1, "out": str(tmp_path / "cells" / "trained")}, progress=False).out_dir
    assert run_drift(frozen) == [0.0, 0.0, 0.0, 0.0, 0.0]  # 3 shared stage coders, 2 transition coders
    drift = run_drift(moving)
    assert len(drift) == 5 and all(0 < d < 1 for d in drift)
    assert main([str(tmp_path)]) == 0
    rows = (tmp_path / "coder_drift.csv").read_text().splitlines()
    assert rows[0].startswith("cell,max_drift") and rows[1].startswith("frozen,0.0") and rows[2].startswith("trained,")
