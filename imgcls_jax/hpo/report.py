"""What a search leaves in its study directory: the best config, a trial table and PNG plots.

``best_config.json``  the best completed trial's TrainConfig (``run_dir``: ``study_dir/best_run``),
                      ready for ``imgcls-jax train --config``
``trials.csv``        one row per trial: number, state, value, seconds, reason it failed, params
``plots/*.png``       optimisation history, intermediate values (per-epoch metric), importances
"""

from __future__ import annotations

import contextlib
import csv
import logging
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from imgcls_jax.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """What :func:`search` leaves behind; paths are inside ``study_dir``."""

    study: object
    study_dir: Path
    best_config: TrainConfig | None = None
    best_value: float | None = None
    best_trial: int | None = None
    best_config_path: Path | None = None
    trials_csv: Path | None = None
    plots: list[Path] = field(default_factory=list)
    states: dict[str, int] = field(default_factory=dict)


def write_report(study, study_dir: Path, *, plots: bool = True):
    """Write ``best_config.json``, ``trials.csv`` and (``plots``) the PNGs; a ``SearchResult``."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    result = SearchResult(study, study_dir)
    for t in trials:
        result.states[t.state.name] = result.states.get(t.state.name, 0) + 1
    reset = set(study.user_attrs.get("reset_running_trials", []))
    result.trials_csv = write_trials_csv(trials, study_dir / "trials.csv", reset)
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    if completed:
        best = study.best_trial
        result.best_trial, result.best_value = best.number, best.value
        result.best_config = best_config(best, study_dir)
        result.best_config_path = study_dir / "best_config.json"
        result.best_config.to_json(result.best_config_path)
        log.info(
            "best trial %d: %s %.4g; config in %s",
            best.number, study.user_attrs.get("monitor", "value"), best.value, result.best_config_path,
        )  # fmt: skip
    else:
        log.warning(
            "no trial of study %r completed (%s): no best config written", study.study_name, result.states
        )
    if plots:
        result.plots = write_plots(study, study_dir / "plots")
    return result


def best_config(trial, study_dir: Path) -> TrainConfig:
    """The trial's TrainConfig (stored with the trial, so any machine can export it), set to
    train into ``study_dir/best_run``."""
    if "config" not in trial.user_attrs:
        raise ValueError(f"trial {trial.number} has no stored config (not made by imgcls_jax.hpo.search)")
    raw = dict(trial.user_attrs["config"])
    raw["run_dir"] = str(Path(study_dir) / "best_run")
    return TrainConfig(**raw)


def write_trials_csv(trials, path: Path, reset: set[int] = frozenset()) -> Path:
    """One row per trial; ``reset``: numbers of the trials failed by ``reset_running``."""
    names = sorted({name for t in trials for name in t.params})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["number", "state", "value", "epochs_reported", "seconds", "fail_reason", "run_dir", *names]
        )
        for t in trials:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else ""
            reason = t.user_attrs.get("fail_reason", "")
            if not reason and t.state.name == "FAIL":
                died = "reset_running" if t.number in reset else "heartbeat lost"
                reason = f"its worker died ({died})"
            if t.user_attrs.get("surplus"):
                reason = "surplus: the budget was already taken by other workers"
            writer.writerow(
                [
                    t.number, t.state.name, "" if t.value is None else t.value, len(t.intermediate_values),
                    seconds, reason, t.user_attrs.get("run_dir", ""), *[t.params.get(n, "") for n in names],
                ]
            )  # fmt: skip
    return path


def write_plots(study, folder: Path) -> list[Path]:
    """Optuna's matplotlib plots as PNGs; a plot that cannot be drawn yet (e.g. importances
    need two completed trials) is skipped with a warning saying why."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # files only; leave an application's chosen backend alone
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm
    from optuna.trial import TrialState

    folder.mkdir(parents=True, exist_ok=True)
    completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    makers = {
        "optimization_history": ovm.plot_optimization_history,
        "intermediate_values": ovm.plot_intermediate_values,
        "param_importances": ovm.plot_param_importances,
    }
    written = []
    for name, make in makers.items():
        if name == "param_importances" and completed < 2:
            log.warning("plot %s skipped: needs 2 completed trials, the study has %d", name, completed)
            continue
        try:
            with _quiet_experimental():
                ax = make(study)
        except (ValueError, RuntimeError) as e:
            log.warning("plot %s skipped: %s", name, e)
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
        log.info("wrote %s", path)
    return written


@contextlib.contextmanager
def _quiet_experimental():
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield
