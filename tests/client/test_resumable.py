"""The committing procedure against real servers: CALL, checkpoints and resume, one
runner at a time, refusal where it cannot commit, crashes, concurrent application writes,
the real pg_cron, and the real Alembic with the shipped examples."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from pathlib import Path

import psycopg2
import pytest

import chatgen
from compare import fetch_rows
from conftest import CHAT_DDL, PG_MAJOR, ROOT, Cluster, _start_cluster, pg_config
from load_sample import TARGET_DDL, copy_chats

CALL = "CALL backfill_chat_messages_resumable(now => %(now)s, {extra})"


def chats_for_test(count=120, hostile=True):
    chats = chatgen.realistic_chats(seed=5, count=count, content_bytes=(200, 1500), messages=(2, 10))
    return chats + (chatgen.hostile_chats() if hostile else [])


def make_db(cluster: Cluster, chats, ddl=TARGET_DDL, prefix="res") -> str:
    db = cluster.create_db(prefix)
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(CHAT_DDL)
        copy_chats(conn, chats)
        cur.execute(ddl)
    return db


def one_shot_rows(cluster: Cluster, chats, ddl=TARGET_DDL) -> dict:
    """The reference for every test here: the same data through the one-transaction form."""
    db = make_db(cluster, chats, ddl, prefix="oneshot")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT * FROM backfill_chat_messages(now => %s)", (chatgen.NOW,))
        return fetch_rows(conn, parse_json=False)


def call(cluster: Cluster, db: str, extra="batch_size => 40", notices=None):
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(CALL.format(extra=extra), {"now": chatgen.NOW})
        if notices is not None:
            notices.extend(conn.notices)


def status(cluster: Cluster, db: str) -> list[tuple]:
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT run_id, state, chats_done, total_chats, percent_done, messages_inserted,"
                    " estimated_time_left, runner_pid FROM chat_backfill.status ORDER BY run_id")
        return cur.fetchall()


def progress(cluster: Cluster, db: str) -> dict:
    """The latest run's checkpoint as the status view shows it."""
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT run_id, state, chats_done, total_chats, last_key, messages_inserted, messages_existing,"
                    " messages_rejected FROM chat_backfill.status ORDER BY run_id DESC LIMIT 1")
        return dict(zip([d.name for d in cur.description], cur.fetchone()))


RESUMED = re.compile(r"resuming run (\d+) after key (\S+)\s*$")


def resumed_after(notices) -> list[tuple[int, str]]:
    """(run, key) of every "resuming run N after key K" NOTICE."""
    return [(int(m[1]), m[2]) for n in notices for m in [RESUMED.search(n)] if m]


def eligible_chats(cluster: Cluster, db: str, after: str | None, upto: str) -> int:
    """Chats the backfill reads with keys in (after, upto], in the source's own order."""
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM chat WHERE user_id NOT LIKE 'shared-%%'"
                    " AND (%(after)s::text IS NULL OR id > %(after)s) AND id <= %(upto)s",
                    {"after": after, "upto": upto})
        return cur.fetchone()[0]


def assert_read_once(cluster: Cluster, db: str, want: dict):
    """The finished run read every eligible chat exactly once and wrote every row once:
    a chat read twice would count twice in chats_done and its rows as existing."""
    p = progress(cluster, db)
    assert p["state"] == "finished"
    assert p["chats_done"] == p["total_chats"] == eligible_chats(cluster, db, None, p["last_key"])
    assert (p["messages_inserted"], p["messages_existing"]) == (len(want), 0)


def rows_of(cluster: Cluster, db: str) -> dict:
    with cluster.connect(db) as conn:
        return fetch_rows(conn, parse_json=False)


@pytest.fixture(scope="module")
def expected(cluster):
    chats = chats_for_test()
    return chats, one_shot_rows(cluster, chats)


def test_call_gives_the_one_shot_result(cluster, expected):
    chats, want = expected
    db = make_db(cluster, chats)
    call(cluster, db)
    assert rows_of(cluster, db) == want
    [(run_id, state, done, total, percent, inserted, eta, pid)] = status(cluster, db)
    assert (state, done, total, percent, inserted, pid) == ("finished", total, total, 100, len(want), None)


