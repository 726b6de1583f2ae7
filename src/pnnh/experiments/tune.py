"""``pnnh tune``: hyperparameter search on the validation split with Optuna, the same budget for every method.

A tune file (``configs/tune-*.yaml``) holds the method's training config and the search space::

    tune:
      trials: 8                       # finished trials (complete or pruned) the study ends with
      startup_trials: 10              # TPE's random draws before it models the scores (Optuna's default):
                                      # with trials <= startup_trials the search is the recipe + random draws
      space:                          # TrainConfig fields, or model_kwargs.KEY
        lr: {low: 0.01, high: 0.4, log: true}
        warmup_epochs: {low: 0.0, high: 2.0}
        scalar_lr_scale: {choices: [0.1, 1.0]}
    train: {model: fixup_resnet, model_kwargs: {depth: 56}, data: fashion-mnist, val_size: 5000, ...}

Every trial is one ``pnnh.train`` run under ``OUT/trials/NNN`` scored by its validation accuracy;
the first is the method's own recipe (the ``train:`` values, else the defaults, of the searched
fields: ``recipe_params``), so the untuned recipe is always among the scored settings;
Optuna's MedianPruner stops a trial whose per-epoch validation accuracy falls below the median of
earlier trials at the same epoch (the trainer's ``on_epoch_end`` callback raises ``TrialPruned``);
a trial whose training diverges scores 0 (and is listed as diverged) instead of ending the study.
The study lives in ``OUT/study.db`` (SQLite, Optuna's RDB storage), so re-running the command
continues it: a trial left running by a killed process is marked failed and its parameters are
tried again, and the study stops at ``trials`` complete or pruned trials. At the end
``OUT/trials.md`` lists every trial, ``OUT/best.yaml`` is the best trial's training config
(``pnnh train --config OUT/best.yaml --out DIR``) and ``OUT/best-sweep.yaml`` the same as a
one-variant sweep recipe (``pnnh sweep --config``).
"""
from __future__ import annotations

import copy
import fcntl
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import optuna
import yaml

from pnnh.io import atomic_write_text
from pnnh.train.config import FIELDS, ConfigError, load_config, resolve_config
from pnnh.train.trainer import TrainingDiverged, train

STUDY = "pnnh-tune"
TUNE_KEYS = {"trials", "space", "startup_trials"}
TPE_STARTUP = 10  # Optuna's TPESampler default n_startup_trials
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
# Fields a trial sets itself or that no search should touch.
NOT_SEARCHABLE = {"model", "data", "out", "val_size", "seed", "model_kwargs"}


def load_tune(path: str | Path, overrides: dict | None = None, trials: int | None = None
              ) -> tuple[dict, dict, int, int]:
    """(train config dict, search space, number of trials, TPE start-up trials) from a tune YAML;
    raises ``ConfigError``."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read tune config {path}: {err}") from None
    if set(raw) - {"tune", "train"}:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(set(raw) - {'tune', 'train'})}; valid: tune, train")
    section = dict(raw.get("tune") or {})
    if set(section) - TUNE_KEYS:
        raise ConfigError(f"{path}: unknown tune keys {sorted(set(section) - TUNE_KEYS)}; valid: {', '.join(sorted(TUNE_KEYS))}")
    startup = section.get("startup_trials", TPE_STARTUP)
    if not isinstance(startup, int) or isinstance(startup, bool) or startup < 1:
        raise ConfigError(f"startup_trials={startup!r}: give a positive integer (TPE's random draws before it models "
                          f"the scores; Optuna's default {TPE_STARTUP})")
    base = {**(raw.get("train") or {}), **(overrides or {})}
    n_trials = trials if trials is not None else section.get("trials", 8)
    if not isinstance(n_trials, int) or n_trials < 1:
        raise ConfigError(f"trials={n_trials!r}: give a positive integer")
    space = dict(section.get("space") or {})
    if not space:
        raise ConfigError(f"{path}: tune.space is empty; give at least one field, e.g. lr: {{low: 0.01, high: 0.4, log: true}}")
    for name, dist in space.items():
        _check_param(name, dist)
    cfg = load_config(base)  # validates the base config now, not after the first trial
    if cfg.val_size <= 0:
        raise ConfigError("tune reads validation accuracy: set val_size (images carved from the training set), "
                          f"got val_size={cfg.val_size}")
    return base, space, n_trials, startup


def _check_param(name: str, dist: Any) -> None:
    field_name = name.split(".", 1)[0]
    if not (name.startswith("model_kwargs.") or (field_name in FIELDS and field_name not in NOT_SEARCHABLE)):
        raise ConfigError(f"tune.space: {name!r} is not a searchable TrainConfig field or model_kwargs.KEY")
    if not isinstance(dist, dict) or not ({"low", "high"} <= set(dist) or set(dist) == {"choices"}):
        raise ConfigError(f"tune.space.{name}: give {{low, high[, log]}} or {{choices: [...]}}, got {dist!r}")


def _suggest(trial: optuna.Trial, name: str, dist: dict) -> Any:
    if "choices" in dist:
        return trial.suggest_categorical(name, list(dist["choices"]))
    if isinstance(dist["low"], int) and isinstance(dist["high"], int) and not dist.get("log"):
        return trial.suggest_int(name, dist["low"], dist["high"])
    return trial.suggest_float(name, float(dist["low"]), float(dist["high"]), log=bool(dist.get("log", False)))


def trial_config(base: dict, params: dict) -> dict:
    """``base`` with a trial's parameters set (``model_kwargs.KEY`` into the model keywords)."""
    cfg = copy.deepcopy(base)
    for name, value in params.items():
        if name.startswith("model_kwargs."):
            cfg.setdefault("model_kwargs", {})[name.split(".", 1)[1]] = value
        else:
            cfg[name] = value
    return cfg


