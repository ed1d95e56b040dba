"""Build the Optuna pieces of a study by name: storage, sampler and pruner.

Storage (``storage=``): ``None`` keeps the study in memory (one process, gone when it ends);
``"sqlite:///path.db"`` (or a path ending ``.db``/``.sqlite``) makes it resumable; any other
SQLAlchemy URL (``postgresql://user:pass@host/db``, ``mysql://...``) lets workers on several
machines share it; ``"journal:path.log"`` (or a path ending ``.log``/``.journal``) uses Optuna's
append-only journal file, which processes on one machine or on a shared file system can share.
RDB storages get heartbeats: a trial whose process died (SIGKILL, lost machine) is marked failed
after ``grace_s`` without one and does not count against the trial budget.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "sha", "hyperband", "none")


def make_storage(storage: str | None, *, heartbeat_s: int = 30, grace_s: int | None = None):
    """An Optuna storage from a URL or file path (see the module docstring); ``None``: in memory."""
    import optuna

    if storage is None or storage == "":
        return optuna.storages.InMemoryStorage()
    if not isinstance(storage, str):
        raise ValueError(f"storage must be a URL or file path string, got {storage!r}")
    if storage.startswith("journal:") or storage.endswith((".log", ".journal")):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(storage.removeprefix("journal:")).expanduser()
        if not path.parent.is_dir():
            raise ValueError(f"journal storage {storage!r}: folder {path.parent} does not exist")
        return JournalStorage(JournalFileBackend(str(path)))
    if storage.endswith((".db", ".sqlite", ".sqlite3")) and "://" not in storage:
        storage = f"sqlite:///{Path(storage).expanduser().absolute()}"
    if "://" not in storage:
        raise ValueError(
            f"storage {storage!r}: expected an RDB URL (sqlite:///study.db, postgresql://...), "
            "'journal:<file>', a path ending .db/.journal, or None for in-memory"
        )
    engine_kwargs = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {}
    if storage.startswith("sqlite:///"):
        folder = Path(storage.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise ValueError(f"storage {storage!r}: folder {folder} does not exist")
    if storage.startswith(("postgresql", "postgres")):
        import importlib.util

        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is None:
            raise ValueError(
                f"storage {storage!r}: no PostgreSQL driver installed; pip install 'imgcls-jax[hpo]' "
                "(it brings psycopg 3)"
            )
    import sqlalchemy.exc

    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna 5
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    storage,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_s,
                    grace_period=grace_s or 3 * heartbeat_s,
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as e:
            # Workers starting together on a new database race to create its tables ("already
            # exists", duplicate alembic version); the loser finds them made on its next try.
            error = e
            log.info("storage %s: %s; retrying (tables being created by another worker?)", storage, e)
            time.sleep(0.5 * (attempt + 1))
    raise RuntimeError(f"storage {storage!r}: could not open it after 5 tries: {error}") from error


def make_sampler(name: str, seed: int | None, options: dict | None = None):
    """``"tpe"`` (default; ``constant_liar`` so parallel workers spread out) or ``"random"``."""
    import optuna

    options = dict(options or {})
    try:
        if name == "tpe":
            options.setdefault("constant_liar", True)
            return optuna.samplers.TPESampler(seed=seed, **options)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed, **options)
    except TypeError as e:
        raise ValueError(f"sampler {name!r}: bad sampler_options {options}: {e}") from e
    raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")


def make_pruner(name: str, options: dict | None, max_epochs: int):
    """``"median"`` (``MedianPruner``), ``"sha"`` (successive halving), ``"hyperband"`` (its
    ``max_resource`` defaults to the run's epochs) or ``"none"``. Steps are epochs."""
    import optuna

    options = dict(options or {})
    try:
        if name == "median":
            return optuna.pruners.MedianPruner(**options)
        if name == "sha":
            return optuna.pruners.SuccessiveHalvingPruner(**options)
        if name == "hyperband":
            options.setdefault("max_resource", max_epochs)
            return optuna.pruners.HyperbandPruner(**options)
        if name == "none":
            if options:
                raise TypeError("the 'none' pruner takes no options")
            return optuna.pruners.NopPruner()
    except TypeError as e:
        raise ValueError(f"pruner {name!r}: bad pruner_options {options}: {e}") from e
    raise ValueError(f"unknown pruner {name!r}; expected one of {PRUNERS}")
