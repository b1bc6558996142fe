"""Query cancel and statement_timeout must stop a backfill, never be recorded as a bad row,
and leave the session usable (the batch's subtransaction is rolled back first).

The one-shot form: had the interrupt been taken for a bad row, the run would have gone on
and returned normally, so `pytest.raises(QueryCanceled)` is the check; what it wrote is
rolled back with the statement. The committing form keeps its committed batches, so there
the absence of recorded rejections, the checkpoint and the resume can be checked."""

from __future__ import annotations

import re
import threading
import time

import psycopg2
import pytest

CHAT = '{"history":{"messages":{"a":{"role":"user"},"b":{"role":"assistant"}}}}'


def prepare(cluster) -> str:
    db = cluster.create_db("interrupt")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE chat (id text PRIMARY KEY, user_id text, chat json)")
        cur.execute("INSERT INTO chat SELECT 'c' || i, 'u', %s FROM generate_series(1, 3000) i", (CHAT,))
        cur.execute(
            "CREATE TABLE chat_message (id text PRIMARY KEY, chat_id text, user_id text, role text, parent_id text,"
            " content json, output json, model_id text, files json, sources json, embeds json, done boolean,"
            " status_history json, error json, usage json, created_at bigint, updated_at bigint)"
        )
        # Slow enough that the interrupt lands inside a batch's INSERT.
        cur.execute("CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS"
                    " $$ BEGIN PERFORM pg_sleep(0.002); RETURN NEW; END $$")
        cur.execute("CREATE TRIGGER slow BEFORE INSERT ON chat_message FOR EACH ROW EXECUTE FUNCTION slow()")
    return db


def assert_session_usable(conn):
    """The interrupted statement rolled back everything it wrote (so counting rows would
    prove nothing); what can go wrong is the session itself: a subtransaction left open,
    COPY's feed left behind. A full backfill in the same session must work."""
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
        cur.execute("DROP TRIGGER slow ON chat_message")
        cur.execute("SELECT sum(messages_inserted), sum(messages_rejected) FROM backfill_chat_messages(batch_size => 500)")
        assert cur.fetchone() == (6000, 0)


def test_statement_timeout_stops_the_run(cluster):
    db = prepare(cluster)
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SET statement_timeout = '500ms'")
        started = time.monotonic()
        with pytest.raises(psycopg2.errors.QueryCanceled):
            cur.execute("SELECT * FROM backfill_chat_messages(batch_size => 500)")
        assert time.monotonic() - started < 30
        cur.execute("RESET statement_timeout")
        assert_session_usable(conn)


def test_pg_cancel_backend_stops_the_run(cluster):
    db = prepare(cluster)
    with cluster.connect(db) as conn, cluster.connect(db) as admin:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            (pid,) = cur.fetchone()

        def cancel():
            time.sleep(0.7)
            with admin.cursor() as a:
                a.execute("SELECT pg_cancel_backend(%s)", (pid,))

        threading.Thread(target=cancel).start()
        with pytest.raises(psycopg2.errors.QueryCanceled), conn.cursor() as cur:
            cur.execute("SELECT * FROM backfill_chat_messages(batch_size => 500)")
        assert_session_usable(conn)


def test_cancel_stops_the_committing_form_between_checkpoints(cluster):
    """CALL with committed batches behind it: pg_cancel_backend ends the CALL with 57014;
    the batch in progress is rolled back with its checkpoint, no row is recorded as
    rejected, and the next CALL resumes from the checkpoint and finishes exactly."""
    db = prepare(cluster)
    with cluster.connect(db) as conn, cluster.connect(db) as admin:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            (pid,) = cur.fetchone()

        def cancel():
            # After at least one committed batch (500 rows at about 2 ms each).
            deadline = time.monotonic() + 30
            with admin.cursor() as a:
                while time.monotonic() < deadline:
                    a.execute("SELECT coalesce(max(chats_done), 0) FROM chat_backfill.status")
                    if a.fetchone()[0] > 0:
                        break
                    time.sleep(0.05)
                a.execute("SELECT pg_cancel_backend(%s)", (pid,))

        canceller = threading.Thread(target=cancel)
        canceller.start()
        with pytest.raises(psycopg2.errors.QueryCanceled), conn.cursor() as cur:
            cur.execute("CALL backfill_chat_messages_resumable(batch_size => 500)")
        canceller.join()
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM chat_backfill.rejected_messages")
            assert cur.fetchone() == (0,), "the cancel was recorded against rows"
            cur.execute("SELECT state, chats_done, messages_inserted, last_key FROM chat_backfill.status")
            state, chats_done, inserted, last_key = cur.fetchone()
            assert state not in ("finished", "running") and 0 < chats_done < 3000, state
            cur.execute("SELECT count(*) FROM chat_message")
            assert cur.fetchone() == (inserted,), "committed rows and checkpoint agree"
            assert inserted == 2 * chats_done
            cur.execute("DROP TRIGGER slow ON chat_message")
            cur.execute("CALL backfill_chat_messages_resumable(batch_size => 500)")
            resumed = [m.groups() for n in conn.notices
                       for m in [re.search(r"resuming run (\d+) after key (\S+)\s*$", n)] if m]
            assert [k for _, k in resumed] == [last_key], conn.notices
            cur.execute("SELECT state, chats_done, messages_inserted, messages_existing FROM chat_backfill.status")
            assert cur.fetchone() == ("finished", 3000, 6000, 0)
            cur.execute("SELECT count(*) FROM chat_message")
            assert cur.fetchone() == (6000,)
