"""A throwaway PostgreSQL server for tests: Debian's server binaries, a cluster in a temporary
folder, listening on 127.0.0.1 on a free port, stopped and removed when the test ends.

``.ci/run`` installs the server (Debian's ``postgresql`` package) and the ``test`` extra brings
the driver (``psycopg[binary]``: psycopg 3, SQLAlchemy 2.1's default for ``postgresql://``).
Where either is missing, :func:`missing` says what, so the test can skip with that reason.
``initdb`` refuses to run as root: as root the cluster is owned by (and the server runs as) the
``postgres`` user that Debian's package creates.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests import helpers

USER = "postgres"  # the unprivileged owner of the cluster when the tests run as root


def bin_dir() -> Path | None:
    """The folder of the newest installed ``initdb``/``pg_ctl`` (Debian keeps them off PATH)."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if found:
        return Path(max(found, key=lambda p: int(re.search(r"/(\d+)/bin/", p).group(1)))).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path and shutil.which("pg_ctl") else None


def missing() -> str | None:
    """Why a server cannot be started here (what to install), or ``None`` when it can."""
    if bin_dir() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the PostgreSQL driver psycopg (3) is not installed: pip install -e '.[test]'"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(USER)
        except KeyError:
            return f"running as root, and there is no '{USER}' user to own the cluster (initdb refuses root)"
        if shutil.which("runuser") is None:
            return "running as root without 'runuser' to start the server as an unprivileged user"
    return None


def _run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a server tool (as :data:`USER` when root) from ``/``, a folder any user may enter."""
    if os.geteuid() == 0:
        argv = ["runuser", "-u", USER, "--", *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/")
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


@dataclass(frozen=True)
class Server:
    """A running throwaway server: ``create_database(name)`` returns the SQLAlchemy URL of a new,
    empty database (``postgresql://imgcls:<random password>@127.0.0.1:<port>/<name>``)."""

    port: int
    password: str

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user="imgcls", password=self.password, dbname="postgres",
            autocommit=True,
        ) as conn:  # fmt: skip
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://imgcls:{self.password}@127.0.0.1:{self.port}/{name}"


@contextlib.contextmanager
def postgres_server() -> Iterator[Server]:
    """Start a new cluster (superuser ``imgcls``, a random password) and yield it; on exit, also
    after a failure, stop the server and delete the cluster's folder. Raises ``RuntimeError``
    (with the server's log) when it does not start; call :func:`missing` first."""
    binaries = bin_dir()
    # As root, in /tmp: the postgres user must reach it (a root-only $TMPDIR would not do).
    folder = Path(tempfile.mkdtemp(prefix="imgcls-pg-", dir="/tmp" if os.geteuid() == 0 else None))
    data, log = folder / "data", folder / "server.log"
    password = secrets.token_hex(16)
    (folder / "pw").write_text(password)
    if os.geteuid() == 0:
        owner = pwd.getpwnam(USER)
        for path in (folder, folder / "pw"):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    pg_ctl = [str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log)]
    started = False
    try:
        _run([str(binaries / "initdb"), "-D", str(data), "-U", "imgcls", f"--pwfile={folder / 'pw'}",
              "-A", "scram-sha-256", "-E", "UTF8", "--no-sync", "--no-instructions"])  # fmt: skip
        for _ in range(3):  # the free port may be taken by someone else before the server binds it
            port = helpers.free_port()
            options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off"
            try:
                _run([*pg_ctl, "-w", "-t", "60", "-o", options, "start"])
                started = True
                break
            except RuntimeError as e:
                error = e
        if not started:
            server_log = log.read_text() if log.is_file() else "(no log)"
            raise RuntimeError(f"PostgreSQL did not start: {error}\nserver log:\n{server_log[-3000:]}")
        yield Server(port, password)
    finally:
        if started:
            _stop(pg_ctl, data)
        shutil.rmtree(folder, ignore_errors=True)


def _stop(pg_ctl: list[str], data: Path) -> None:
    """Stop the server at once (its data is thrown away); kill it if ``pg_ctl`` cannot."""
    try:
        _run([*pg_ctl, "-m", "immediate", "-w", "-t", "30", "stop"], timeout=60)
    except (RuntimeError, subprocess.TimeoutExpired):
        with contextlib.suppress(OSError, ValueError, IndexError):
            os.kill(int((data / "postmaster.pid").read_text().split()[0]), 9)
            time.sleep(0.5)
