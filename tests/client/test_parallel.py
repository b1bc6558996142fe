"""The committing procedure on background workers (workers => n) against real servers: the
same rows as one session, resume after the CALL or one of its workers is terminated or the
server stops with -m immediate, a failing worker stopping the others, workers returning at
once (wait_for_workers => false), slots and caps, and the role the workers run as."""

from __future__ import annotations

import subprocess
import threading
import time

import psycopg2
import psycopg2.errors
import pytest

import chatgen
from conftest import ONE_MAJOR, PG_MAJOR, ROOT, Cluster, _start_cluster, pg_config
from load_sample import TARGET_DDL
from test_resumable import CALL, chats_for_test, make_db, one_shot_rows, resumed_after, rows_of, run_in_background

SLOW = "batch_size => 30, pause => '100 milliseconds'"


@pytest.fixture(scope="module")
def expected(cluster):
    chats = chats_for_test(count=240)
    return chats, one_shot_rows(cluster, chats)


def query(cluster: Cluster, db: str, sql: str, args=None) -> list[tuple]:
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall() if cur.description else []


def call(cluster: Cluster, db: str, extra: str, notices=None):
    with cluster.connect(db) as conn, conn.cursor() as cur:
        try:
            cur.execute(CALL.format(extra=extra), {"now": chatgen.NOW})
        finally:
            if notices is not None:
                notices.extend(n.strip() for n in conn.notices)


def latest(cluster: Cluster, db: str) -> dict:
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT * FROM chat_backfill.status ORDER BY run_id DESC LIMIT 1")
        return dict(zip([d.name for d in cur.description], cur.fetchone()))


def workers_of(cluster: Cluster, db: str) -> list[tuple[int, str]]:
    """(pid, role) of the chat_backfill workers connected to db."""
    return query(cluster, "postgres", "SELECT pid, usename FROM pg_stat_activity"
                 " WHERE backend_type = 'chat_backfill worker' AND datname = %s ORDER BY pid", (db,))


