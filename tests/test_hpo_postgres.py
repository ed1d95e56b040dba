"""Two ``imgcls-jax tune`` workers share one study on a real PostgreSQL server; one is SIGKILLed
mid-trial. The study still ends with exactly ``n_trials`` trials done, the killed trial is failed
by the survivor once its heartbeat has lapsed (not by ``--reset-running``), and no trial is trained
twice.

The server is Debian's (``.ci/run`` installs it), in a throwaway cluster on 127.0.0.1 (see
:mod:`tests.postgres`); where it or the driver is missing the test skips and says what to install.
Trials train the head of a random-weight VGG16 on 32x32 copies of real flower photos (one epoch,
a few seconds each on 2 CPU cores). A second test, in process with a stand-in for ``fit``, has a
worker lose the last slot of the budget to a worker that then dies (SQLite and PostgreSQL).
"""

import csv
import datetime
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imgcls_jax.config import TrainConfig
from imgcls_jax.hpo import search
from tests import helpers, postgres
from tests.test_hpo import SPACE, base_config, flowers  # noqa: F401  (flowers: a fixture)

optuna = pytest.importorskip("optuna")
ROOT = Path(__file__).resolve().parents[1]
N_TRIALS, EPOCHS, HEARTBEAT_S, GRACE_S = 2, 1, 1, 5


@pytest.fixture(scope="module")
def pg_server():
    """A throwaway local PostgreSQL server for this module's tests (stopped afterwards)."""
    reason = postgres.missing()
    if reason is not None:
        pytest.skip(reason)
    with postgres.postgres_server() as server:
        yield server


@pytest.fixture
def pg_url(pg_server, request):
    """The URL of a new, empty database on the module's server."""
    return pg_server.create_database(request.node.name.split("[")[0][-60:].lower())


def start_tune(tune_file: Path, url: str, worker: int, log: Path, cache: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "imgcls_jax.cli", "tune", "--config", str(tune_file), "--storage", url,
            "--worker", str(worker), "--no-plots"]  # fmt: skip
    env = helpers.child_env(ROOT, {"TF_CPP_MIN_LOG_LEVEL": "2"}, cache=cache)
    with open(log, "w") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def tail(log: Path) -> str:
    return f"--- {log.name}:\n{log.read_text()[-4000:]}"


def wait_inside_a_trial(storage, victim: subprocess.Popen, logs: list[Path], timeout: float = 300):
    """The trial ``victim`` is training now, while all ``N_TRIALS`` slots are taken: RUNNING in the
    storage, owned by the victim's process (user attr ``worker``), its run folder begun by ``fit``
    (so its heartbeat thread has beaten), and the trials done or training number ``N_TRIALS`` (so
    the dead trial will hold a slot the survivor needs). With ``N_TRIALS`` = 2 that is both workers'
    first trials, which overlap for most of their length (imports, compilation). Fails if the victim
    ends first, or after ``timeout`` s."""
    owner = f"{socket.gethostname()}:{victim.pid}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert victim.poll() is None, "the victim worker ended before it could be killed\n" + tail(logs[1])
        try:
            trials = optuna.load_study(study_name="imgcls", storage=storage).get_trials()
        except KeyError:  # the study is not created yet
            trials = []
        training = [t for t in trials if t.state.name == "RUNNING" and "worker" in t.user_attrs]
        done = [t for t in trials if t.state.name == "COMPLETE"]
        if len(done) + len(training) == N_TRIALS:
            for t in training:
                if (
                    t.user_attrs["worker"] == owner
                    and (Path(t.user_attrs["run_dir"]) / "config.json").is_file()
                ):
                    return t
        time.sleep(0.3)
    pytest.fail("the victim never trained a trial\n" + "\n".join(tail(p) for p in logs))


def trained_once(trial) -> int:
    """Check that the trial's run folder holds one training, of this trial's sample (its config,
    one TensorBoard file, each epoch once in ``metrics.csv``); return the epochs it finished."""
    run = Path(trial.user_attrs["run_dir"])
    lr = TrainConfig.from_json(run / "config.json").phases[0].learning_rate
    assert lr == trial.params["phases.0.learning_rate"], (trial.number, lr)
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) <= 1, trial.number
    epochs = []
    if (run / "metrics.csv").is_file():
        with open(run / "metrics.csv") as f:
            epochs = [int(row["epoch"]) for row in csv.DictReader(f)]
    assert epochs == list(range(len(epochs))), (trial.number, epochs)
    return len(epochs)


