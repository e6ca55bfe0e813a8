"""A throwaway PostgreSQL server for tests: its own data directory, on 127.0.0.1 only, with a password.

`make test` installs Debian's `postgresql` package where it is missing (Makefile: `services`). The
server runs as the `postgres` user when the tests run as root (PostgreSQL refuses root). `pg_ctl -w`
returns once the server accepts connections, so nothing waits on a timer.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

PASSWORD = "s3cret-pw"  # the tests assert that it reaches no file


def _binary(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server; yield a URL `postgresql://postgres:PASSWORD@127.0.0.1:PORT/`; stop it."""
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.fail("PostgreSQL is not installed; `make test` installs it (apt-get install postgresql)")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="stacktrain-pg-"))
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
        os.chown(root, user.pw_uid, user.pw_gid)
    data, pwfile, port = root / "data", root / "pw", _free_port()
    pwfile.write_text(PASSWORD)
    if as_user:
        os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=scram-sha-256",
                    f"--pwfile={pwfile}", "-E", "UTF8"], check=True, capture_output=True)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} -c fsync=off"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "-t", "60",
                    "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def create_database(server: str, name: str) -> str:
    """A fresh database on the server; its SQLAlchemy-style URL (`postgresql://.../name`)."""
    import psycopg

    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server}/{name}"
