"""The committing procedure on a primary with a real streaming standby (issue 10, part 1).

A primary and a standby made by pg_basebackup -R (scripts/cluster.sh standby) run on this
machine. Pausing replay on the standby makes it fall behind: a CALL with max_replica_lag
must stop advancing (state 'throttled', the lag in the status view) while replay is paused,
and finish after it resumes; the standby ends with the same rows. Also: a replication slot
that does not advance throttles the run the same way; max_wal_rate paces this backend's
WAL; and a throttle that could not see the standbys, or a slot that does not exist, is an
error before anything is written.
"""

from __future__ import annotations

import subprocess
import threading
import time

import psycopg2
import psycopg2.errors
import pytest

import chatgen
from conftest import ROOT, Cluster, _start_cluster, load_chats
from load_sample import TARGET_DDL

PRIMARY, STANDBY = "/tmp/chat_backfill_primary", "/tmp/chat_backfill_standby"
CALL = "CALL backfill_chat_messages_resumable(now => %(now)s, {extra})"


def _cluster_sh(*args) -> dict[str, str]:
    out = subprocess.run(["bash", str(ROOT / "scripts/cluster.sh"), *args],
                         check=True, capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.replace("export ", "").split())


@pytest.fixture(scope="module")
def pair():
    try:
        primary = Cluster(_start_cluster(PRIMARY, "wal_level = replica", "max_wal_senders = 4"))
        standby = Cluster(_cluster_sh("standby", PRIMARY, STANDBY))
        yield primary, standby
    finally:
        for d in (STANDBY, PRIMARY):
            subprocess.run(["bash", str(ROOT / "scripts/cluster.sh"), "stop", d], check=False)


def chats():
    # Messages of 1-4 kB: a batch of 100 messages writes several hundred kB of WAL.
    return chatgen.realistic_chats(seed=5, count=60, content_bytes=(1000, 4000), messages=(4, 12))


def make_db(primary: Cluster) -> str:
    db = primary.create_db("replica")
    with primary.connect(db) as conn, conn.cursor() as cur:
        load_chats(conn, chats())
        cur.execute(TARGET_DDL)
    return db


def wait_until(predicate, what: str, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def status(cluster: Cluster, db: str) -> dict | None:
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT state, chats_done, total_chats, replica_lag_bytes FROM chat_backfill.status")
        row = cur.fetchone()
        return None if row is None else dict(zip(("state", "chats_done", "total_chats", "lag"), row))


def call_in_background(cluster: Cluster, db: str, extra: str, user="postgres"):
    box: dict = {"notices": []}

    def target():
        try:
            with cluster.connect(db) as conn, conn.cursor() as cur:
                if user != "postgres":
                    cur.execute(f'SET ROLE "{user}"')
                cur.execute(CALL.format(extra=extra), {"now": chatgen.NOW})
                box["notices"] = list(conn.notices)
        except psycopg2.Error as e:
            box["error"] = e

    t = threading.Thread(target=target)
    t.start()
    return t, box


def rows(cluster: Cluster, db: str) -> list[tuple]:
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, chat_id, role, content::text, created_at FROM chat_message ORDER BY id")
        return cur.fetchall()


def test_paused_replay_stops_the_run_and_resuming_it_finishes(pair):
    primary, standby = pair
    db = make_db(primary)
    wait_until(lambda: _has_db(standby, db), "the standby to have the database")
    with standby.connect() as s, s.cursor() as cur:
        cur.execute("SELECT pg_wal_replay_pause()")
    try:
        t, box = call_in_background(primary, db, "batch_size => 100, max_replica_lag => '64kB'")
        throttled = wait_until(lambda: (st := status(primary, db)) and st["state"] == "throttled" and st, "throttled")
        assert throttled["lag"] > 64 * 1024 and throttled["chats_done"] < throttled["total_chats"], throttled
        # While replay stays paused the run does not advance.
        time.sleep(2)
        still = status(primary, db)
        assert still["state"] == "throttled" and still["chats_done"] == throttled["chats_done"], (throttled, still)
    finally:
        with standby.connect() as s, s.cursor() as cur:
            cur.execute("SELECT pg_wal_replay_resume()")
    t.join(timeout=120)
    assert not t.is_alive() and "error" not in box, box
    done = status(primary, db)
    assert done["state"] == "finished" and done["chats_done"] == done["total_chats"]
    with primary.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT replica_lag_bytes FROM chat_backfill.runs")
        assert cur.fetchone() == (None,), "the lag is cleared once the replicas caught up"
    assert any("waits" in n for n in box["notices"]) and any("caught up" in n for n in box["notices"]), box["notices"]
    # The standby replays everything and ends with the same rows.
    with primary.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_current_wal_lsn()")
        lsn = cur.fetchone()[0]
    wait_until(lambda: _replayed(standby, lsn), "the standby to replay the run")
    want = rows(primary, db)
    assert len(want) > 0 and rows(standby, db) == want


def _has_db(standby: Cluster, db: str) -> bool:
    with standby.connect() as s, s.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (db,))
        return cur.fetchone()[0] == 1