def test_sigkilled_worker_on_postgres_study_completes_n_trials_none_twice(flowers, tmp_path, pg_url):  # noqa: F811
    study_dir = tmp_path / "study"
    tune = {
        "base": json.loads(base_config(flowers, study_dir, epochs=EPOCHS).to_json()),
        "space": SPACE,
        "study": {"n_trials": N_TRIALS, "pruner": "none", "heartbeat_s": HEARTBEAT_S, "grace_s": GRACE_S},
    }
    (tmp_path / "tune.json").write_text(json.dumps(tune))
    # The tables exist before the workers start, so this test's polling never races them to make them.
    storage = optuna.storages.RDBStorage(pg_url)
    logs = [tmp_path / "worker0.log", tmp_path / "worker1.log"]
    procs = [start_tune(tmp_path / "tune.json", pg_url, w, logs[w], tmp_path / "jax_cache") for w in (0, 1)]
    survivor, victim = procs
    try:
        killed = wait_inside_a_trial(storage, victim, logs)
        victim.send_signal(signal.SIGKILL)
        killed_at = datetime.datetime.now()
        assert victim.wait(timeout=30) == -signal.SIGKILL
        survivor.wait(timeout=400)
    except subprocess.TimeoutExpired:
        pytest.fail("the surviving worker did not finish\n" + tail(logs[0]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert survivor.returncode == 0, tail(logs[0])
    trials = {t.number: t for t in optuna.load_study(study_name="imgcls", storage=storage).get_trials()}
    storage.engine.dispose()
    states = {n: (t.state.name, sorted(t.user_attrs)) for n, t in trials.items()}

    # The killed trial: failed by the survivor once no heartbeat had come for GRACE_S s (its last
    # beat was at most HEARTBEAT_S s before the kill), with no reason of its own; not reset.
    dead = trials[killed.number]
    assert dead.state.name == "FAIL" and not {"fail_reason", "died"} & set(dead.user_attrs), states
    assert (dead.datetime_complete - killed_at).total_seconds() >= GRACE_S - HEARTBEAT_S
    # Exactly N_TRIALS trials done (completed; none pruned, none failed for a reason of their own);
    # the rest are the killed one and trials discarded as surplus before they trained.
    done = [t for t in trials.values() if t.state.name == "COMPLETE"]
    assert len(done) == N_TRIALS, states
    others = [t for n, t in trials.items() if t.state.name != "COMPLETE" and n != killed.number]
    assert all(t.state.name == "FAIL" and t.user_attrs.get("surplus") for t in others), states
    assert any(t.datetime_start > killed_at for t in done), states  # the survivor made up for it
    # No trial trained twice: the trial folders are exactly those of the N_TRIALS done trials and the
    # killed one (nothing else trained); each holds one training of its own trial, the done ones all
    # their epochs, the killed one some or all of them (it may die after its last epoch, before Optuna
    # is told: that work is lost, not counted); no sample was repeated.
    folders = {t.user_attrs["run_dir"] for t in [*done, dead]}
    assert {str(p) for p in (study_dir / "trials").iterdir()} == folders and len(folders) == N_TRIALS + 1
    assert all(trained_once(t) == EPOCHS for t in done) and trained_once(dead) <= EPOCHS
    assert len({json.dumps(t.params, sort_keys=True) for t in [*done, dead]}) == N_TRIALS + 1
    assert (study_dir / "best_config.json").is_file()
    with open(study_dir / "trials.csv") as f:
        row = {int(r["number"]): r for r in csv.DictReader(f)}[killed.number]
    assert (row["state"], row["fail_reason"]) == ("FAIL", "its worker died (heartbeat lost)")


# -- the race for the last slot -----------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue("pg_url")


def test_a_worker_that_loses_the_last_slot_to_a_worker_that_dies_still_completes_the_study(
    tmp_path, monkeypatch, storage_url
):
    """Another worker takes the last free slot just before this one asks for a trial, then dies
    without a word (its trial stays RUNNING, its heartbeat stops). This worker's trial is surplus;
    it must then wait for that trial to fail (heartbeat lapsed) and run the last trial itself,
    not end the search one trial short."""
    import types

    import imgcls_jax.train.loop as loop

    def fake_fit(config, **kw):  # a trial's result without training: its val_loss is its lr
        return types.SimpleNamespace(history=[{"val_loss": config.phases[0].learning_rate}])

    monkeypatch.setattr(loop, "fit", fake_fit)
    real_ask, ghosts = optuna.Study.ask, []

    def ask(study, *args, **kwargs):
        if len(study.get_trials(deepcopy=False)) == 1 and not ghosts:  # the other worker is first
            ghost = real_ask(study)
            ghost.set_user_attr("worker", "elsewhere:1")
            study._storage.record_heartbeat(ghost._trial_id)  # one beat (Optuna's thread), then it dies
            ghosts.append(ghost.number)
        return real_ask(study, *args, **kwargs)

    monkeypatch.setattr(optuna.Study, "ask", ask)
    (tmp_path / "data").mkdir()
    base = base_config(tmp_path / "data", tmp_path / "study")
    started = time.monotonic()
    result = search(base, SPACE, 2, storage=storage_url, pruner="none", heartbeat_s=1, grace_s=2, plots=False)
    trials = {t.number: t for t in result.study.get_trials()}
    states = {n: (t.state.name, sorted(t.user_attrs)) for n, t in trials.items()}
    assert ghosts == [1] and trials[1].state.name == "FAIL" and "fail_reason" not in trials[1].user_attrs
    assert trials[2].state.name == "FAIL" and trials[2].user_attrs.get("surplus"), states
    assert [n for n, t in trials.items() if t.state.name == "COMPLETE"] == [0, 3], states
    assert time.monotonic() - started > 2  # it waited for the ghost's heartbeat to lapse
