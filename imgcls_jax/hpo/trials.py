"""``search(base_config, space, n_trials)``: an Optuna study over ``fit`` runs.

Every trial samples the space (:mod:`imgcls_jax.hpo.space`), trains with
:func:`imgcls_jax.train.loop.fit` in its own run directory ``study_dir/trials/NNNN/`` (config,
metrics, checkpoints, ``best/``: the parameters of its best epoch) and reports the monitored
validation metric after every epoch, so the pruner can stop it early. The trial's value is the
best monitored value over its epochs (the one its ``best/`` checkpoint holds).

Trial budget: ``n_trials`` counts the trials of the study that ran to an end (completed, pruned,
or failed for a reason of their own such as a NaN loss), plus those running right now; several
workers sharing one storage therefore finish ``n_trials`` together, and a resumed study only
runs what is missing. A trial whose process died (heartbeat lost, or ``reset_running``) does not
count and is run again as a new trial.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

from imgcls_jax.config import TrainConfig
from imgcls_jax.hpo.report import SearchResult, write_report
from imgcls_jax.hpo.space import Param, apply_params, parse_space
from imgcls_jax.hpo.study import make_pruner, make_sampler, make_storage

log = logging.getLogger(__name__)


#: Study user attribute listing the trials failed by ``reset_running`` (their reason in trials.csv).
RESET_ATTR = "reset_running_trials"


class TrialFault(RuntimeError):
    """A trial failed for a reason of its own (NaN loss, out of memory): recorded, study goes on."""


class _BudgetReached(RuntimeError):
    """Other workers already hold the whole trial budget; this trial is discarded."""


def is_trial_fault(exc: BaseException) -> bool:
    """True for failures that belong to one trial's hyperparameters: a non-finite loss, or
    running out of (device or host) memory. Anything else is a bug and stops the study."""
    from imgcls_jax.train.loop import NonFiniteLossError

    if isinstance(exc, (NonFiniteLossError, MemoryError)):
        return True
    text = str(exc)
    return type(exc).__name__ in ("XlaRuntimeError", "JaxRuntimeError") and (
        "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
    )


def search(
    base_config: TrainConfig,
    space: dict,
    n_trials: int,
    *,
    study_dir: str | Path | None = None,
    storage: str | None = None,
    study_name: str = "imgcls",
    sampler: str = "tpe",
    sampler_options: dict | None = None,
    pruner: str = "median",
    pruner_options: dict | None = None,
    seed: int | None = 0,
    worker: int = 0,
    timeout_s: float | None = None,
    heartbeat_s: int = 30,
    grace_s: int | None = None,
    reset_running: bool = False,
    plots: bool = True,
) -> SearchResult:
    """Search ``space`` around ``base_config``; see the module docstring.

    Args:
      base_config: the config every trial starts from (its ``monitor`` is the objective:
        ``val_accuracy`` is maximised, ``val_loss`` minimised; it needs a validation split).
      space: path -> distribution (see :mod:`imgcls_jax.hpo.space`); checked before any trial.
      n_trials: trials the study should hold when done (shared by all workers).
      study_dir: where trial run directories, ``best_config.json``, ``trials.csv`` and plots go;
        default ``base_config.run_dir``.
      storage: ``None`` (in memory), an RDB URL or a journal file (see :mod:`.study`).
      sampler, sampler_options: ``"tpe"`` (default) or ``"random"`` and their keyword options.
      pruner, pruner_options: ``"median"``, ``"sha"``, ``"hyperband"`` or ``"none"``; steps are
        epochs (counted over all phases).
      seed, worker: the sampler's seed is ``seed + 7919 * worker + (trials already in the
        study)``, so workers and resumed runs do not replay each other's samples. ``None``: random.
      timeout_s: start no new trial after this many seconds.
      heartbeat_s, grace_s: RDB storages only: a running trial is alive while its worker beats
        every ``heartbeat_s`` s; after ``grace_s`` (default 3 x) without a beat it is failed.
      reset_running: first mark every running trial of the study as failed (only when no other
        worker is alive: for a journal storage, which has no heartbeats, after a crash).
      plots: write PNG plots (optimisation history, intermediate values, importances).

    Raises:
      ConfigError: the space is invalid (before any trial runs).
      ValueError: bad arguments, no validation split, or a stored study made with another
        space or objective.
    """
    import optuna

    if not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"n_trials must be a positive integer, got {n_trials!r}")
    params = parse_space(space, base_config)
    _check_validation_split(base_config)
    study_dir = Path(study_dir if study_dir is not None else base_config.run_dir).absolute()
    (study_dir / "trials").mkdir(parents=True, exist_ok=True)
    direction = "maximize" if base_config.monitor == "val_accuracy" else "minimize"
    max_epochs = sum(p.epochs for p in base_config.phases)
    storage_obj = make_storage(storage, heartbeat_s=heartbeat_s, grace_s=grace_s)
    pruner_obj = make_pruner(pruner, pruner_options, max_epochs)
    study = optuna.create_study(
        study_name=study_name, storage=storage_obj, direction=direction, pruner=pruner_obj,
        sampler=make_sampler(sampler, None), load_if_exists=True,
    )  # fmt: skip
    _check_same_study(study, space, base_config)
    if reset_running:
        _fail_running(study)
    existing = len(study.get_trials(deepcopy=False))
    if seed is not None:
        seed = seed + 7919 * worker + existing
    study.sampler = make_sampler(sampler, seed, sampler_options)
    log.info(
        "study %r (%s %s, %d trials wanted, %d in storage), trial runs in %s",
        study_name, direction, base_config.monitor, n_trials, existing, study_dir / "trials",
    )  # fmt: skip
    objective = _Objective(study, base_config, params, n_trials, study_dir)
    heartbeat = isinstance(storage_obj, optuna.storages.RDBStorage)  # only RDB storages beat
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        if heartbeat:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        done, running = _budget(study)
        if done >= n_trials or (deadline is not None and time.monotonic() > deadline):
            break
        if done + running >= n_trials:
            if not heartbeat:
                break  # without heartbeats a dead worker's trial can never be told from a live one
            log.info("%d trials done, %d running elsewhere: waiting in case one dies", done, running)
            time.sleep(heartbeat_s)
            continue
        study.optimize(objective, n_trials=1, catch=(TrialFault, _BudgetReached), gc_after_trial=False)
        if objective.budget_reached and not heartbeat:
            break  # other workers took the rest of the budget; with heartbeats, wait in case one dies
    return write_report(study, study_dir, plots=plots)


def _check_validation_split(config: TrainConfig) -> None:
    root = Path(config.data)
    presplit_val = any((root / name).is_dir() for name in ("val", "validation"))
    if not presplit_val and not config.splits.get("val"):
        raise ValueError(
            f"a search needs a validation split to score trials: {config.data} has no val/ folder and "
            f"splits {config.splits} has no 'val' fraction"
        )


def _check_same_study(study, space: dict, base: TrainConfig) -> None:
    """Record the space and objective in the study; refuse to mix a different one into it."""
    mine = {"space": space, "monitor": base.monitor}
    stored = {k: study.user_attrs[k] for k in mine if k in study.user_attrs}
    if stored and stored != mine:
        raise ValueError(
            f"study {study.study_name!r} in this storage was created with {stored}, not {mine}; "
            "use another study_name (or storage) for a different search"
        )
    if not stored:
        for key, value in mine.items():
            study.set_user_attr(key, value)


def _fail_running(study) -> None:
    from optuna.trial import TrialState

    running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    if not running:
        return
    log.warning("reset_running: marking trials %s (running, workers presumed dead) as failed", running)
    reset = sorted({*study.user_attrs.get(RESET_ATTR, []), *running})
    study.set_user_attr(RESET_ATTR, reset)  # first: trials.csv gives them this reason
    for number in running:
        study.tell(number, state=TrialState.FAIL)


def _counts(trial) -> str | None:
    """``"done"``, ``"running"`` or ``None`` (does not count: died, or surplus) for the budget."""
    from optuna.trial import TrialState

    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return "done"
    if trial.state == TrialState.FAIL:
        return "done" if "fail_reason" in trial.user_attrs else None
    return "running"  # RUNNING or WAITING


def _budget(study, before: int | None = None) -> tuple[int, int]:
    """(trials done, trials running) that count against the budget, among numbers < ``before``."""
    done = running = 0
    for t in study.get_trials(deepcopy=False):
        if before is not None and t.number >= before:
            continue
        kind = _counts(t)
        done += kind == "done"
        running += kind == "running"
    return done, running


class _Objective:
    def __init__(self, study, base: TrainConfig, params: list[Param], n_trials: int, study_dir: Path):
        self.study, self.base, self.params, self.n_trials = study, base, params, n_trials
        self.study_dir = study_dir
        self.budget_reached = False

    def __call__(self, trial) -> float:
        import optuna

        from imgcls_jax.train.loop import fit

        if sum(_budget(self.study, before=trial.number)) >= self.n_trials:
            self.budget_reached = True
            trial.set_user_attr("surplus", True)
            raise _BudgetReached(f"the study already holds {self.n_trials} trials (other workers)")
        values = {p.path: p.suggest(trial) for p in self.params}
        run_dir = self.study_dir / "trials" / f"{trial.number:04d}"
        config = replace(apply_params(self.base, values), run_dir=str(run_dir))
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("config", asdict(config))
        monitor = config.monitor

        def report(epoch: int, row: dict) -> None:
            if row[monitor] == "":
                raise ValueError(
                    f"trial {trial.number}: epoch {epoch} has no {monitor} (no validation split)"
                )
            trial.report(float(row[monitor]), epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch} ({monitor} {float(row[monitor]):.4g})")

        try:
            result = fit(config, resume=False, callbacks=[report])
        except optuna.TrialPruned:
            raise
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            trial.set_user_attr("fail_reason", reason[:2000])
            if is_trial_fault(e):
                raise TrialFault(reason) from e
            raise
        scores = [float(h[monitor]) for h in result.history if h[monitor] != ""]
        return max(scores) if monitor == "val_accuracy" else min(scores)