def test_the_status_view_names_how_the_last_batch_went_in(cluster):
    """Issue 23: the status view's write_path says how the last batch went in: straight
    into a plain table of Open WebUI's DDL, through COPY where the target has something the
    direct path leaves to it (here a statement trigger), through the INSERT path where COPY
    cannot take a batch whole (its ids are there already: a restarted run)."""
    db = make_db(cluster, chats_for_test(count=40, hostile=False))
    paths = []
    for setup, extra in (("", ""),
                         ("CREATE FUNCTION nothing() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END';"
                          "CREATE TRIGGER s AFTER INSERT ON chat_message FOR EACH STATEMENT EXECUTE FUNCTION nothing();"
                          "TRUNCATE chat_message", ", restart => true"),
                         ("", ", restart => true")):
        with cluster.connect(db) as conn, conn.cursor() as cur:
            if setup:
                cur.execute(setup)
        call(cluster, db, "batch_size => 40" + extra)
        with cluster.connect(db) as conn, conn.cursor() as cur:
            cur.execute("SELECT write_path, messages_inserted, messages_existing FROM chat_backfill.status "
                        "ORDER BY run_id DESC LIMIT 1")
            paths.append(cur.fetchone())
    (direct, n, _), (copy, m, _), (insert, none, existing) = paths
    assert (direct, copy, insert) == ("direct", "copy binary", "insert"), paths
    assert n == m == existing > 0 and none == 0, paths


def test_max_runtime_stops_after_a_batch_and_the_next_call_resumes(cluster, expected):
    """Each CALL resumes right after the key the previous one checkpointed (its NOTICE
    names it) and reads exactly the chats after it: the chats_done it adds are the
    eligible chats between the two keys. batch_size 40 is more than any chat's messages
    (the largest hostile chat has 33), so no chat is ever split over two batches."""
    chats, want = expected
    db = make_db(cluster, chats)
    calls = 0
    before = None
    while calls < 200:
        calls += 1
        notices = []
        call(cluster, db, "batch_size => 40, max_runtime => '1 millisecond'", notices=notices)
        states = status(cluster, db)
        assert len(states) == 1, "every CALL resumes the same run"
        now = progress(cluster, db)
        if before is None:
            assert resumed_after(notices) == [], notices
            assert now["chats_done"] == eligible_chats(cluster, db, None, now["last_key"])
        else:
            assert resumed_after(notices) == [(before["run_id"], before["last_key"])], notices
            assert now["chats_done"] - before["chats_done"] == eligible_chats(
                cluster, db, before["last_key"], now["last_key"]), "this CALL read chats before its key, or skipped some"
            assert now["messages_existing"] == 0, "a message was written twice"
        before = now
        if states[0][1] == "finished":
            break
        assert states[0][1] == "stopped" and 0 < states[0][4] <= 100
        assert states[0][6] is not None, "an estimate of the time left while unfinished"
    assert calls > 5
    assert rows_of(cluster, db) == want
    assert_read_once(cluster, db, want)


def test_a_finished_backfill_is_a_fast_noop_and_restart_runs_again(cluster, expected):
    chats, want = expected
    db = make_db(cluster, chats)
    call(cluster, db)
    notices = []
    started = time.monotonic()
    call(cluster, db, notices=notices)
    assert time.monotonic() - started < 5
    assert any("already complete" in n for n in notices), notices
    assert len(status(cluster, db)) == 1
    call(cluster, db, "restart => true")
    runs = status(cluster, db)
    assert [r[1] for r in runs] == ["finished", "finished"] and runs[1][5] == 0  # all existing
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT messages_existing FROM chat_backfill.runs ORDER BY run_id DESC LIMIT 1")
        assert cur.fetchone() == (len(want),)
    assert rows_of(cluster, db) == want


