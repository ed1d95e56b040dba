"""The tune file and the ``imgcls-jax tune`` command (wired into the CLI by ``add_tune_parser``).

A tune file is JSON with three keys::

    {
      "base":  {... TrainConfig fields ...}   or "train.json" (relative to the tune file),
      "space": {"phases.0.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": true}, ...},
      "study": {"n_trials": 20, "pruner": "median", "storage": "sqlite:///study.db", ...}
    }

``study`` takes the keyword arguments of :func:`imgcls_jax.hpo.search` (all optional except
``n_trials``); command-line options override them.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from imgcls_jax.config import TrainConfig, read_json

log = logging.getLogger(__name__)


@dataclass
class TuneConfig:
    """A parsed tune file: the base config, the search space and the study options."""

    base: TrainConfig
    space: dict
    study: dict = field(default_factory=dict)


def _study_keys() -> set[str]:
    from imgcls_jax.hpo.search import search

    return {n for n, p in inspect.signature(search).parameters.items() if p.kind is p.KEYWORD_ONLY} | {
        "n_trials"
    }


def load_tune_config(path_or_text) -> TuneConfig:
    """Read a tune file (path or JSON text); errors name the file and the offending key."""
    raw, where, is_text = read_json(path_or_text, "tune")
    text = str(path_or_text)
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object with 'base', 'space' and 'study'")
    unknown = sorted(set(raw) - {"base", "space", "study"})
    if unknown or "base" not in raw or "space" not in raw:
        raise ValueError(
            f"{where}: needs keys 'base' and 'space' (and optionally 'study'); unknown: {unknown}"
        )
    base = raw["base"]
    if isinstance(base, str):
        base_path = Path(base) if is_text else Path(text).parent / base
        base = TrainConfig.from_json(base_path)
    elif isinstance(base, dict):
        base = TrainConfig.from_json(json.dumps(base))
    else:
        raise ValueError(f"{where}: 'base' must be a TrainConfig object or a path to one, got {base!r}")
    study = raw.get("study", {})
    bad = sorted(set(study) - _study_keys()) if isinstance(study, dict) else ["<not an object>"]
    if bad:
        raise ValueError(f"{where}: unknown 'study' option(s) {bad}; known: {sorted(_study_keys())}")
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


def tune_main(args: argparse.Namespace) -> int:
    """Run ``imgcls-jax tune``; returns the exit status (0, or 1 when no trial completed)."""
    from dataclasses import replace

    from imgcls_jax.hpo.search import search

    tune = load_tune_config(args.config)
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
        raise ValueError(f"{args.config}: give study.n_trials in the file or --n-trials")
    base = replace(tune.base, data=args.data) if getattr(args, "data", None) else tune.base
    result = search(base, tune.space, options.pop("n_trials"), **options)
    log.info("trials by state: %s; trial table %s", result.states, result.trials_csv)
    if result.best_config_path is None:
        log.error("no trial completed: nothing to export")
        return 1
    log.info("best trial %d (value %.4g): %s", result.best_trial, result.best_value, result.best_config_path)
    return 0
