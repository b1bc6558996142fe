"""Client-side tests run against a real throwaway PostgreSQL cluster started by
scripts/cluster.sh (or the one PGHOST/PGPORT already point to)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from pathlib import Path

import psycopg2
import pytest

ROOT = Path(__file__).resolve().parents[2]

# The PostgreSQL major under test (scripts/cluster.sh starts that server; default 15).
PG_MAJOR = os.environ.get("PG_MAJOR", "15")


def pg_config(flag: str) -> str:
    """What the major under test's pg_config answers to FLAG (--bindir, --pkglibdir, ...)."""
    exe = subprocess.run(["bash", str(ROOT / "scripts/pg_majors.sh"), "pg_config", PG_MAJOR],
                         check=True, capture_output=True, text=True).stdout.strip()
    return subprocess.run([exe, flag], check=True, capture_output=True, text=True).stdout.strip()

# Which majors run which tests. The whole suite runs on the primary major (15: Debian's,
# which CI and the .deb use); on the others, the files whose code or PostgreSQL's behaviour
# differs by major: the reference rows (differential, app rows and their ::bigint casts,
# 16's int8 input), the upgrade's last step, workers (17 lets them connect as a NOLOGIN
# role), the standby, permissions and the server log; within them, a test marked
# `one_major` (locking and caps of our own, the same on every major) runs on the primary
# only. CHAT_BACKFILL_TIER=full runs everything on every major (`FULL=1 bash
# scripts/test.sh`). The table in docs/testing.md says the same: keep them together.
PRIMARY_MAJORS = {"15"}
EVERY_MAJOR = {
    "test_differential.py",
    "test_portable.py",
    "test_app_rows.py",
    "test_upgrade.py",
    "test_parallel.py",
    "test_replica.py",
    "test_security.py",
    "test_zz_server_log.py",
}
# Runs on the primary major only (where its file runs on every major).
ONE_MAJOR = pytest.mark.one_major


def pytest_configure(config):
    config.addinivalue_line("markers", "one_major: runs on the primary major only, unless CHAT_BACKFILL_TIER=full")


def tier() -> str:
    """'full' (every file) or 'major' (EVERY_MAJOR only)."""
    given = os.environ.get("CHAT_BACKFILL_TIER")
    if given in ("full", "major"):
        return given
    return "full" if PG_MAJOR in PRIMARY_MAJORS else "major"


def pytest_report_header(config):
    return f"chat_backfill: PostgreSQL {PG_MAJOR}, tier {tier()}"


def pytest_collection_modifyitems(config, items):
    if tier() == "full":
        return
    def runs(item) -> bool:
        return Path(str(item.fspath)).name in EVERY_MAJOR and item.get_closest_marker("one_major") is None

    keep = [i for i in items if runs(i)]
    dropped = [i for i in items if not runs(i)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(scope="session", autouse=True)
def pg_cron_run(request):
    """The pg_cron test's run, started before the first test when that test is selected: it
    waits on pg_cron's minute ticks while the rest of the suite runs."""
    if PG_MAJOR != "15" or not any(i.name == "test_pg_cron_advances_it_a_slice_at_a_time" for i in request.session.items):
        yield None
        return
    from test_resumable import PgCronRun
    run = PgCronRun()
    try:
        yield run
    finally:
        run.stop()


# Open WebUI's chat table, reduced to what the migration reads (plus title, to look real).
CHAT_DDL = "CREATE TABLE chat (id text PRIMARY KEY, user_id text, title text, chat json)"


class Cluster:
    def __init__(self, env: dict[str, str]):
        self.host, self.port = env["PGHOST"], env["PGPORT"]

    def dsn(self, db="postgres") -> str:
        return f"host={self.host} port={self.port} user=postgres dbname={db}"

    def url(self, db: str) -> str:
        return f"postgresql://postgres@/{db}?host={self.host}&port={self.port}"

    @contextlib.contextmanager
    def connect(self, db="postgres", autocommit=True):
        """A connection closed on exit (psycopg2's own `with` only ends a transaction)."""
        conn = psycopg2.connect(self.dsn(db))
        conn.autocommit = autocommit
        try:
            yield conn
        finally:
            conn.close()

    def create_db(self, prefix="t", extension=True) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with self.connect() as c, c.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        if extension:
            with self.connect(name) as c, c.cursor() as cur:
                cur.execute("CREATE EXTENSION chat_backfill")
        return name


def _start_cluster(datadir: str, *conf: str) -> dict[str, str]:
    # RUST_BACKTRACE=1 in the server's environment: pgrx would then show a Rust backtrace in
    # the DETAIL of every error crossing the extension's frames, and no test sees one.
    out = subprocess.run(
        ["bash", str(ROOT / "scripts/cluster.sh"), "start", datadir, *conf],
        check=True, capture_output=True, text=True, env={**os.environ, "RUST_BACKTRACE": "1"},
    ).stdout
    env = dict(kv.split("=", 1) for kv in out.replace("export ", "").split())
    return env


@pytest.fixture(scope="session")
def cluster():
    if os.environ.get("PGHOST") and os.environ.get("PGPORT"):
        given = Cluster(dict(os.environ))
        with given.connect() as c, c.cursor() as cur:
            cur.execute("SELECT current_setting('server_version_num')::int / 10000")
            major = str(cur.fetchone()[0])
        assert major == PG_MAJOR, f"PGHOST/PGPORT point to PostgreSQL {major}, PG_MAJOR says {PG_MAJOR}"
        yield given
        return
    datadir = "/tmp/chat_backfill_pytest"
    env = _start_cluster(datadir)
    yield Cluster(env)
    subprocess.run(["bash", str(ROOT / "scripts/cluster.sh"), "stop", datadir], check=False)


def load_chats(conn, chats) -> None:
    with conn.cursor() as cur:
        cur.execute(CHAT_DDL)
        cur.executemany(
            "INSERT INTO chat (id, user_id, title, chat) VALUES (%s, %s, 't', %s::json)",
            [(c.id, c.user_id, c.chat) for c in chats],
        )
