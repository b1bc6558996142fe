"""verify() on a chat longer than the slice it checks at a time (2000 messages): the findings
are exactly those of the edits made, in that chat and in the chats around it, while memory
follows the slice, not the chat (bench/memory.py measures it). Both modes: the migration's
rows and the app's (rows => 'app', where a chat the app fails on has no rows at all)."""

from __future__ import annotations

import json

import pytest

import chatgen
from conftest import CHAT_DDL

NOW = chatgen.NOW


def doc(n: int, tag: str) -> str:
    """A linear conversation of n messages."""
    messages = {}
    for i in range(n):
        key = f"{tag}{i:05d}"
        messages[key] = {"id": key, "parentId": f"{tag}{i - 1:05d}" if i else None,
                         "role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} of {tag}",
                         "timestamp": 1_700_000_000 + i}
    return json.dumps({"history": {"messages": messages, "currentId": f"{tag}{n - 1:05d}"}})


def load(cluster, db: str, chats: list, rows: str) -> None:
    from load_sample import TARGET_DDL, copy_chats
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(CHAT_DDL)
        copy_chats(conn, chats)
        cur.execute(TARGET_DDL)
        if rows == "app":  # the head's columns, which the app writes
            cur.execute("ALTER TABLE chat_message ADD COLUMN meta json, ADD COLUMN context_summary text")


@pytest.mark.parametrize("rows", ["migration", "app"])
def test_a_long_chat_is_checked_in_slices_and_its_neighbours_too(cluster, rows):
    db = cluster.create_db("verify_long")
    chats = [chatgen.Chat("a-small", "u1", doc(10, "a")), chatgen.Chat("b-long", "u1", doc(5000, "b")),
             chatgen.Chat("c-small", "u2", doc(10, "c"))]
    load(cluster, db, chats, rows)
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT sum(messages_inserted) FROM backfill_chat_messages(now => %s, rows => %s)", (NOW, rows))
        assert cur.fetchone() == (5020,)
        cur.execute("SELECT count(*) FROM chat_backfill.verify(rows => %s)", (rows,))
        assert cur.fetchone() == (0,), "nothing to report before the edits"
        # a: one row gone. b: three rows gone (in the first, a middle and the last slice),
        # two rows changed (different slices), two rows the document does not hold.
        # c (read after the long chat): one row changed.
        cur.execute("DELETE FROM chat_message WHERE id IN ('a-small-a00003', 'b-long-b00010', 'b-long-b02500', "
                    "'b-long-b04999')")
        cur.execute("UPDATE chat_message SET content = '\"edited\"' WHERE id IN ('b-long-b00001', 'b-long-b03000')")
        cur.execute("UPDATE chat_message SET role = 'tampered' WHERE id = 'c-small-c00004'")
        cur.execute("INSERT INTO chat_message (id, chat_id, user_id, role, created_at, updated_at) "
                    "VALUES ('b-long-ghost1', 'b-long', 'u1', 'user', 1, 1), ('b-long-ghost2', 'b-long', 'u1', 'user', 1, 1)")
        conn.notices.clear()
        cur.execute("SELECT chat_id, kind, message_key, columns FROM chat_backfill.verify(rows => %s)", (rows,))
        found = sorted(cur.fetchall(), key=lambda r: (r[0], r[1], r[2] or ""))
        summary = [n for n in conn.notices if "chats checked" in n]
    assert found == [
        ("a-small", "missing", "a00003", None),
        ("a-small", "partial_chat", None, None),
        ("b-long", "different", "b00001", ["content"]),
        ("b-long", "different", "b03000", ["content"]),
        ("b-long", "extra", "ghost1", None),
        ("b-long", "extra", "ghost2", None),
        ("b-long", "missing", "b00010", None),
        ("b-long", "missing", "b02500", None),
        ("b-long", "missing", "b04999", None),
        ("b-long", "partial_chat", None, None),
        ("c-small", "different", "c00004", ["role"]),
    ]
    assert summary and "3 chats checked" in summary[0] and "5020 rows expected: 4 missing, 3 different, 2 extra, " \
        "2 partial chats" in summary[0], summary


def test_a_long_chat_the_app_fails_on_expects_no_rows(cluster):
    """One message of 5000 the app cannot write (a string as usage): the app writes none of
    the chat, so the backfill writes none, and verify() expects none: a row there is extra."""
    db = cluster.create_db("verify_long_app")
    bad = json.loads(doc(5000, "b"))
    bad["history"]["messages"]["b04000"]["usage"] = "lots"
    chats = [chatgen.Chat("a-small", "u1", doc(10, "a")), chatgen.Chat("b-long", "u1", json.dumps(bad)),
             chatgen.Chat("c-small", "u2", doc(10, "c"))]
    load(cluster, db, chats, "app")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT sum(messages_inserted), sum(messages_rejected), sum(messages_skipped) "
                    "FROM backfill_chat_messages(now => %s, rows => 'app')", (NOW,))
        assert cur.fetchone() == (20, 1, 4999)
        cur.execute("SELECT chat_id, message_key FROM chat_backfill.rejected_messages")
        assert cur.fetchall() == [("b-long", "b04000")]
        cur.execute("SELECT count(*) FROM chat_backfill.verify(rows => 'app')")
        assert cur.fetchone() == (0,)
        cur.execute("INSERT INTO chat_message (id, chat_id, user_id, role, created_at, updated_at) "
                    "VALUES ('b-long-b00001', 'b-long', 'u1', 'user', 1, 1)")
        cur.execute("SELECT chat_id, kind, message_key FROM chat_backfill.verify(rows => 'app')")
        assert cur.fetchall() == [("b-long", "extra", "b00001")]


def test_verify_takes_the_backfills_filter_and_column_names(cluster):
    """A source with its own column names, backfilled with a filter of its own: verify() with
    the same arguments finds nothing; with no filter (which keeps the chat the backfill left
    out) it finds that chat's rows missing. 0.6.0's verify() hard-coded both, so it
    could not check such a backfill at all."""
    db = cluster.create_db("verify_args")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE convo (cid text PRIMARY KEY, owner text, body json)")
        cur.execute("INSERT INTO convo VALUES ('k1', 'u1', %s), ('k2', 'u2', %s), ('k3', 'u1', %s)",
                    (doc(3, "a"), doc(4, "b"), doc(2, "c")))
        from load_sample import TARGET_DDL
        cur.execute(TARGET_DDL.replace("REFERENCES chat(id)", "REFERENCES convo(cid)"))
        args = "source_filter => $$owner = 'u1'$$, id_column => 'cid', user_id_column => 'owner', chat_column => 'body'"
        cur.execute(f"SELECT sum(messages_inserted) FROM backfill_chat_messages('convo', 'chat_message', now => %s, {args})",
                    (NOW,))
        assert cur.fetchone() == (5,)
        cur.execute(f"SELECT count(*) FROM chat_backfill.verify('convo', 'chat_message', 'migration', {args})")
        assert cur.fetchone() == (0,)
        cur.execute("SELECT chat_id, kind, count(*) FROM chat_backfill.verify('convo', 'chat_message', "
                    "source_filter => NULL, id_column => 'cid', user_id_column => 'owner', chat_column => 'body') "
                    "GROUP BY 1, 2 ORDER BY 1, 2")
        assert cur.fetchall() == [("k2", "missing", 4)]
