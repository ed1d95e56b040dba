"""A full disk (issue #19, item 3): a run whose run folder fills up stops with a clear error naming
the folder; the last finished checkpoint stays usable, and the same command, once there is room,
resumes from it and ends bit-equal to an uninterrupted run.

The run is tests/killing.py's (``imgcls-jax train`` in a child process; each checkpoint of the
head phase is ~60 MB: the whole VGG16, and ``best/`` holds another copy). Three ways to fill it:

* a real size-limited folder: a 200 MB tmpfs mounted in a private mount namespace (``unshare``:
  as root, or as a user where user namespaces are allowed; skipped elsewhere) -- orbax's
  background writes of epoch 1 (``checkpoints/`` or ``best/``, whichever fills it) run out of
  room, then the tmpfs is remounted at 1.5 GB;
* orbax's background commit failing as tensorstore reports a full disk (``RESOURCE_EXHAUSTED
  ... No space left on device``), injected from epoch 1 on;
* the ``metrics.csv`` append cut short by ``ENOSPC`` (half a row written), injected at epoch 2.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import helpers
from tests.killing import CHILD, ROOT, assert_same_run, inspect_run, run_child, write_config

FULL = "No space left on device"


def _last_error(log: str) -> str:
    """The exception line ending the main thread's traceback (the child runs ``python -c``, so
    its frames start at ``File "<string>"``). orbax's background threads print their own
    tracebacks of the same write failure, before and after it, and at exit Python prints
    "Exception ignored in: <coroutine ...>" for the coroutines orbax 0.12 leaves pending."""
    blocks = log.split("Traceback (most recent call last):")
    main = [b for b in blocks if '  File "<string>"' in b]
    if not main:
        return "(no error line)\n" + log[-3000:]
    lines = [line for line in main[-1].splitlines() if "Error: " in line and not line.startswith(" ")]
    return lines[0] if lines else "(no error line)\n" + main[-1][-3000:]


def _check_stopped_clearly(log: str, folder: Path, error: str) -> str:
    last = _last_error(log)
    assert last.startswith(error) and str(folder) in last and FULL.lower() in last.lower(), last
    return last


def _last_finished(message: str, run: Path) -> int:
    """The epoch the error says is the last finished checkpoint; it is, and it restores."""
    found = re.search(
        rf"The last finished checkpoint is epoch (\d+) in {re.escape(str(run))}/checkpoints", message
    )
    assert found, message
    return int(found[1])


def _resume_and_compare(path: Path, cache: Path, run: Path, latest: int, straight: Path) -> None:
    child = run_child(path, cache, tensorflow=False, log_path=path.parent / "resumed.log")
    assert child.returncode == 0, child.log[-4000:]
    assert f"resuming {run} after epoch {latest}" in child.log, child.log[-3000:]
    assert_same_run(straight, run)


# ------------------------------------------------------------------------- a real full folder
def _namespace_prefix() -> list[str] | None:
    """``unshare`` arguments giving a private mount namespace where tmpfs can be mounted."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "--mount"], ["unshare", "--mount", "--map-root-user"]):
        probe = subprocess.run(
            [*prefix, "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m none $d"],
            capture_output=True,
        )
        if probe.returncode == 0:
            return prefix
    return None


DRIVER = """
set -u
mount -t tmpfs -o size=200m none "$MNT"
"$PY" -c "$CHILD" train --config "$CFG" > "$OUT/first.log" 2>&1; echo $? > "$OUT/first.rc"
df -k "$MNT" > "$OUT/df.txt"
cp -a "$MNT/run" "$OUT/after_failure"
mount -o remount,size=1500m "$MNT"
"$PY" -c "$CHILD" train --config "$CFG" > "$OUT/resumed.log" 2>&1; echo $? > "$OUT/resumed.rc"
cp -a "$MNT/run" "$OUT/final"
"""