def recipe_params(base: dict, space: dict) -> dict:
    """The values the method's own recipe (``base``, else TrainConfig's defaults) gives the searched
    fields, where they lie inside the space: the study's first trial, so the search always scores
    the untuned recipe too and the best trial is never worse than it (on the tuning seed). A
    ``model_kwargs.KEY`` the recipe does not set, or a value outside the space, is left to the sampler."""
    from pnnh.models import create_model
    from pnnh.models.registry import model_arch

    cfg = load_config(base)
    # the recipe's defaults depend on the architecture (e.g. SGD lr 0.1 for a CNN, AdamW for a ViT)
    cfg = resolve_config(cfg, model_arch(create_model(cfg.model, **cfg.model_kwargs)), img_size=32)
    params = {}
    for name, dist in space.items():
        if name.startswith("model_kwargs."):
            key = name.split(".", 1)[1]
            if key not in (base.get("model_kwargs") or {}):
                continue
            value = base["model_kwargs"][key]
        else:
            value = getattr(cfg, name)
        inside = (value in dist["choices"]) if "choices" in dist else (
            isinstance(value, (int, float)) and dist["low"] <= value <= dist["high"])
        if inside:
            params[name] = value
    return params


class PruneOnValAcc:
    """Training callback: report each epoch's validation accuracy to the trial; prune below the
    median, but never after the last of ``epochs``: a finished run keeps its score (and can win)."""

    def __init__(self, trial: optuna.Trial, epochs: int):
        self.trial, self.epochs = trial, epochs

    def on_epoch_end(self, epoch: int, record: dict) -> None:
        self.trial.report(record["val_acc"], epoch)
        if epoch < self.epochs and self.trial.should_prune():
            raise optuna.TrialPruned(f"val_acc {record['val_acc']:.4f} at epoch {epoch}")


def retry_failed(study: optuna.Study) -> None:
    """Queue again the parameters of every failed trial (a killed process, an error) that no later
    trial has taken up, so a resumed study tries the same settings an uninterrupted one would."""
    trials = study.get_trials(deepcopy=False)

    def params(t: optuna.trial.FrozenTrial) -> dict:
        return t.params or t.system_attrs.get("fixed_params", {})

    for t in trials:
        if t.state == optuna.trial.TrialState.FAIL and not any(
                u.number > t.number and params(u) == t.params for u in trials):
            study.enqueue_trial(t.params, skip_if_exists=False)


@contextmanager
def _study_lock(out: Path) -> Iterator[None]:
    """Held while a process runs the study: a second process is refused, a stale one detected."""
    with open(out / ".tune.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another pnnh tune process is running the study in {out}") from None
        yield


def sampler(seed: int, startup: int, tried: int = 0) -> optuna.samplers.TPESampler:
    """The study's sampler: ``startup`` seeded random draws, then TPE. ``tried``: the trials a resumed
    study already holds; they shift the seed, since a sampler seeded as at the start would draw the
    settings already tried again."""
    return optuna.samplers.TPESampler(seed=seed + tried, n_startup_trials=startup)