def _replayed(standby: Cluster, lsn: str) -> bool:
    with standby.connect() as s, s.cursor() as cur:
        cur.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,))
        return cur.fetchone()[0]


def test_a_slot_that_does_not_advance_throttles_the_run(pair):
    """With replica_slot the lag is that slot's unconfirmed WAL, readable by any role: a
    role without pg_monitor runs it. The slot is made before the data is loaded, so the run
    is throttled before its first batch. The test advances the slot by hand to let it go on."""
    primary, _ = pair
    with primary.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_create_physical_replication_slot('cb_slot', true)")
    db = make_db(primary)
    with primary.connect(db) as conn, conn.cursor() as cur:
        cur.execute("CREATE ROLE slot_runner")
        cur.execute("GRANT SELECT ON chat TO slot_runner; GRANT SELECT, INSERT ON chat_message TO slot_runner")
    try:
        t, box = call_in_background(primary, db, "batch_size => 100, max_replica_lag => '64kB', "
                                    "replica_slot => 'cb_slot'", user="slot_runner")
        throttled = wait_until(lambda: (st := status(primary, db)) and st["state"] == "throttled" and st, "throttled")
        assert throttled["chats_done"] == 0 and throttled["lag"] > 64 * 1024, throttled
        time.sleep(1)
        assert status(primary, db)["chats_done"] == 0
        with primary.connect(db) as conn, conn.cursor() as cur:
            while t.is_alive():
                cur.execute("SELECT pg_replication_slot_advance('cb_slot', pg_current_wal_lsn())")
                time.sleep(0.1)
        t.join()
        assert "error" not in box, box
        assert status(primary, db)["state"] == "finished"
        assert rows(primary, db) == rows_of_one_shot(primary, db)
    finally:
        with primary.connect(db) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_drop_replication_slot('cb_slot')")
            cur.execute("DROP OWNED BY slot_runner; DROP ROLE slot_runner")


def rows_of_one_shot(primary: Cluster, db: str) -> list[tuple]:
    """What chat_messages() gives for the same chats: the throttled run lost nothing."""
    with primary.connect(db) as conn, conn.cursor() as cur:
        cur.execute("""SELECT m.id, m.chat_id, m.role, m.content::text, m.created_at
                       FROM chat c, chat_messages(c.id, c.user_id, c.chat, %s) m
                       WHERE c.user_id NOT LIKE 'shared-%%' ORDER BY m.id""", (chatgen.NOW,))
        return cur.fetchall()


@pytest.fixture
def stuck_slot(pair):
    """A database loaded after a physical slot was made that nothing advances: a run
    watching it is throttled before its first batch."""
    primary, _ = pair
    with primary.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_create_physical_replication_slot('cb_stuck', true)")
    try:
        yield primary, make_db(primary)
    finally:
        with primary.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_drop_replication_slot('cb_stuck')")


STUCK = "batch_size => 100, max_replica_lag => '64kB', replica_slot => 'cb_stuck'"


def test_max_runtime_ends_a_throttled_wait(stuck_slot):
    primary, db = stuck_slot
    with primary.connect(db) as conn, conn.cursor() as cur:
        cur.execute(CALL.format(extra=STUCK + ", max_runtime => '1 second'"), {"now": chatgen.NOW})
        assert any("max_runtime reached while throttled" in n for n in conn.notices), conn.notices
    st = status(primary, db)
    assert st["state"] == "stopped" and st["chats_done"] == 0, st


def test_a_throttled_call_is_cancelled_like_any_other(stuck_slot):
    primary, db = stuck_slot
    t, box = call_in_background(primary, db, STUCK)
    wait_until(lambda: (st := status(primary, db)) and st["state"] == "throttled", "throttled")
    with primary.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query LIKE 'CALL backfill%%'"
                    " AND pid <> pg_backend_pid()")
    t.join(timeout=60)
    assert not t.is_alive() and box.get("error") is not None and box["error"].pgcode == "57014", box
    assert status(primary, db)["state"] == "interrupted"


def test_a_slot_dropped_during_the_run_stops_it_with_an_error(pair):
    primary, _ = pair
    with primary.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_create_physical_replication_slot('cb_dropped', true)")
    db = make_db(primary)
    t, box = call_in_background(primary, db, "batch_size => 100, max_replica_lag => '64kB', replica_slot => 'cb_dropped'")
    wait_until(lambda: (st := status(primary, db)) and st["state"] == "throttled", "throttled")
    with primary.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_drop_replication_slot('cb_dropped')")
    t.join(timeout=60)
    assert not t.is_alive() and box.get("error") is not None, box
    assert box["error"].pgcode == "55000" and "was dropped" in box["error"].pgerror, box["error"].pgerror


