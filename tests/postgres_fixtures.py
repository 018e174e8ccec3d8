"""A real PostgreSQL server for the tests of the distributed search, started once per session.

The server is Debian's (or any installed) PostgreSQL: `initdb` makes a fresh cluster in a
temporary folder, `pg_ctl` starts it on 127.0.0.1 on a free port with password
(SCRAM) authentication, and the session's end stops it and removes the folder. Nothing is
mocked and nothing outside the folder is touched.

`initdb` refuses to run as root (a cluster owned by root would be a security hole), so as
root the server runs as an unprivileged user: ``postgres`` (which Debian's package
creates), or the one named by ``HFMERGE_TEST_PG_USER``.

Missing server binaries fail the tests with the command that installs them: these tests
check the real thing, so they are never skipped.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

BINARIES = ("initdb", "pg_ctl", "postgres")
VERSIONED = Path("/usr/lib/postgresql")  # Debian's <version>/bin folders, not on PATH
INSTALL = ("install the PostgreSQL server: `apt-get install postgresql` on Debian or Ubuntu (`.ci/run` does it), "
           "`brew install postgresql` on macOS, or put a folder with initdb, pg_ctl and postgres on PATH")


class ServerError(RuntimeError):
    """The test server cannot be found, made or started; the message says what to do."""


@dataclass(frozen=True)
class Postgres:
    """A running server: `url` connects as its superuser ``hfmerge`` to the database ``postgres``."""

    host: str
    port: int
    user: str
    password: str

    def url(self, password: str | None = None, port: int | None = None) -> str:
        return f"postgresql://{self.user}:{self.password if password is None else password}@{self.host}:{port or self.port}/postgres"


def server_binaries() -> Path:
    """The folder holding initdb, pg_ctl and postgres: PATH first, then Debian's versioned folders."""
    folders = []
    found = shutil.which("initdb")
    if found:
        folders.append(Path(found).resolve().parent)
    debian = sorted(VERSIONED.glob("*/bin"), key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0), reverse=True)
    folders.extend(debian)
    for folder in folders:
        if all((folder / b).is_file() for b in BINARIES):
            return folder
    raise ServerError(f"PostgreSQL server binaries ({', '.join(BINARIES)}) not found on PATH nor in /usr/lib/postgresql/*/bin: {INSTALL}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_user() -> tuple[list[str], int | None, int | None]:
    """The command prefix that runs the server's programs as an unprivileged user, and its ids."""
    if os.geteuid() != 0:
        return [], None, None
    name = os.environ.get("HFMERGE_TEST_PG_USER", "postgres")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ServerError(f"running as root, and initdb refuses root: no user {name!r} to run the test server as; create one "
                    f"(Debian's postgresql package creates 'postgres') or name another in HFMERGE_TEST_PG_USER")
    runuser = shutil.which("runuser")
    prefix = [runuser, "-u", name, "--"] if runuser else ["su", name, "-s", "/bin/sh", "-c"]
    return prefix, entry.pw_uid, entry.pw_gid


def _run(prefix: list[str], command: list[str]) -> subprocess.CompletedProcess:
    # su takes one shell command line; runuser (and no prefix) the arguments themselves.
    command = [*prefix, shlex.join(command)] if prefix[:1] == ["su"] else [*prefix, *command]
    return subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)


@contextlib.contextmanager
def running_server() -> Iterator[Postgres]:
    """Start a throw-away PostgreSQL server on 127.0.0.1; yield its `Postgres`; stop and remove it.

    Raises:
        ServerError: No server programs, no user to run them as (as root), or they failed.
    """
    bindir = server_binaries()
    prefix, uid, gid = _as_user()
    root = Path(tempfile.mkdtemp(prefix="hfmerge-pg-"))
    password = secrets.token_hex(8)
    (root / "pw").write_text(password + "\n")
    if uid is not None:
        for path in (root, root / "pw"):
            os.chown(path, uid, gid)
    data = root / "data"
    started = False
    try:
        init = _run(prefix, [str(bindir / "initdb"), "-D", str(data), "-U", "hfmerge", f"--pwfile={root / 'pw'}", "--auth=scram-sha-256",
                             "-E", "UTF8", "--no-sync", "--no-instructions"])
        if init.returncode != 0:
            raise ServerError(f"initdb failed (exit {init.returncode}):\n{init.stdout}")
        for _ in range(5):  # another process may take the free port before the server binds it
            port = free_port()
            options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            start = _run(prefix, [str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "-t", "120", "start"])
            if start.returncode == 0:
                started = True
                break
        if not started:
            log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
            raise ServerError(f"the PostgreSQL test server did not start:\n{start.stdout}\n{log[-3000:]}")
        yield Postgres("127.0.0.1", port, "hfmerge", password)
    finally:
        if started:
            _run(prefix, [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    """A running server for the session (see `running_server`); a missing server fails the test."""
    try:
        with running_server() as server:
            yield server
    except ServerError as exc:
        pytest.fail(str(exc))