def tune(config_path: str | Path, out: str | Path, *, trials: int | None = None, overrides: dict | None = None,
         seed: int = 0, progress: bool = True) -> optuna.Study:
    """Run (or continue) the study of ``config_path`` in ``out``; write the best config; return the study."""
    base, space, n_trials, startup = load_tune(config_path, overrides, trials)
    out = Path(out)
    (out / "trials").mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with _study_lock(out):
        study = optuna.create_study(
            study_name=STUDY, storage=f"sqlite:///{(out / 'study.db').resolve()}", load_if_exists=True,
            direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
        study.sampler = sampler(seed, startup, tried=len(study.trials))
        if not study.trials:  # a new study: its first trial is the method's own recipe
            study.enqueue_trial(recipe_params(base, space))
        for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            # we hold the lock, so no process is running it: a killed run.
            study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
        retry_failed(study)

        def objective(trial: optuna.Trial) -> float:
            params = {name: _suggest(trial, name, dist) for name, dist in space.items()}
            cfg = trial_config(base, params)
            cfg["out"] = str(out / "trials" / f"{trial.number:03d}")
            try:
                result = train(cfg, callbacks=[PruneOnValAcc(trial, load_config(cfg).epochs)], progress=progress)
            except TrainingDiverged as err:  # a setting that diverges is a result: the worst score, not a crash
                trial.set_user_attr("diverged", str(err).splitlines()[0])
                return 0.0
            return result.metrics.get("val_acc") or 0.0

        while (left := n_trials - len(study.get_trials(deepcopy=False, states=FINISHED))) > 0:
            study.optimize(objective, n_trials=left)
        write_best(study, base, out, config_path)
    return study


def trials_table(study: optuna.Study) -> str:
    """Every trial of ``study`` as a markdown table: its state, parameters, validation accuracy
    after each epoch and its score; the best trial in bold."""
    best = study.best_trial.number if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) else None
    names = list(dict.fromkeys(k for t in study.trials for k in t.params))
    lines = ["| trial | state | " + " | ".join(names) + " | val acc % per epoch | score |",
             "|---:|---|" + "---:|" * len(names) + "---|---:|"]
    for t in study.trials:
        params = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in (t.params.get(n, "") for n in names)]
        curve = " / ".join(f"{100 * v:.2f}" for _, v in sorted(t.intermediate_values.items())) or "—"
        score = f"{100 * t.value:.2f}" if t.value is not None else "—"
        number = f"**{t.number}**" if t.number == best else str(t.number)
        state = "diverged" if "diverged" in t.user_attrs else t.state.name.lower()
        lines.append(f"| {number} | {state} | " + " | ".join(params) + f" | {curve} | {score} |")
    return "\n".join(lines)


def write_best(study: optuna.Study, base: dict, out: Path, source: str | Path) -> None:
    """``best.yaml`` (a training config), ``best-sweep.yaml`` (a one-variant sweep recipe) and
    ``trials.md`` (every trial, ``trials_table``)."""
    atomic_write_text(out / "trials.md", f"# pnnh tune: {source}\n\n" + trials_table(study) + "\n")
    best = study.best_trial
    cfg = trial_config(base, best.params)
    cfg.pop("out", None)
    note = (f"# pnnh tune: best of {len(study.get_trials(states=FINISHED))} trials of {source} "
            f"(trial {best.number}, val_acc {best.value:.4f}); params {best.params}\n")
    atomic_write_text(out / "best.yaml", note + yaml.safe_dump(cfg, sort_keys=False))
    model_kwargs = dict(cfg.pop("model_kwargs", None) or {})
    depth = model_kwargs.pop("depth", None)
    if depth is None:  # a sweep names the depth: without one in the config there is no recipe to write
        return
    tuned = {k: v for k, v in best.params.items() if not k.startswith("model_kwargs.")}
    train_cfg = {k: v for k, v in cfg.items() if k not in ("model", "seed", *tuned)}
    variant = {"model": cfg["model"], "model_kwargs": model_kwargs, "train": tuned}
    recipe = {"sweep": {"depths": [depth], "seeds": 3, "variants": {f"{cfg['model']}-tuned": variant}},
              "train": train_cfg}
    atomic_write_text(out / "best-sweep.yaml", note + yaml.safe_dump(recipe, sort_keys=False))
