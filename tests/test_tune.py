"""pnnh tune: a real Optuna study on digits, killed mid-trial with SIGKILL, resumed, its best config trained."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

import pnnh
from pnnh.experiments.sweep import load_sweep
from pnnh.experiments.tune import load_tune, recipe_params, retry_failed, sampler, tune
from pnnh.train.config import ConfigError, load_config

TUNE = {
    "tune": {"trials": 3, "space": {"lr": {"low": 0.01, "high": 0.3, "log": True},
                                    "warmup_epochs": {"low": 0.0, "high": 1.0}}},
    "train": {"model": "resnet", "model_kwargs": {"depth": 8, "width": 4}, "data": "digits", "img_size": 8,
              "val_size": 300, "train_subset": 512, "epochs": 3, "batch_size": 64, "precision": "fp32"},
}


def _running_trial_with_an_epoch(db: Path) -> bool:
    """A trial numbered >= 1 is running and has reported an epoch (read-only look at Optuna's tables)."""
    if not db.exists():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1) as con:
            return con.execute("SELECT COUNT(*) FROM trials t JOIN trial_intermediate_values v ON t.trial_id = "
                               "v.trial_id WHERE t.state = 'RUNNING' AND t.number >= 1").fetchone()[0] > 0
    except sqlite3.OperationalError:  # tables not created yet, or locked for a write
        return False


def test_study_resumes_after_sigkill_and_its_best_config_trains(tmp_path):
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump(TUNE))
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "pnnh", "tune", "--config", str(config), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while not _running_trial_with_an_epoch(out / "study.db"):
        assert proc.poll() is None, f"tune ended before it could be killed: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no trial reached its first epoch"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    storage = f"sqlite:///{out / 'study.db'}"
    killed = optuna.load_study(study_name="pnnh-tune", storage=storage)
    running = [t for t in killed.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert len(running) == 1 and len(killed.trials) == running[0].number + 1

    study = tune(config, out, progress=False)  # the same study, continued in this process
    states = [t.state for t in study.trials]
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 3 and states.count(optuna.trial.TrialState.FAIL) == 1
    stale = study.trials[running[0].number]
    assert stale.state == optuna.trial.TrialState.FAIL
    assert study.trials[stale.number + 1].params == stale.params  # the killed trial's settings tried again
    settings = [tuple(sorted(t.params.items())) for t in finished]
    assert len(set(settings)) == len(settings)  # the resumed sampler does not draw earlier settings again
    assert all(t.intermediate_values for t in finished)  # the pruner saw every epoch's val_acc
    # the untuned recipe, scored first: SGD lr 0.1 scaled to batch 64, one warm-up epoch
    assert study.trials[0].params == {"lr": 0.05, "warmup_epochs": 1.0}

    table = (out / "trials.md").read_text().splitlines()
    assert table[2].startswith("| trial | state | lr | warmup_epochs | val acc % per epoch | score |")
    assert len(table) == 4 + len(study.trials) and f"| **{study.best_trial.number}** |" in "\n".join(table)
    assert "| fail |" in "\n".join(table)  # the killed trial is listed too
    best = load_config(out / "best.yaml", {"out": str(tmp_path / "best-run")})
    assert best.lr == study.best_params["lr"] and best.warmup_epochs == study.best_params["warmup_epochs"]
    result = pnnh.train(best, progress=False)
    assert result.status == "ok"
    assert result.metrics["val_acc"] == pytest.approx(study.best_value, abs=1e-9)  # the same run, retrained
    sweep = load_sweep(out / "best-sweep.yaml")
    cell = sweep.cells()[0]
    cell_cfg = cell.config(tmp_path / "sweep")
    assert (cell_cfg.model, cell.depth, len(sweep.seeds)) == ("resnet", 8, 3)
    assert (cell_cfg.lr, cell_cfg.warmup_epochs, cell_cfg.model_kwargs) == (best.lr, best.warmup_epochs,
                                                                              best.model_kwargs)


def test_the_first_trial_is_the_methods_own_recipe_where_the_space_holds_it():
    space = {"lr": {"low": 0.003, "high": 0.5, "log": True}, "warmup_epochs": {"low": 0.0, "high": 0.5},
             "grad_clip": {"choices": [None, 1.0]}, "scalar_lr_scale": {"choices": [0.1, 1.0]},
             "model_kwargs.eta": {"choices": [0.9, 0.99]}, "model_kwargs.width": {"low": 4, "high": 8}}
    base = {**TUNE["train"], "lr": 0.05}
    # lr from the recipe, warm-up's default (1.0) outside the space, defaults for grad_clip and the
    # scalar lr, a model keyword the recipe does not set left to the sampler, one it sets kept
    assert recipe_params(base, space) == {"lr": 0.05, "grad_clip": None, "scalar_lr_scale": 0.1,
                                          "model_kwargs.width": 4}


def test_the_pruner_stops_a_trial_early_but_never_after_its_last_epoch():
    from pnnh.experiments.tune import PruneOnValAcc

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    for _ in range(2):  # two good finished trials set the median
        good = study.ask()
        for epoch in (1, 2, 3):
            good.report(0.9, epoch)
        study.tell(good, 0.9)
    bad = PruneOnValAcc(study.ask(), epochs=3)
    with pytest.raises(optuna.TrialPruned, match="at epoch 1"):
        bad.on_epoch_end(1, {"val_acc": 0.1})
    last = PruneOnValAcc(study.ask(), epochs=3)
    last.on_epoch_end(3, {"val_acc": 0.1})  # below the median, but the run is done: it keeps its score
    assert last.trial.should_prune()


def test_a_diverging_setting_scores_zero_and_the_study_goes_on(tmp_path):
    config = tmp_path / "tune.yaml"
    # lr 100 makes TAT's normalisation-free plain net reach a NaN loss within a few steps (the
    # recipe's lr is not a choice, so every trial diverges)
    config.write_text(yaml.safe_dump({"tune": {"trials": 2, "space": {"lr": {"choices": [100.0]}}},
                                      "train": {**TUNE["train"], "model": "tat_plain", "epochs": 1}}))
    study = tune(config, tmp_path / "study", progress=False)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert all(t.value == 0.0 and "training diverged" in t.user_attrs["diverged"] for t in study.trials)
    assert (tmp_path / "study" / "trials.md").read_text().count("| diverged |") == 2


def test_failed_trials_are_queued_again_once():
    study = optuna.create_study(direction="maximize")
    failed = study.ask({"lr": optuna.distributions.FloatDistribution(0.01, 0.3)})
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    retry_failed(study)
    retry_failed(study)  # already queued: not twice
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].system_attrs["fixed_params"] == failed.params