def wait_until(what, timeout=60, step=0.05):
    deadline = time.monotonic() + timeout
    while not (value := what()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(step)
    return value


def assert_exactly_once(cluster: Cluster, db: str, want: dict):
    """Every eligible chat read once and every row written once, whatever stopped on the way."""
    assert rows_of(cluster, db) == want
    s = latest(cluster, db)
    assert s["state"] == "finished", s
    assert s["chats_done"] == s["total_chats"], s
    assert (s["messages_inserted"], s["messages_existing"]) == (len(want), 0), s
    assert query(cluster, db, "SELECT count(*) FROM chat_backfill.run_ranges WHERE NOT finished") == [(0,)]


@pytest.mark.parametrize("workers", [2, 4])
def test_workers_write_the_rows_of_one_session(cluster, expected, workers):
    chats, want = expected
    db = make_db(cluster, chats)
    notices = []
    call(cluster, db, f"batch_size => 40, workers => {workers}", notices)
    assert any(f"split into {4 * workers} key ranges" in n for n in notices), notices
    assert any(f"{workers} workers started" in n for n in notices), notices
    assert any("done after" in n and f"inserted {len(want)} messages" in n for n in notices), notices
    assert_exactly_once(cluster, db, want)
    # The ranges cover the keys without gap or overlap, and each holds chat bytes.
    ranges = query(cluster, db, "SELECT low_key, high_key, chat_bytes FROM chat_backfill.run_ranges ORDER BY range_no")
    assert len(ranges) == 4 * workers and ranges[0][0] is None
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(r[2] > 0 for r in ranges)
    # A finished run is a no-op for the next CALL, workers or not.
    notices = []
    call(cluster, db, f"workers => {workers}", notices)
    assert any("already complete" in n for n in notices), notices


def test_terminating_the_call_stops_its_workers_and_the_next_call_resumes(cluster, expected):
    chats, want = expected
    db = make_db(cluster, chats)
    t, box = run_in_background(cluster, db, SLOW + ", workers => 2")
    wait_until(lambda: len(workers_of(cluster, db)) == 2 and latest(cluster, db)["chats_done"] >= 20)
    query(cluster, "postgres", "SELECT pg_terminate_backend(%s)", (box["pid"],))
    t.join()
    assert isinstance(box.get("error"), psycopg2.OperationalError), box
    # Its workers see the CALL gone before their next batch.
    wait_until(lambda: not workers_of(cluster, db), timeout=30)
    killed = latest(cluster, db)
    assert killed["state"] == "interrupted" and 20 <= killed["chats_done"] < killed["total_chats"], killed
    notices = []
    call(cluster, db, "batch_size => 40, workers => 2", notices)
    assert resumed_after(notices) and resumed_after(notices)[0][0] == killed["run_id"], notices
    assert_exactly_once(cluster, db, want)


def test_terminating_a_worker_fails_the_call_and_the_next_call_resumes(cluster, expected):
    chats, want = expected
    db = make_db(cluster, chats)
    t, box = run_in_background(cluster, db, SLOW + ", workers => 2")
    pids = wait_until(lambda: (w := workers_of(cluster, db)) and len(w) == 2 and latest(cluster, db)["chats_done"] >= 20 and w)
    query(cluster, "postgres", "SELECT pg_terminate_backend(%s)", (pids[0][0],))
    t.join()
    error = box.get("error")
    assert isinstance(error, psycopg2.errors.AdminShutdown), box
    assert "stopped before finishing its key range" in error.diag.message_primary
    assert "CALL again" in error.diag.message_hint
    # The CALL stopped the other worker before it returned.
    assert not workers_of(cluster, db)
    failed = latest(cluster, db)
    assert failed["state"] == "failed" and "stopped before finishing" in failed["last_error"], failed
    call(cluster, db, "batch_size => 40, workers => 2")
    assert_exactly_once(cluster, db, want)


def test_immediate_shutdown_with_workers_resumes_after_restart(expected):
    chats, want = expected
    datadir = "/tmp/chat_backfill_parallel_crash"
    crash = Cluster(_start_cluster(datadir))
    ctl = [f"{pg_config('--bindir')}/pg_ctl", "-D", datadir]
    try:
        db = make_db(crash, chats)
        t, box = run_in_background(crash, db, SLOW + ", workers => 3")
        wait_until(lambda: len(workers_of(crash, db)) == 3 and latest(crash, db)["chats_done"] >= 30)
        subprocess.run(["runuser", "-u", "postgres", "--", *ctl, "-m", "immediate", "-w", "stop"], check=True, capture_output=True)
        t.join()
        subprocess.run(["runuser", "-u", "postgres", "--", *ctl, "-l", f"{datadir}/server.log", "-w", "start"],
                       check=True, capture_output=True)
        crashed = latest(crash, db)
        assert crashed["state"] == "interrupted" and crashed["chats_done"] < crashed["total_chats"], crashed
        # Resumed with another number of workers: every range goes on from its checkpoint.
        call(crash, db, "batch_size => 40, workers => 2")
        assert_exactly_once(crash, db, want)
    finally:
        subprocess.run(["bash", str(ROOT / "scripts/cluster.sh"), "stop", datadir], check=False)


FAIL_ON_CHAT = """
CREATE FUNCTION refuse_one_chat() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.chat_id = %(chat)s THEN
    RAISE EXCEPTION 'no rows for chat %%', NEW.chat_id USING ERRCODE = 'insufficient_privilege';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER refuse_one_chat BEFORE INSERT ON chat_message FOR EACH ROW EXECUTE FUNCTION refuse_one_chat();
"""


def test_a_failing_worker_stops_the_others_and_the_call_reports_its_error(cluster, expected):
    """An error that is not about one message's data (here a trigger raising 42501 for one
    chat late in the keys) stops the run: the CALL raises it with its SQLSTATE, the other
    workers stop, and once the cause is gone the next CALL finishes exactly."""
    chats, want = expected
    db = make_db(cluster, chats)
    [(victim,)] = query(cluster, db, "SELECT id FROM chat WHERE user_id NOT LIKE 'shared-%%' AND chat::text LIKE '%%\"role\": \"user\"%%'"
                        " ORDER BY id DESC LIMIT 1 OFFSET 5")
    query(cluster, db, FAIL_ON_CHAT, {"chat": victim})
    with pytest.raises(psycopg2.errors.InsufficientPrivilege) as err:
        call(cluster, db, "batch_size => 30, workers => 3")
    assert "a worker of run" in err.value.diag.message_primary and f"no rows for chat {victim}" in err.value.diag.message_primary
    assert not workers_of(cluster, db)
    s = latest(cluster, db)
    assert s["state"] == "failed" and f"no rows for chat {victim}" in s["last_error"], s
    assert s["chats_done"] < s["total_chats"]
    query(cluster, db, "DROP TRIGGER refuse_one_chat ON chat_message")
    call(cluster, db, "batch_size => 30, workers => 3")
    assert_exactly_once(cluster, db, want)


def test_without_waiting_the_call_returns_and_the_workers_finish(cluster, expected):
    chats, want = expected
    db = make_db(cluster, chats)
    notices = []
    started = time.monotonic()
    call(cluster, db, SLOW + ", workers => 2, wait_for_workers => false", notices)
    assert time.monotonic() - started < 10
    assert any("in the background" in n for n in notices), notices
    s = latest(cluster, db)
    assert s["state"] == "running" and s["workers"] == 2 and s["runner_pid"] is not None, s
    # A pg_cron tick meanwhile does nothing, or fails if told to; 'wait' waits for the workers.
    notices = []
    call(cluster, db, "workers => 2", notices)
    assert any("are still backfilling" in n and "this call does nothing" in n for n in notices), notices
    with pytest.raises(psycopg2.errors.LockNotAvailable):
        call(cluster, db, "workers => 2, if_busy => 'error'")
    notices = []
    call(cluster, db, "workers => 2, if_busy => 'wait'", notices)
    assert any("already complete" in n for n in notices), notices
    assert_exactly_once(cluster, db, want)


def test_one_session_finishes_a_run_its_workers_began(cluster, expected):
    chats, want = expected
    db = make_db(cluster, chats)
    call(cluster, db, "batch_size => 30, workers => 3, max_runtime => '1 millisecond'")
    wait_until(lambda: not workers_of(cluster, db), timeout=30)
    s = latest(cluster, db)
    assert s["state"] == "stopped" and "max_runtime" in s["last_error"], s
    call(cluster, db, "batch_size => 30")
    assert_exactly_once(cluster, db, want)


@ONE_MAJOR
def test_workers_are_capped_by_the_setting_and_by_free_slots(expected):
    chats, want = expected
    datadir = "/tmp/chat_backfill_parallel_slots"
    # max_worker_processes counts every background worker: the logical replication launcher
    # takes one of the three, so two are free for six asked.
    small = Cluster(_start_cluster(datadir, "max_worker_processes=3"))
    try:
        db = make_db(small, chats)
        notices = []
        with small.connect(db) as conn, conn.cursor() as cur:
            cur.execute("SET chat_backfill.max_workers = 8")
            cur.execute(CALL.format(extra="batch_size => 40, workers => 6"), {"now": chatgen.NOW})
            notices = [n.strip() for n in conn.notices]
        assert any("only 2 background worker slots were free" in n for n in notices), notices
        assert_exactly_once(small, db, want)
        db2 = make_db(small, chats)
        notices = []
        with small.connect(db2) as conn, conn.cursor() as cur:
            cur.execute("SET chat_backfill.max_workers = 1")
            cur.execute(CALL.format(extra="batch_size => 40, workers => 4"), {"now": chatgen.NOW})
            notices = [n.strip() for n in conn.notices]
        assert any("starts 1 of the 4 workers asked for (chat_backfill.max_workers is 1)" in n for n in notices), notices
        assert_exactly_once(small, db2, want)
    finally:
        subprocess.run(["bash", str(ROOT / "scripts/cluster.sh"), "stop", datadir], check=False)


def test_only_a_superuser_raises_the_worker_cap(cluster):
    db = cluster.create_db("cap")
    role = f"cap_{int(time.time() * 1000) % 10**8}"
    query(cluster, db, f"CREATE ROLE {role} LOGIN")
    try:
        with cluster.connect(db) as conn, conn.cursor() as cur:
            # Set before the library loads, the value is only a placeholder, which the load
            # drops (with a WARNING) since a non-superuser set it.
            cur.execute(f"SET ROLE {role}")
            cur.execute("SET chat_backfill.max_workers = 64")
            cur.execute("SELECT count(*) FROM chat_messages('c', 'u', '{}'::json)")
            cur.execute("SHOW chat_backfill.max_workers")
            assert cur.fetchone() == ("4",)
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                cur.execute("SET chat_backfill.max_workers = 64")
    finally:
        query(cluster, db, f"DROP ROLE {role}")


@pytest.mark.parametrize("bad", ["0", "65"])
def test_workers_out_of_range_are_refused(cluster, bad):
    db = cluster.create_db("badworkers")
    with pytest.raises(psycopg2.errors.InvalidParameterValue) as err:
        call(cluster, db, f"workers => {bad}")
    assert "workers must be between 1 and 64" in err.value.diag.message_primary


WHO = """
CREATE TABLE who (role name, session_role name, pid int);
GRANT INSERT ON who TO PUBLIC;
CREATE FUNCTION note_who() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO public.who VALUES (current_user, session_user, pg_backend_pid());
  RETURN NULL;
END $$;
CREATE TRIGGER note_who AFTER INSERT ON chat_message FOR EACH STATEMENT EXECUTE FUNCTION note_who();
"""


@pytest.mark.parametrize("login", ["LOGIN", "NOLOGIN"])
def test_workers_run_as_the_calling_role_never_a_more_privileged_one(cluster, expected, login):
    """A superuser's session that SET ROLE to an ordinary role: the workers connect as that
    role (what every trigger and policy sees), not as the superuser. A NOLOGIN role can be
    a worker's only from PostgreSQL 17 on; before, the CALL says so up front."""
    chats, want = expected
    db = make_db(cluster, chats)
    role = f"runner_{login.lower()}_{int(time.time() * 1000) % 10**8}"
    query(cluster, db, f"CREATE ROLE {role} {login}; GRANT SELECT ON chat TO {role};"
                       f" GRANT SELECT, INSERT ON chat_message TO {role};" + WHO)
    try:
        with cluster.connect(db) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            [(me,)] = cur.fetchall()
            cur.execute(f"SET ROLE {role}")
            if login == "NOLOGIN" and int(PG_MAJOR) < 17:
                with pytest.raises(psycopg2.errors.InsufficientPrivilege) as err:
                    cur.execute(CALL.format(extra="batch_size => 40, workers => 2"), {"now": chatgen.NOW})
                assert "NOLOGIN" in err.value.diag.message_primary and "workers => 1" in err.value.diag.message_hint
                return
            cur.execute(CALL.format(extra="batch_size => 40, workers => 2"), {"now": chatgen.NOW})
        writers = query(cluster, db, "SELECT DISTINCT role, session_role, pid FROM who")
        assert writers and {(w[0], w[1]) for w in writers} == {(role, role)}, writers
        assert me not in {w[2] for w in writers}
        assert rows_of(cluster, db) == want
        # A launch is the calling role's own: another role neither sees it nor forges one.
        other = role + "_x"
        query(cluster, db, f"CREATE ROLE {other} LOGIN; GRANT SELECT ON chat TO {other}; GRANT SELECT, INSERT ON chat_message TO {other}")
        with cluster.connect(db) as conn, conn.cursor() as cur:
            cur.execute(f"SET ROLE {other}")
            cur.execute("SELECT count(*) FROM chat_backfill.launches")
            assert cur.fetchone() == (0,)
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                cur.execute("INSERT INTO chat_backfill.launches (run_id, settings, launched_by)"
                            " SELECT run_id, '{}', %s FROM chat_backfill.runs", (role,))
        query(cluster, db, f"DROP OWNED BY {other}; DROP ROLE {other}")
    finally:
        query(cluster, db, f"DROP OWNED BY {role}; DROP ROLE {role}")


def test_a_session_squatting_a_range_lock_is_named_not_taken_for_a_runner(cluster, expected):
    """Any role can take any advisory lock. One that holds a range's lock keeps the workers
    off that range: the CALL says so with 55P03 and the backend's pid instead of reporting
    success, the status view does not take it for a runner, and once it is gone the next
    CALL finishes exactly."""
    chats, want = expected
    db = make_db(cluster, chats)
    call(cluster, db, "batch_size => 30, workers => 2, max_runtime => '1 millisecond'")
    wait_until(lambda: not workers_of(cluster, db), timeout=30)
    [(range_id,)] = query(cluster, db, "SELECT range_id FROM chat_backfill.run_ranges WHERE NOT finished"
                                       " ORDER BY range_no DESC LIMIT 1")
    role = f"squatter_{int(time.time() * 1000) % 10**8}"
    query(cluster, "postgres", f"CREATE ROLE {role} LOGIN")
    squatter = psycopg2.connect(cluster.dsn(db))
    squatter.autocommit = True
    try:
        with squatter.cursor() as cur:
            cur.execute(f"SET ROLE {role}")
            cur.execute("SELECT pg_backend_pid(), pg_advisory_lock(1667329894, %s)", (range_id,))
            [(pid, _)] = cur.fetchall()
        with pytest.raises(psycopg2.errors.LockNotAvailable) as err:
            call(cluster, db, "batch_size => 30, workers => 2")
        assert str(pid) in err.value.diag.message_primary and "not chat_backfill workers" in err.value.diag.message_primary
        assert "pg_terminate_backend" in err.value.diag.message_primary
        s = latest(cluster, db)
        assert s["state"] == "failed" and s["runner_pid"] is None and s["workers"] is None, s
        # Nor does a later CALL take the squatter for running workers and skip.
        with pytest.raises(psycopg2.errors.LockNotAvailable):
            call(cluster, db, "batch_size => 30")
    finally:
        squatter.close()
        query(cluster, "postgres", f"DROP ROLE {role}")
    call(cluster, db, "batch_size => 40, workers => 2")
    assert_exactly_once(cluster, db, want)


def test_keys_that_are_dates_survive_any_datestyle(cluster):
    """The high-water mark, the ranges and the checkpoints are kept as text and read back by
    the workers and by later CALLs, each with its own DateStyle: under 'SQL, DMY' a key of 3
    April printed as 03/04 must not come back as 4 March."""
    chats = chats_for_test(count=150, hostile=False)
    db = cluster.create_db("datekeys")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE chat_src (id text PRIMARY KEY, user_id text, title text, chat json)")
        cur.executemany("INSERT INTO chat_src VALUES (%s, %s, 't', %s)", [(c.id, c.user_id, c.chat) for c in chats])
        # One chat a day from 1 January: days 1-12 of each month read differently as DMY and MDY.
        cur.execute("CREATE TABLE chat (id timestamp PRIMARY KEY, user_id text, chat json);"
                    " INSERT INTO chat SELECT timestamp '2024-01-01' + (n - 1) * interval '1 day', user_id, chat"
                    " FROM (SELECT row_number() OVER (ORDER BY id) AS n, user_id, chat FROM chat_src) s")
        cur.execute(TARGET_DDL.replace("REFERENCES chat(id) ON DELETE CASCADE", ""))
        cur.execute("SELECT sum(messages_inserted) FROM backfill_chat_messages(now => %s, dry_run => true)",
                    (chatgen.NOW,))
        [(messages,)] = cur.fetchall()
        cur.execute("SELECT count(*) FROM chat WHERE user_id NOT LIKE 'shared-%%'")
        [(eligible,)] = cur.fetchall()
    for style, workers in (("SQL, DMY", 4), ("German", 1), ("Postgres, MDY", 3)):
        with cluster.connect(db) as conn, conn.cursor() as cur:
            cur.execute("TRUNCATE chat_message; DELETE FROM chat_backfill.runs")
            cur.execute(f"SET datestyle = '{style}'")
            cur.execute(CALL.format(extra=f"batch_size => 30, workers => {workers}, max_runtime => '1 millisecond'"),
                        {"now": chatgen.NOW})
        wait_until(lambda: not workers_of(cluster, db), timeout=30)
        # Resumed from a session with the server's DateStyle.
        call(cluster, db, f"batch_size => 30, workers => {workers}")
        s = latest(cluster, db)
        assert s["state"] == "finished" and s["chats_done"] == s["total_chats"] == eligible, (style, s)
        assert (s["messages_inserted"], s["messages_existing"]) == (messages, 0), (style, s)
        assert query(cluster, db, "SELECT count(*) FROM chat_message") == [(messages,)]


@ONE_MAJOR
def test_the_worker_cap_is_the_servers_not_one_calls(cluster, expected):
    """chat_backfill.max_workers bounds the workers of every CALL together: an ordinary role
    cannot take every worker slot with several CALLs that return at once."""
    chats, want = expected
    first, second = make_db(cluster, chats), make_db(cluster, chats)
    def cap(value: str):
        with cluster.connect("postgres") as conn, conn.cursor() as cur:
            cur.execute("LOAD 'chat_backfill'")  # ALTER SYSTEM checks the setting exists
            cur.execute(f"ALTER SYSTEM {value}")
            cur.execute("SELECT pg_reload_conf()")
        # A new session sees it (the library is not loaded there: the setting is a placeholder).
        wait_until(lambda: (query(cluster, "postgres", "SELECT current_setting('chat_backfill.max_workers', true)")
                            == [("2",)]) == value.startswith("SET"))

    cap("SET chat_backfill.max_workers = 2")
    try:
        call(cluster, first, "batch_size => 30, pause => '300 milliseconds', workers => 2, wait_for_workers => false")
        notices = []
        call(cluster, second, "batch_size => 40, workers => 2", notices)
        assert any("2 chat_backfill workers already run on this server (chat_backfill.max_workers is 2)" in n
                   for n in notices), notices
        assert any("this CALL works run" in n and "itself" in n for n in notices), notices
        assert_exactly_once(cluster, second, want)
        call(cluster, first, "workers => 2, if_busy => 'wait'")
        assert_exactly_once(cluster, first, want)
    finally:
        cap("RESET chat_backfill.max_workers")


@ONE_MAJOR
def test_the_worker_cap_holds_for_calls_started_at_the_same_instant(cluster, expected):
    """Three roles' CALLs, released together, each asking for 3 workers that return at once,
    under chat_backfill.max_workers = 4: the check and the start happen under one server-wide
    lock, so at no time do more than 4 workers run (on 0.6.0 the CALLs all counted before any
    worker took its mark: 7 of 4)."""
    chats, _ = expected
    dbs = [make_db(cluster, chats) for _ in range(3)]
    stamp = int(time.time() * 1000) % 10**8
    roles = [f"capper_{stamp}_{n}" for n in range(3)]
    for db, role in zip(dbs, roles):
        query(cluster, db, f"CREATE ROLE {role} LOGIN; GRANT SELECT ON chat TO {role};"
                           f" GRANT SELECT, INSERT ON chat_message TO {role}")
    with cluster.connect("postgres") as conn, conn.cursor() as cur:
        cur.execute("LOAD 'chat_backfill'")
        cur.execute("ALTER SYSTEM SET chat_backfill.max_workers = 4")
        cur.execute("SELECT pg_reload_conf()")
    wait_until(lambda: query(cluster, "postgres", "SELECT current_setting('chat_backfill.max_workers', true)") == [("4",)])
    barrier = threading.Barrier(3)
    errors = []

    def start(db, role):
        try:
            with cluster.connect(db) as conn, conn.cursor() as cur:
                cur.execute(f"SET ROLE {role}")
                barrier.wait()
                cur.execute(CALL.format(extra="batch_size => 20, pause => '200 milliseconds', workers => 3, "
                                              "wait_for_workers => false"), {"now": chatgen.NOW})
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    peak = 0
    try:
        threads = [threading.Thread(target=start, args=pair) for pair in zip(dbs, roles)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while (any(t.is_alive() for t in threads) or peak == 0) and time.monotonic() < deadline:
            [(n,)] = query(cluster, "postgres", "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'chat_backfill worker'")
            peak = max(peak, n)
            time.sleep(0.01)
        for t in threads:
            t.join()
        for _ in range(20):
            [(n,)] = query(cluster, "postgres", "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'chat_backfill worker'")
            peak = max(peak, n)
            time.sleep(0.05)
        assert not errors, errors
        assert 0 < peak <= 4, peak
    finally:
        query(cluster, "postgres", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'chat_backfill worker'")
        with cluster.connect("postgres") as conn, conn.cursor() as cur:
            cur.execute("ALTER SYSTEM RESET chat_backfill.max_workers")
            cur.execute("SELECT pg_reload_conf()")
        wait_until(lambda: not query(cluster, "postgres",
                                     "SELECT FROM pg_stat_activity WHERE backend_type = 'chat_backfill worker'"))
        for db, role in zip(dbs, roles):
            query(cluster, db, f"DROP OWNED BY {role}; DROP ROLE {role}")


def test_the_callers_transaction_keeps_its_own_datestyle(cluster, expected):
    """The committing form prints keys as ISO in its own transactions; a DO block that CALLs
    it goes on, after the CALL, with the DateStyle the session had."""
    chats, want = expected
    db = make_db(cluster, chats)
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SET datestyle = 'SQL, DMY'")
        cur.execute("DO $$ BEGIN CALL backfill_chat_messages_resumable(now => %s, workers => 2);"
                    " RAISE NOTICE 'after: %%', current_setting('datestyle'); END $$" % chatgen.NOW)
        assert any("after: SQL, DMY" in n for n in conn.notices), conn.notices
    assert_exactly_once(cluster, db, want)


def test_workers_see_the_sessions_custom_settings(cluster):
    """Multi-tenant row-level security on the source reads a custom setting; the CALL's
    session set it. Workers take every setting the session changed, placeholders included,
    so two workers write exactly one session's rows (on 0.6.0 they wrote none and said
    finished)."""
    chats = chatgen.realistic_chats(seed=21, count=60, content_bytes=(100, 400), messages=(1, 5))
    role = f"tenant_app_{int(time.time() * 1000) % 10**8}"
    results = []
    for workers in (1, 2):
        db = make_db(cluster, chats)
        query(cluster, db, f"CREATE ROLE {role}_{workers} LOGIN; GRANT SELECT ON chat TO {role}_{workers};"
                           f" GRANT SELECT, INSERT ON chat_message TO {role}_{workers};"
                           " ALTER TABLE chat ENABLE ROW LEVEL SECURITY;"
                           " CREATE POLICY tenant ON chat USING (user_id <= current_setting('app.tenant', true))")
        tenant = sorted(c.user_id for c in chats)[len(chats) // 2]
        try:
            with cluster.connect(db) as conn, conn.cursor() as cur:
                cur.execute("SET app.tenant = %s", (tenant,))
                cur.execute(f"SET ROLE {role}_{workers}")
                cur.execute(CALL.format(extra=f"batch_size => 10, workers => {workers}"), {"now": chatgen.NOW})
                cur.execute("RESET ROLE")
                cur.execute("SELECT state, chats_done, total_chats FROM chat_backfill.status")
                [(state, done, total)] = cur.fetchall()
            assert state == "finished" and done == total > 10
            results.append(rows_of(cluster, db))
        finally:
            query(cluster, db, f"DROP OWNED BY {role}_{workers}; DROP ROLE {role}_{workers}")
    assert results[0] == results[1] and len(results[0]) > 0


@ONE_MAJOR
def test_a_setting_only_a_connection_start_sets_is_named_not_carried(cluster, expected):
    """The thirteenth review: a client that gave ignore_system_indexes in its startup packet
    (PGOPTIONS) made every worker fail, since a worker reads its launch once connected and
    cannot set it then. Such a setting is now left out, and the CALL says so."""
    chats, want = expected
    db = make_db(cluster, chats)
    conn = psycopg2.connect(cluster.dsn(db), options="-c ignore_system_indexes=on")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW ignore_system_indexes")
            assert cur.fetchone() == ("on",), "the setting did not reach the session: this test could not fail"
            cur.execute(CALL.format(extra="workers => 2"), {"now": chatgen.NOW})
        assert any("run without this session's ignore_system_indexes" in n for n in conn.notices), conn.notices
    finally:
        conn.close()
    assert_exactly_once(cluster, db, want)


WORKER = ("EXISTS (SELECT FROM pg_catalog.pg_stat_activity a WHERE a.pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()"
          " AND a.backend_type OPERATOR(pg_catalog.=) 'chat_backfill worker'::pg_catalog.text)")


@pytest.mark.parametrize("hidden_by, says", [
    ("policy", "is not visible to this worker"),
    ("source_filter", "without reading any chat, although 60 were counted"),
])
def test_workers_that_read_nothing_of_what_the_call_counted_fail_the_run(cluster, hidden_by, says):
    """Independently of what workers carry: a run whose readers saw none of the chats its
    CALL counted is never reported finished. Here the source's policy, or the source_filter,
    hides every row from chat_backfill workers (whatever their settings), so the workers read
    nothing. 0.6.0 reported the run finished with 0 of 60 chats; now the CALL fails with
    55000, saying why, and the run is recorded as failed."""
    chats = chatgen.realistic_chats(seed=22, count=60, content_bytes=(100, 400), messages=(1, 5))
    chats = [c for c in chats if not c.user_id.startswith("shared-")]
    chats += [chatgen.Chat(f"extra-{i}", "user-1", chats[0].chat) for i in range(60 - len(chats))]
    db = make_db(cluster, chats)
    role = f"blind_{int(time.time() * 1000) % 10**8}"
    query(cluster, db, f"CREATE ROLE {role} LOGIN; GRANT SELECT ON chat TO {role};"
                       f" GRANT SELECT, INSERT ON chat_message TO {role}")
    extra = "batch_size => 10, workers => 2"
    if hidden_by == "policy":
        query(cluster, db, f"ALTER TABLE chat ENABLE ROW LEVEL SECURITY; CREATE POLICY not_to_workers ON chat USING (NOT {WORKER})")
    else:
        extra += f", source_filter => $f$NOT {WORKER}$f$"
    try:
        with cluster.connect(db) as conn, conn.cursor() as cur:
            cur.execute(f"SET ROLE {role}")
            with pytest.raises(psycopg2.Error) as err:
                cur.execute(CALL.format(extra=extra), {"now": chatgen.NOW})
            assert err.value.pgcode == "55000", err.value.pgerror
            assert says in err.value.pgerror
            cur.execute("RESET ROLE")
            cur.execute("SELECT state, chats_done, total_chats FROM chat_backfill.status")
            [(state, done, total)] = cur.fetchall()
        assert (state, done, total) == ("failed", 0, 60)
        assert rows_of(cluster, db) == {}
    finally:
        query(cluster, db, f"DROP OWNED BY {role}; DROP ROLE {role}")


@ONE_MAJOR
def test_drop_extension_while_workers_run(cluster):
    """DROP EXTENSION while two background workers write: the DROP waits for their current
    batch (they commit each one), the workers then stop on the missing state with 42P01 (never
    XX000 or a crash: the suite's last test reads the server log), and after CREATE
    EXTENSION the next CALL writes exactly the rows still missing, counting the rest as
    existing."""
    chats = chatgen.realistic_chats(seed=23, count=3000, content_bytes=(200, 800), messages=(4, 12))
    want = one_shot_rows(cluster, chats)
    db = make_db(cluster, chats)
    query(cluster, db, f"CALL backfill_chat_messages_resumable(now => {chatgen.NOW}, batch_size => 50, workers => 2,"
                       " wait_for_workers => false)")
    deadline = time.time() + 60
    while query(cluster, db, "SELECT count(*) FROM chat_message")[0][0] == 0 and time.time() < deadline:
        time.sleep(0.05)
    query(cluster, db, "DROP EXTENSION chat_backfill")
    while query(cluster, db, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'chat_backfill worker'"
                             " AND datname = current_database()")[0][0] and time.time() < deadline:
        time.sleep(0.05)
    written = query(cluster, db, "SELECT count(*) FROM chat_message")[0][0]
    assert 0 < written < len(want), "the DROP came while the workers were part way"
    query(cluster, db, "CREATE EXTENSION chat_backfill")
    query(cluster, db, f"CALL backfill_chat_messages_resumable(now => {chatgen.NOW}, workers => 2)")
    assert rows_of(cluster, db) == want
    s = latest(cluster, db)
    assert (s["state"], s["messages_inserted"], s["messages_existing"]) == ("finished", len(want) - written, written)