def test_max_wal_rate_paces_the_run(pair):
    """The CALL's WAL divided by max_wal_rate is a lower bound of its duration (only the
    last batch's WAL may be written after the last pause)."""
    primary, _ = pair
    db = make_db(primary)
    rate_mib = 0.2
    with primary.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_current_wal_lsn()")
        start_lsn = cur.fetchone()[0]
        began = time.monotonic()
        cur.execute(CALL.format(extra=f"batch_size => 50, max_wal_rate => {rate_mib}"), {"now": chatgen.NOW})
        took = time.monotonic() - began
        cur.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)", (start_lsn,))
        wal = float(cur.fetchone()[0])
        cur.execute("SELECT state, batches FROM chat_backfill.status")
        state, batches = cur.fetchone()
    assert state == "finished" and batches > 4
    assert wal > 0.4 * 1024 * 1024, "enough WAL for the pacing to show (2 s at this rate)"
    # The server's WAL includes others' (autovacuum, checkpoints): a wide margin.
    assert took >= (wal * (batches - 1) / batches) / (rate_mib * 1024 * 1024) * 0.5, (took, wal, batches)


@pytest.mark.parametrize("extra, sqlstate, words", [
    ("max_replica_lag => 'lots'", "22023", "invalid size"),
    ("max_replica_lag => '-1MB'", "22023", "zero or more"),
    ("replica_slot => 'cb_slot'", "22023", "without max_replica_lag"),
    ("max_replica_lag => '1MB', replica_slot => 'no_such_slot'", "42704", "does not exist"),
    ("max_wal_rate => 0", "22023", "at least"),
    ("max_wal_rate => 1e-30", "22023", "at least"),
])
def test_bad_throttle_arguments_are_refused_before_anything_runs(pair, extra, sqlstate, words):
    primary, _ = pair
    db = make_db(primary)
    with primary.connect(db) as conn, conn.cursor() as cur:
        with pytest.raises(psycopg2.Error) as e:
            cur.execute(CALL.format(extra=extra), {"now": chatgen.NOW})
        assert e.value.pgcode == sqlstate and words in e.value.pgerror, e.value.pgerror
        cur.execute("SELECT count(*) FROM chat_backfill.runs")
        assert cur.fetchone()[0] == 0


def test_a_role_that_cannot_see_the_standbys_is_told_to_grant_pg_monitor(pair):
    primary, _ = pair
    db = make_db(primary)
    with primary.connect(db) as conn, conn.cursor() as cur:
        cur.execute("CREATE ROLE blind_runner")
        cur.execute("GRANT SELECT ON chat TO blind_runner; GRANT SELECT, INSERT ON chat_message TO blind_runner")
        try:
            cur.execute('SET ROLE blind_runner')
            with pytest.raises(psycopg2.Error) as e:
                cur.execute(CALL.format(extra="max_replica_lag => '1MB'"), {"now": chatgen.NOW})
            assert e.value.pgcode == "42501" and "pg_monitor" in e.value.diag.message_hint, e.value.pgerror
            cur.execute("RESET ROLE")
            cur.execute("GRANT pg_monitor TO blind_runner")
            cur.execute('SET ROLE blind_runner')
            cur.execute(CALL.format(extra="max_replica_lag => '1GB'"), {"now": chatgen.NOW})
            cur.execute("SELECT state FROM chat_backfill.status")
            assert cur.fetchone() == ("finished",)
        finally:
            cur.execute("RESET ROLE")
            cur.execute("DROP OWNED BY blind_runner; DROP ROLE blind_runner")


def test_on_a_hot_standby_reads_work_and_writes_are_refused_with_25006(pair):
    """verify(), chat_messages(), chat_message_problems(), the status view and dry_run work on
    the standby (read-only, no transaction id); plan() and the writing forms refuse with
    25006 and a hint. On 0.6.0 every entry point but the pure functions failed with XX000
    "cannot assign TransactionIds during recovery" (pgrx's Spi::get_one assigns one)."""
    primary, standby = pair
    db = make_db(primary)
    with primary.connect(db) as conn, conn.cursor() as cur:
        cur.execute(CALL.format(extra="batch_size => 100"), {"now": chatgen.NOW})
        cur.execute("SELECT pg_current_wal_lsn()")
        [(lsn,)] = cur.fetchall()
        cur.execute("SELECT count(*) FROM chat_message")
        [(rows,)] = cur.fetchall()
    wait_until(lambda: _replayed(standby, lsn), "the standby to replay the backfill")
    with standby.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM chat_backfill.verify()")
        assert cur.fetchone() == (0,)
        cur.execute("SELECT count(*) FROM chat_messages('c', 'u', '{\"history\":{\"messages\":{\"a\":{\"role\":\"user\"}}}}')")
        assert cur.fetchone() == (1,)
        cur.execute("SELECT count(*) FROM chat_message_problems('c', '{\"history\":{\"messages\":{\"a\":{\"role\":{}}}}}')")
        assert cur.fetchone() == (1,)
        cur.execute("SELECT state, chats_done = total_chats FROM chat_backfill.status")
        assert cur.fetchall() == [("finished", True)]
        cur.execute("SELECT sum(messages_inserted) FROM backfill_chat_messages(now => %s, dry_run => true)", (chatgen.NOW,))
        assert cur.fetchone() == (rows,)
        for sql in ("SELECT * FROM backfill_chat_messages()", "CALL backfill_chat_messages_resumable()",
                    "SELECT * FROM chat_backfill.plan()"):
            with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction) as e:
                cur.execute(sql)
            assert "standby" in e.value.diag.message_primary and e.value.diag.message_hint, sql

