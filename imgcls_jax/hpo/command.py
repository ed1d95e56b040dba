"""The tune file and the ``imgcls-jax tune`` command (wired into the CLI by ``add_tune_parser``).

A tune file is JSON with three keys::

    {
      "base":  {... TrainConfig fields ...}   or "train.json" (relative to the tune file),
      "space": {"phases.0.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": true}, ...},
      "study": {"n_trials": 20, "pruner": "median", "storage": "sqlite:///study.db", ...}
    }

``study`` takes the keyword arguments of :func:`imgcls_jax.hpo.trials.search` (all optional except
``n_trials``); command-line options override them.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from imgcls_jax.config import ConfigError, TrainConfig, check_study_options, read_json

log = logging.getLogger(__name__)


@dataclass
class TuneConfig:
    """A parsed tune file: the base config, the search space and the study options."""

    base: TrainConfig
    space: dict
    study: dict = field(default_factory=dict)


def load_tune_config(path_or_text) -> TuneConfig:
    """Read a tune file (path or JSON text); errors name the file and the offending key.

    Raises ``FileNotFoundError`` for a missing file, :class:`~imgcls_jax.config.ConfigError` for
    everything else (its base config too)."""
    raw, where, is_text = read_json(path_or_text, "tune")
    text = str(path_or_text)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object with 'base', 'space' and 'study'")
    unknown = sorted(set(raw) - {"base", "space", "study"})
    if unknown or "base" not in raw or "space" not in raw:
        raise ConfigError(
            f"{where}: needs keys 'base' and 'space' (and optionally 'study'); unknown: {unknown}"
        )
    base = raw["base"]
    if isinstance(base, str):
        base_path = Path(base) if is_text else Path(text).parent / base
        try:
            base = TrainConfig.from_json(base_path)
        except FileNotFoundError as e:
            raise ConfigError(f"{where}: 'base': {e}") from None
    elif isinstance(base, dict):
        try:
            base = TrainConfig.from_json(json.dumps(base))
        except ValueError as e:
            raise ConfigError(f"{where}: 'base': {e}") from None
    else:
        raise ConfigError(f"{where}: 'base' must be a TrainConfig object or a path to one, got {base!r}")
    study = raw.get("study", {})
    if not isinstance(study, dict):
        raise ConfigError(f"{where}: 'study' must be an object of options, got {study!r}")
    check_study_options(study, where)
    return TuneConfig(base, raw["space"], dict(study))


def add_tune_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``tune`` to an ``argparse`` subparsers object; its handler is :func:`tune_main`."""
    p = subparsers.add_parser(
        "tune",
        help="hyperparameter search with Optuna",
        description=(
            "Search hyperparameters with Optuna: each trial is a training run in its own folder; the "
            "best config is written as best_config.json (usable with 'imgcls-jax train --config'). "
            "The tune file is JSON with 'base' (a TrainConfig or a path to one), 'space' (config "
            "path -> distribution) and 'study' (n_trials, pruner, storage, ...); options override 'study'."
        ),
    )
    p.add_argument("--config", required=True, help="tune file (JSON: base, space, study)")
    p.add_argument("--n-trials", type=int, help="trials the study should hold when done (all workers)")
    p.add_argument("--storage", help="sqlite:///study.db, postgresql://..., journal:FILE; default in memory")
    p.add_argument("--study-name", help="name of the study inside the storage")
    p.add_argument("--study-dir", help="folder for trial runs, best_config.json, trials.csv, plots")
    p.add_argument("--data", help="override the base config's data folder")
    p.add_argument("--worker", type=int, help="this worker's index (0, 1, ...): offsets the sampler seed")
    p.add_argument("--seed", type=int, help="sampler seed")
    p.add_argument("--timeout-s", type=float, help="start no new trial after this many seconds")
    p.add_argument("--reset-running", action="store_true", help="fail trials left running by a dead worker")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.set_defaults(func=tune_main)
    return p


def prepare_tune(args: argparse.Namespace) -> tuple[TrainConfig, dict, dict]:
    """``(base config, space, search options)`` of ``imgcls-jax tune``, everything checked that
    can be before a trial runs (the tune file, the options, the space, the data folder and its
    validation split, the study folder). Raises only :class:`~imgcls_jax.config.ConfigError` and
    ``DatasetError``: the user's mistakes."""
    from imgcls_jax.data.folders import DatasetError
    from imgcls_jax.hpo.space import parse_space
    from imgcls_jax.hpo.study import make_pruner, make_sampler
    from imgcls_jax.hpo.trials import _check_validation_split

    try:
        tune = load_tune_config(args.config)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    options = dict(tune.study)
    for key in ("n_trials", "storage", "study_name", "study_dir", "worker", "seed", "timeout_s"):
        value = getattr(args, key, None)
        if value is not None:
            options[key] = value
    if getattr(args, "reset_running", False):
        options["reset_running"] = True
    if getattr(args, "no_plots", False):
        options["plots"] = False
    if "n_trials" not in options:
        raise ConfigError(f"{args.config}: give study.n_trials in the file or --n-trials")
    check_study_options(options, f"{args.config} (with the command-line options)")
    base = replace(tune.base, data=args.data) if getattr(args, "data", None) else tune.base
    if not Path(base.data).expanduser().is_dir():
        raise DatasetError(f"{base.data}: no such folder (the base config's data)")
    parse_space(tune.space, base)
    try:
        _check_validation_split(base)
        make_sampler(options.get("sampler", "tpe"), 0, options.get("sampler_options"))
        make_pruner(options.get("pruner", "median"), options.get("pruner_options"), 1)
        Path(options.get("study_dir") or base.run_dir).expanduser().mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{args.config}: {e}") from None
    return base, tune.space, options


def tune_main(args: argparse.Namespace) -> int:
    """Run ``imgcls-jax tune``; returns the exit status (0, or 1 when no trial completed)."""
    from imgcls_jax.hpo.trials import search

    base, space, options = prepare_tune(args)
    result = search(base, space, options.pop("n_trials"), **options)
    log.info("trials by state: %s; trial table %s", result.states, result.trials_csv)
    if result.best_config_path is None:
        log.error("no trial completed: nothing to export")
        return 1
    log.info("best trial %d (value %.4g): %s", result.best_trial, result.best_value, result.best_config_path)
    return 0
