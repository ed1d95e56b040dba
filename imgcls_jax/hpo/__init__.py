"""Hyperparameter search with Optuna over :func:`imgcls_jax.train.loop.fit` runs.

``search(base_config, space, n_trials, ...)`` runs a study (TPE sampler, median /
successive-halving / Hyperband pruning on the per-epoch validation metric), each trial in its
own run directory, and exports the best config as a ``TrainConfig`` JSON. ``add_tune_parser``
and ``tune_main`` are the ``imgcls-jax tune`` command. Optuna is an optional dependency (the
``hpo`` extra); it is imported when a search runs, not by ``import imgcls_jax.hpo``.
"""

from imgcls_jax.hpo.command import TuneConfig, add_tune_parser, load_tune_config, tune_main
from imgcls_jax.hpo.space import apply_params, parse_space
from imgcls_jax.hpo.trials import SearchResult, TrialFault, is_trial_fault, search

__all__ = [
    "SearchResult",
    "TrialFault",
    "TuneConfig",
    "add_tune_parser",
    "apply_params",
    "is_trial_fault",
    "load_tune_config",
    "parse_space",
    "search",
    "tune_main",
]