def test_one_runner_at_a_time(cluster, expected):
    chats, want = expected
    db = make_db(cluster, chats)
    first = threading.Thread(target=call, args=(cluster, db, "batch_size => 40, pause => '150 milliseconds'"))
    first.start()
    deadline = time.monotonic() + 20
    while not any(r[1] == "running" for r in status(cluster, db)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    notices = []
    started = time.monotonic()
    call(cluster, db, notices=notices)
    assert time.monotonic() - started < 3, "the second CALL returns at once"
    assert any("another backfill" in n for n in notices), notices
    assert status(cluster, db)[0][7] is not None, "the status view names the runner"
    first.join()
    assert rows_of(cluster, db) == want


@pytest.mark.parametrize("where", ["transaction block", "function", "procedure with SET"])
def test_refused_where_it_cannot_commit(cluster, where):
    db = make_db(cluster, chats_for_test(count=3, hostile=False))
    with cluster.connect(db) as conn, conn.cursor() as cur:
        if where == "transaction block":
            conn.autocommit = False
            stmt = "CALL backfill_chat_messages_resumable()"
        elif where == "function":
            cur.execute("CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS"
                        " $$ BEGIN CALL backfill_chat_messages_resumable(); END $$")
            stmt = "SELECT f()"
        else:
            cur.execute("CREATE PROCEDURE p() LANGUAGE plpgsql SET work_mem = '64MB' AS"
                        " $$ BEGIN CALL backfill_chat_messages_resumable(); END $$")
            stmt = "CALL p()"
        with pytest.raises(psycopg2.Error) as err:
            cur.execute(stmt)
        assert err.value.pgcode == "2D000"
        assert "autocommit_block" in err.value.diag.message_hint
        assert "backfill_chat_messages()" in err.value.diag.message_hint


def run_in_background(cluster, db, extra):
    """A CALL in its own thread; returns (thread, backend pid)."""
    pid_box = {}

    def target():
        try:
            with cluster.connect(db) as conn, conn.cursor() as cur:
                cur.execute("SELECT pg_backend_pid()")
                pid_box["pid"] = cur.fetchone()[0]
                cur.execute(CALL.format(extra=extra), {"now": chatgen.NOW})
        except psycopg2.Error as e:  # the fault we inject
            pid_box["error"] = e

    t = threading.Thread(target=target)
    t.start()
    while "pid" not in pid_box:
        time.sleep(0.01)
    return t, pid_box


def wait_for_progress(cluster, db, at_least=2):
    deadline = time.monotonic() + 30
    while True:
        rows = status(cluster, db)
        if rows and rows[0][5] and len(rows_of(cluster, db)) > 0 and rows[0][2] >= at_least:
            return
        assert time.monotonic() < deadline, rows
        time.sleep(0.05)


def test_terminated_backend_resumes_without_loss_or_duplicates(cluster, expected):
    chats, want = expected
    db = make_db(cluster, chats)
    t, box = run_in_background(cluster, db, "batch_size => 30, pause => '100 milliseconds'")
    wait_for_progress(cluster, db, at_least=20)
    with cluster.connect() as admin, admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", (box["pid"],))
    t.join()
    assert isinstance(box.get("error"), psycopg2.OperationalError), box
    killed = progress(cluster, db)
    assert killed["state"] == "interrupted" and killed["chats_done"] >= 20
    notices = []
    call(cluster, db, notices=notices)
    # The next CALL starts right after the last committed batch; the batch the kill
    # rolled back is read again (it was never counted), nothing else is.
    assert resumed_after(notices) == [(killed["run_id"], killed["last_key"])], notices
    assert rows_of(cluster, db) == want
    runs = status(cluster, db)
    assert len(runs) == 1 and runs[0][1] == "finished"
    assert_read_once(cluster, db, want)


def test_immediate_shutdown_mid_run_resumes_after_restart(expected):
    chats, want = expected
    datadir = "/tmp/chat_backfill_crash"
    env = _start_cluster(datadir)
    crash = Cluster(env)
    try:
        db = make_db(crash, chats)
        t, box = run_in_background(crash, db, "batch_size => 30, pause => '100 milliseconds'")
        wait_for_progress(crash, db, at_least=20)
        subprocess.run(["runuser", "-u", "postgres", "--", f"{pg_config('--bindir')}/pg_ctl", "-D", datadir,
                        "-m", "immediate", "-w", "stop"], check=True, capture_output=True)
        t.join()
        subprocess.run(["runuser", "-u", "postgres", "--", f"{pg_config('--bindir')}/pg_ctl", "-D", datadir,
                        "-l", f"{datadir}/server.log", "-w", "start"], check=True, capture_output=True)
        crashed = progress(crash, db)
        assert crashed["state"] == "interrupted" and crashed["chats_done"] >= 20
        notices = []
        call(crash, db, notices=notices)
        assert resumed_after(notices) == [(crashed["run_id"], crashed["last_key"])], notices
        assert rows_of(crash, db) == want
        assert_read_once(crash, db, want)
    finally:
        subprocess.run(["bash", str(ROOT / "scripts/cluster.sh"), "stop", datadir], check=False)


def test_concurrent_application_writes(cluster):
    """Inserts, updates and deletes of chats while the backfill runs: no error, no
    deadlock, the CALL finishes, and no message of a deleted chat survives the foreign
    key. A chat deleted between being read and being written vanishes: it is counted in
    chats_vanished, not recorded as rejected (test_hardening.py pins this down exactly)."""
    chats = chats_for_test(count=150, hostile=False)
    db = make_db(cluster, chats)
    t, box = run_in_background(cluster, db, "batch_size => 20, pause => '20 milliseconds'")
    stop = threading.Event()
    errors = []
    deleted = set()

    def application():
        i = 0
        with cluster.connect(db) as conn, conn.cursor() as cur:
            while not stop.is_set():
                i += 1
                victim = chats[(i * 7) % len(chats)].id
                try:
                    cur.execute("INSERT INTO chat VALUES (%s, 'u-new', 't', %s)",
                                (f"zz-new-{i}", '{"history":{"messages":{"m":{"role":"user"}}}}'))
                    cur.execute("UPDATE chat SET title = 'renamed' WHERE id = %s", (chats[(i * 3) % len(chats)].id,))
                    cur.execute("DELETE FROM chat WHERE id = %s", (victim,))
                    if cur.rowcount:
                        deleted.add(victim)
                except psycopg2.Error as e:
                    errors.append(e)
                time.sleep(0.01)

    app = threading.Thread(target=application)
    app.start()
    t.join(timeout=120)
    stop.set()
    app.join()
    assert not t.is_alive() and "error" not in box, box
    assert not errors, errors[:3]
    assert deleted, "the application deleted chats during the run"
    with cluster.connect(db) as conn, conn.cursor() as cur:
        # The one CALL finished the run (no max_runtime); nothing left for another CALL.
        cur.execute("SELECT state, chats_vanished FROM chat_backfill.status")
        [(state, vanished)] = cur.fetchall()
        assert state == "finished"
        assert 0 <= vanished <= len(deleted)
        cur.execute("SELECT count(*) FROM chat_message m WHERE NOT EXISTS (SELECT 1 FROM chat c WHERE c.id = m.chat_id)")
        assert cur.fetchone() == (0,)
        cur.execute("ALTER TABLE chat_message VALIDATE CONSTRAINT chat_message_chat_id_fkey")
        cur.execute("SELECT chat_id, sqlstate FROM chat_backfill.rejected_messages")
        assert cur.fetchall() == [], "deleted chats are not rejections"
        # Every chat that is still there has all its messages.
        cur.execute("SELECT count(*) FROM chat c, chat_messages(c.id, c.user_id, c.chat, %s) m"
                    " WHERE c.user_id NOT LIKE 'shared-%%' AND c.user_id <> 'u-new'"
                    " AND NOT EXISTS (SELECT 1 FROM chat_message t WHERE t.id = m.id)", (chatgen.NOW,))
        assert cur.fetchone() == (0,)


CRON_DATADIR = "/tmp/chat_backfill_cron"


class PgCronRun:
    """A backfill scheduled with pg_cron in a cluster of its own. Debian's pg_cron 1.4.2
    schedules by the minute, so it is started when the session starts (conftest's
    `pg_cron_run`), and its test, which runs minutes later, mostly finds it done."""

    def __init__(self):
        self.chats = chats_for_test(count=20, hostile=True)
        self.stop()  # a fresh cluster: an interrupted session may have left its crondb behind
        env = _start_cluster(CRON_DATADIR, "shared_preload_libraries = 'pg_cron'", "cron.database_name = 'crondb'",
                             "cron.use_background_workers = on", "max_worker_processes = 16")
        self.cluster = Cluster(env)
        try:
            self.want = one_shot_rows(self.cluster, self.chats)
            with self.cluster.connect() as conn, conn.cursor() as cur:
                cur.execute("CREATE DATABASE crondb")
            with self.cluster.connect("crondb") as conn, conn.cursor() as cur:
                cur.execute("CREATE EXTENSION pg_cron")
                cur.execute("CREATE EXTENSION chat_backfill")
                cur.execute(CHAT_DDL)
                copy_chats(conn, self.chats)
                cur.execute(TARGET_DDL)
                # Each tick does one batch (max_runtime 0 stops after the first): two or three ticks.
                cur.execute(
                    "SELECT cron.schedule('chat-backfill', '* * * * *', $$CALL backfill_chat_messages_resumable("
                    "batch_size => 120, now => %s, max_runtime => '0')$$)"
                    % chatgen.NOW
                )
            self.deadline = time.monotonic() + 330
        except BaseException:
            self.stop()
            raise

    def stop(self):
        subprocess.run(["bash", str(ROOT / "scripts/cluster.sh"), "stop", CRON_DATADIR], check=False)


@pytest.mark.skipif(PG_MAJOR != "15", reason="pg_cron is installed here only as Debian's postgresql-15-cron")
def test_pg_cron_advances_it_a_slice_at_a_time(pg_cron_run):
    cron = pg_cron_run.cluster
    while True:
        rows = status(cron, "crondb")
        if rows and rows[-1][1] == "finished":
            break
        assert time.monotonic() < pg_cron_run.deadline, rows
        time.sleep(2)
    with cron.connect("crondb") as conn, conn.cursor() as cur:
        cur.execute("SELECT status, count(*) FROM cron.job_run_details GROUP BY 1")
        runs = dict(cur.fetchall())
        cur.execute("SELECT cron.unschedule('chat-backfill')")
    assert runs.get("succeeded", 0) >= 2 and set(runs) <= {"succeeded", "running"}, runs
    assert rows_of(cron, "crondb") == pg_cron_run.want


@pytest.mark.parametrize("style", ["committing", "transactional"])
def test_alembic_examples(cluster, style):
    chats = chats_for_test(count=60, hostile=False)
    want = one_shot_rows(cluster, chats)
    db = cluster.create_db(f"alembic_{style}", extension=False)
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(CHAT_DDL)
        copy_chats(conn, chats)
    _alembic_upgrade(ROOT / "examples/alembic", style, cluster.url(db))
    got = rows_of(cluster, db)
    assert got == want
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_indexes WHERE tablename = 'chat_message'")
        assert cur.fetchone() == (8,)
        cur.execute("SELECT convalidated FROM pg_constraint WHERE conname = 'chat_message_chat_id_fkey'")
        assert cur.fetchone() == (True,)


def _alembic_upgrade(examples: Path, style: str, url: str):
    from alembic import command
    from alembic.config import Config

    cfg = Config(str(examples / "alembic.ini"))
    cfg.set_main_option("script_location", str(examples))
    cfg.set_main_option("version_locations", str(examples / style))
    cfg.set_main_option("sqlalchemy.url", url)
    old = os.environ.pop("DATABASE_URL", None)
    try:
        command.upgrade(cfg, "head")
    finally:
        if old is not None:
            os.environ["DATABASE_URL"] = old


def test_lock_timeout_yields_to_the_application(cluster, expected):
    """The application holds a chat row FOR UPDATE; the batch that must reference it (the
    foreign key takes KEY SHARE) waits past lock_timeout, rolls back and the CALL ends
    normally with the run marked yielded. The next CALL, after the application is done,
    finishes with the one-shot result."""
    chats, want = expected
    db = make_db(cluster, chats)
    victim = next(c.id for c in chats if not c.user_id.startswith("shared-") and c.tag == "realistic")
    with cluster.connect(db, autocommit=False) as app, app.cursor() as cur:
        cur.execute("SELECT 1 FROM chat WHERE id = %s FOR UPDATE", (victim,))
        notices = []
        started = time.monotonic()
        call(cluster, db, "batch_size => 40, lock_timeout => '200 milliseconds'", notices=notices)
        assert time.monotonic() - started < 20
        assert any("lock_timeout" in n for n in notices), notices
        with cluster.connect(db) as conn, conn.cursor() as c2:
            c2.execute("SELECT state, last_error FROM chat_backfill.status")
            state, last_error = c2.fetchone()
        assert state == "yielded" and "lock timeout" in last_error
        app.rollback()
    call(cluster, db)
    assert rows_of(cluster, db) == want
    assert status(cluster, db)[0][1] == "finished"


def test_a_column_type_changed_mid_run_is_written_as_its_new_type(cluster):
    """The sixteenth review (high): batches go to COPY in its binary format, whose values are
    the column types' binary forms as the run first checked them. A CALL that went on after
    another session changed a column's type (here bigint to double precision, between two
    batches) wrote int8 bits read as a double (8.4e-315). Binary is taken only while every
    column has the type the run checked; otherwise COPY's text format parses the values as
    the columns are now."""
    chats = chats_for_test(count=60, hostile=False)
    db = make_db(cluster, chats, prefix="res_retype")
    t, box = run_in_background(cluster, db, "batch_size => 20, pause => '300 milliseconds'")
    deadline = time.monotonic() + 30
    while not rows_of(cluster, db):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("ALTER TABLE chat_message ALTER COLUMN updated_at TYPE double precision")
        cur.execute("SELECT count(*) FROM chat_message")
        (before,) = cur.fetchone()
    t.join(timeout=120)
    assert "error" not in box, box
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), count(*) FILTER (WHERE updated_at::numeric <> created_at::numeric) FROM chat_message")
        total, wrong = cur.fetchone()
    assert total > before, "no batch was written after the change: this test could not fail"
    assert wrong == 0, f"{wrong} of {total} rows hold another updated_at than created_at"
