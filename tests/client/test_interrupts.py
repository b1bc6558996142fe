"""Query cancel and statement_timeout must stop a backfill, never be recorded as a bad row,
and leave the session usable (the batch's subtransaction is rolled back first)."""

from __future__ import annotations

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


def assert_clean_after(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT 1")  # the session is usable
        cur.execute("SELECT count(*) FROM chat_message")
        assert cur.fetchone() == (0,)
        cur.execute("SELECT count(*) FROM chat_backfill.rejected_messages")
        assert cur.fetchone() == (0,)


def test_statement_timeout_stops_the_run(cluster):
    db = prepare(cluster)
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SET statement_timeout = '500ms'")
        started = time.monotonic()
        with pytest.raises(psycopg2.errors.QueryCanceled):
            cur.execute("SELECT * FROM backfill_chat_messages(batch_size => 500)")
        assert time.monotonic() - started < 30
        cur.execute("RESET statement_timeout")
        assert_clean_after(conn)


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
        assert_clean_after(conn)
