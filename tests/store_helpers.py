"""Helpers for the store tests: a throw-away PostgreSQL server (started once
per test process, stopped at exit) and per-test databases on SQLite or on it.

PostgreSQL: PAD_TEST_POSTGRES_URL (postgresql://user@host:port, a superuser)
names an existing server; otherwise initdb + pg_ctl from Debian's packages
(scripts/ensure-postgres.sh installs them) start one on 127.0.0.1 on a free
port in a temp dir, as the `postgres` user when running as root. When none
can be started, `postgres_url()` raises Unavailable with the reason, and
the PostgreSQL parametrisation is skipped with it."""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from functools import lru_cache
from pathlib import Path

import pytest

BACKENDS = ["sqlite", "postgresql"]


class Unavailable(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bin_dir() -> Path:
    env = os.environ.get("PAD_TEST_PG_BIN")
    candidates = [Path(env)] if env else []
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: (Path(p).parent.name != "15", p))
    candidates += [Path(p) for p in versions]
    which = shutil.which("initdb")
    if which:
        candidates.append(Path(which).resolve().parent)
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    raise Unavailable("PostgreSQL server binaries (initdb, pg_ctl) not found: run scripts/ensure-postgres.sh")


def _run(cmd: list[str], as_user: str | None, timeout: float = 60) -> subprocess.CompletedProcess:
    if as_user:
        cmd = ["runuser", "-u", as_user, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@lru_cache(maxsize=1)
def _start_once() -> str | Unavailable:
    try:
        return _start()
    except Unavailable as exc:  # remembered: one failed start per test process
        return exc


def postgres_url() -> str:
    """A superuser URL (postgresql://postgres@127.0.0.1:PORT) of a running server."""
    outcome = _start_once()
    if isinstance(outcome, Unavailable):
        raise outcome
    return outcome


def _start() -> str:
    if os.environ.get("PAD_TEST_POSTGRES_URL"):
        return os.environ["PAD_TEST_POSTGRES_URL"].rstrip("/")
    bin_dir = _bin_dir()
    as_user = None
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            raise Unavailable("running as root and no 'postgres' user to run the server as") from None
        if not shutil.which("runuser"):
            raise Unavailable("running as root and no runuser to switch to the 'postgres' user")
        as_user = "postgres"
    # under /tmp when switching users: TMPDIR may sit in a home the postgres user cannot enter
    root = Path(tempfile.mkdtemp(prefix="pad-test-pg-", dir="/tmp" if as_user and os.path.isdir("/tmp") else None))
    if as_user:
        os.chown(root, entry.pw_uid, entry.pw_gid)
    data, port = root / "data", _free_port()
    try:
        done = _run([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                     "--no-sync", "--no-instructions"], as_user)
        if done.returncode != 0:
            raise Unavailable(f"initdb failed: {(done.stderr or done.stdout).strip()[-400:]}")
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200"
        done = _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w",
                     "-t", "60", "start"], as_user, timeout=90)
        if done.returncode != 0:
            log = (root / "log").read_text(errors="replace")[-400:] if (root / "log").exists() else ""
            raise Unavailable(f"pg_ctl start failed: {(done.stderr or done.stdout).strip()[-300:]} {log}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise Unavailable(f"could not start PostgreSQL: {exc}") from exc
    except Unavailable:
        shutil.rmtree(root, ignore_errors=True)
        raise

    def stop() -> None:
        _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], as_user)
        shutil.rmtree(root, ignore_errors=True)

    atexit.register(stop)
    return f"postgresql://postgres@127.0.0.1:{port}"


def _psql(url: str, sql: str) -> None:
    import asyncio

    import asyncpg

    async def run():
        conn = await asyncpg.connect(url + "/postgres")
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def new_database_url(backend: str, tmp_path: Path) -> tuple[str, callable]:
    """(URL of a fresh empty database, cleanup) on `backend`; skips the test
    when PostgreSQL cannot be started, with the reason."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'pad.db'}", lambda: None
    try:
        server = postgres_url()
    except Unavailable as exc:
        pytest.skip(f"PostgreSQL run skipped: {exc}")
    name = f"pad_test_{uuid.uuid4().hex[:12]}"
    _psql(server, f'CREATE DATABASE "{name}"')
    return f"{server}/{name}", lambda: _psql(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path):
    """A fresh empty database, on SQLite and on PostgreSQL."""
    url, cleanup = new_database_url(request.param, tmp_path)
    yield url
    cleanup()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'pad.db'}"


def store_config(url: str, **overrides):
    from server.store.config import StoreConfig, normalize_url

    return StoreConfig(url=normalize_url(url), **overrides)


def store_app(store, api_keys=()):
    """A small FastAPI app with the users and feedback routers, the store on
    app.state, a key table and the error handlers (the gateway wires the
    same in create_app)."""
    from fastapi import FastAPI

    from server.auth_scopes import KeyTable
    from server.errors import install_error_handlers
    from server.routes import feedback, users

    app = FastAPI()
    install_error_handlers(app)
    app.include_router(users.router)
    app.include_router(feedback.router)
    app.state.store = store
    app.state.key_table = KeyTable.from_specs(list(api_keys))
    return app


def asgi_client(app, key: str | None = None):
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://pad.test", headers=headers)


def assert_error(response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error