def test_a_full_tmpfs_run_folder_stops_clearly_and_resumes(kill_setup, straight_run, tmp_path):
    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip("cannot mount a size-limited tmpfs here (needs root or user namespaces)")
    data, cache, _ = kill_setup
    mount, out = tmp_path / "mnt", tmp_path / "out"
    mount.mkdir()
    out.mkdir()
    cfg = write_config(tmp_path, "full", data, augment=False, run_dir=mount / "run")
    env = helpers.child_env(ROOT, {"TQDM_DISABLE": "1"}, cache)
    script = CHILD.format(no_tf=True, setup="")
    env.update(MNT=str(mount), OUT=str(out), CFG=str(cfg), PY=sys.executable, CHILD=script)
    subprocess.run([*prefix, "sh", "-c", DRIVER], env=env, check=True, timeout=1800)
    first = (out / "first.log").read_text()
    assert (out / "first.rc").read_text().strip() == "1", first[-4000:]
    error = _check_stopped_clearly(first, mount / "run", "imgcls_jax.train.checkpoints.CheckpointWriteError")
    last = _last_finished(error, mount / "run")  # 0 or 1: the two folders fill up concurrently
    stopped = inspect_run(out / "after_failure")
    assert stopped.latest_step == last and last in (0, 1) and not stopped.problems, stopped
    resumed = (out / "resumed.log").read_text()
    assert (out / "resumed.rc").read_text().strip() == "0", resumed[-4000:]
    assert f"resuming {mount / 'run'} after epoch {last}" in resumed
    assert_same_run(straight_run, out / "final")


# ------------------------------------------------------------------------- injected failures
FAIL_BACKGROUND_WRITES = """
from orbax.checkpoint._src.serialization import ocdbt_utils
_merge, _calls = ocdbt_utils.merge_ocdbt_per_process_files, []
async def merge(*args, **kwargs):  # epoch 0: 4 items (params, state, ema; best/ params)
    _calls.append(1)
    if len(_calls) > 4:
        raise ValueError('RESOURCE_EXHAUSTED: Failed writing: "x": Failed to write 511 bytes to '
                         "file 11: No space left on device [os_error_code='28']")
    return await _merge(*args, **kwargs)
ocdbt_utils.merge_ocdbt_per_process_files = merge
"""


@pytest.mark.slow
def test_checkpoint_writes_failing_in_the_background_stop_clearly_and_resume(kill_setup, straight_run):
    data, cache, root = kill_setup
    path = write_config(root, "enospc_orbax", data, augment=False)
    run = path.parent / "run"
    child = run_child(path, cache, setup=FAIL_BACKGROUND_WRITES, tensorflow=False)
    assert child.returncode == 1, child.log[-4000:]
    error = _check_stopped_clearly(child.log, run, "imgcls_jax.train.checkpoints.CheckpointWriteError")
    last, stopped = _last_finished(error, run), inspect_run(run)
    assert stopped.latest_step == last and last in (0, 1) and not stopped.problems, stopped
    _resume_and_compare(path, cache, run, last, straight_run)


CUT_METRICS_ROW = """
import builtins, errno
_open = builtins.open
class CutShort:
    def __init__(self, f): self.f = f
    def __enter__(self): return self
    def __exit__(self, *exc): self.f.close()
    def write(self, text):
        self.f.write(text[: len(text) // 2]); self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")
def open(file, mode="r", *args, **kwargs):
    f = _open(file, mode, *args, **kwargs)
    if str(file).endswith("metrics.csv") and "a" in mode:
        text = _open(file).read()
        if text.count("\\n") == 3:  # header and epochs 0, 1: epoch 2's row is cut short
            return CutShort(f)
    return f
builtins.open = open
"""


@pytest.mark.slow
def test_a_metrics_row_cut_short_by_a_full_disk_stops_clearly_and_resumes(kill_setup, straight_run):
    data, cache, root = kill_setup
    path = write_config(root, "enospc_metrics", data, augment=False)
    run = path.parent / "run"
    child = run_child(path, cache, setup=CUT_METRICS_ROW, tensorflow=False)
    assert child.returncode == 1, child.log[-4000:]
    _check_stopped_clearly(child.log, run / "metrics.csv", "OSError")
    assert "could not add epoch 2's row" in _last_error(child.log)
    assert not (run / "metrics.csv").read_text().endswith("\n")  # the torn row is there
    stopped = inspect_run(run)
    assert stopped.latest_step == 1 and not stopped.problems, stopped
    _resume_and_compare(path, cache, run, 1, straight_run)