def test_tune_file_errors_name_the_bad_value(tmp_path):
    bad = tmp_path / "bad.yaml"
    for section, message in [({"tune": {"space": {"lr": {"low": 0.01, "high": 0.3}}}, "train": {"model": "resnet8", "data": "digits"}},
                               "set val_size"),
                              ({"tune": {"space": {"model": {"choices": ["a"]}}}, "train": TUNE["train"]},
                               "'model' is not a searchable"),
                              ({"tune": {"space": {"lr": [0.1]}}, "train": TUNE["train"]}, "tune.space.lr"),
                              ({"tune": {"trails": 8, "space": TUNE["tune"]["space"]}, "train": TUNE["train"]},
                               r"unknown tune keys \['trails'\]"),
                              ({"tune": {"startup_trials": 0, "space": TUNE["tune"]["space"]}, "train": TUNE["train"]},
                               "startup_trials=0"),
                              ({"tune": {"trials": 0, "space": TUNE["tune"]["space"]}, "train": TUNE["train"]},
                               "trials=0")]:
        bad.write_text(yaml.safe_dump(section))
        with pytest.raises(ConfigError, match=message):
            load_tune(bad)
    proc = subprocess.run([sys.executable, "-m", "pnnh", "tune", "--config", str(bad), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("pnnh tune: error: trials=0")


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("configs/tune-*.yaml")), ids=lambda p: p.name)
def test_every_method_gets_the_same_trials_and_lr_warmup_space(path):
    base, space, trials, startup = load_tune(path)
    assert trials == 8 and startup == 10 and space["lr"] == {"low": 0.003, "high": 0.5, "log": True}
    assert space["warmup_epochs"] == {"low": 0.0, "high": 1.5}
    assert base["val_size"] > 0 and pnnh.create_model(base["model"], in_chans=1, **base["model_kwargs"])


def test_the_sampler_draws_at_random_for_startup_trials_then_follows_the_scores():
    """startup_trials reaches TPE: the first draws ignore the scores, the later ones follow them."""
    def draws(sign: float, startup: int, tried: int = 0) -> list[float]:
        study = optuna.create_study(direction="maximize", sampler=sampler(0, startup, tried=tried))
        study.optimize(lambda t: sign * t.suggest_float("x", 0.0, 1.0), n_trials=10)
        return [t.params["x"] for t in study.trials]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    up, down = draws(+1, startup=4), draws(-1, startup=4)
    assert up[:4] == down[:4]  # random phase: the same seeded draws, whatever the scores
    assert up[4:] != down[4:]  # then TPE: opposite scores, other proposals (with startup 10: the same),
    assert sum(up[4:]) > sum(down[4:])  # each towards its better end
    assert draws(+1, startup=10) == draws(-1, startup=10)  # all random while startup covers them
    assert draws(+1, startup=4, tried=5)[:4] != up[:4]  # a resumed study's sampler draws anew
