"""Issue 26: a chat stored in a TOAST table is read a slice at a time and its messages are
expanded as the text streams (`chat_backfill.stream_chats_over`, 64 MB by default; 0 here,
so that every chat the table moved out of its rows streams). The rows must be the rows
the same chats give read whole, byte for byte, in every stored form (uncompressed,
pglz, lz4), in the one-transaction form and in the committing one, whose batches end
inside chats and COMMIT between them while a chat's stream is open."""

from __future__ import annotations

import collections
import json
import threading
import time

import pytest

import chatgen
from conftest import CHAT_DDL
from load_sample import TARGET_DDL

NOW = chatgen.NOW


def chats():
    """The generator's chats, the hostile ones, and chats the stream hands back to the
    whole read: a repeated message key, a chat stored as a JSON string holding one."""
    repeated = '{"history": {"messages": {"a": {"role": "user", "content": "%s"}, "b": {"role": "user"}, ' \
               '"a": {"role": "assistant", "content": "again"}}}}' % ("x" * 3000)
    doc = {"history": {"messages": {f"m{i}": {"role": "user", "content": "y" * 400} for i in range(20)}}}
    return (chatgen.realistic_chats(seed=41, count=150) + chatgen.hostile_chats()
            + [chatgen.Chat("repeated", "u", repeated), chatgen.Chat("encoded", "u", json.dumps(json.dumps(doc)))])


def toasted_chats(cur) -> int:
    """How many values the chat table's TOAST table holds."""
    cur.execute("SELECT reltoastrelid::regclass FROM pg_class WHERE oid = 'chat'::regclass")
    (toast,) = cur.fetchone()
    cur.execute(f"SELECT count(DISTINCT chunk_id) FROM {toast}")
    return cur.fetchone()[0]


def three_runs(conn, cur, rows):
    """The same chats backfilled with `rows`: streamed in one transaction (into
    chat_message), streamed in the committing form in batches of 7 messages, which end inside
    chats and COMMIT with a chat's stream open (into chat_message_committed), and held (into
    chat_message_held). Gives the streamed and the held totals (inserted, rejected) and the
    DEBUG lines of the chats that streamed."""
    for copy in ("held", "committed"):
        cur.execute(f"CREATE TABLE chat_message_{copy} (LIKE chat_message INCLUDING ALL)")
    cur.execute("SET chat_backfill.stream_chats_over = 0; SET client_min_messages = debug1")
    conn.notices = collections.deque()
    cur.execute("SELECT sum(messages_inserted), sum(messages_rejected) "
                "FROM backfill_chat_messages(now => %s, rows => %s, force => true)", (NOW, rows))
    streamed = cur.fetchone()
    said = [n for n in conn.notices if "streams from its TOAST table" in n]
    cur.execute("RESET client_min_messages")
    cur.execute("CALL backfill_chat_messages_resumable(target => 'chat_message_committed', now => %s, "
                "rows => %s, batch_size => 7)", (NOW, rows))
    cur.execute("RESET chat_backfill.stream_chats_over")
    cur.execute("SELECT sum(messages_inserted), sum(messages_rejected) FROM backfill_chat_messages("
                "target => 'chat_message_held', now => %s, rows => %s, force => true)", (NOW, rows))
    return streamed, cur.fetchone(), said


def same_rows_as_held(cur, count):
    """Asserts that chat_message (streamed, one transaction) and its committed copy hold
    exactly the rows of chat_message_held, `count` of them; gives the rejections recorded
    for each target: (target, how many, how many distinct)."""
    for other in ("chat_message_held", "chat_message_committed"):
        cur.execute(f"SELECT (SELECT count(*) FROM {other}), "
                    "(SELECT count(*) FROM (SELECT m::text FROM chat_message m EXCEPT ALL "
                    f"                       SELECT t::text FROM {other} t) d), "
                    f"(SELECT count(*) FROM (SELECT t::text FROM {other} t EXCEPT ALL "
                    "                       SELECT m::text FROM chat_message m) d)")
        assert cur.fetchone() == (count, 0, 0), other
    cur.execute("SELECT target, count(*), count(DISTINCT (chat_id, message_key, sqlstate, error)) "
                "FROM chat_backfill.rejected_messages GROUP BY target ORDER BY target")
    return cur.fetchall()


@pytest.mark.parametrize("stored", ["external", "pglz", "lz4"])
def test_streamed_chats_give_the_rows_held_ones_do(cluster, stored):
    db = cluster.create_db(f"stream_{stored}")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(CHAT_DDL)
        # Values move out of the row from 128 bytes on, compressed or not.
        cur.execute("ALTER TABLE chat SET (toast_tuple_target = 128)")
        cur.execute("ALTER TABLE chat ALTER COLUMN chat SET STORAGE EXTERNAL" if stored == "external"
                    else f"ALTER TABLE chat ALTER COLUMN chat SET COMPRESSION {stored}")
        cur.executemany("INSERT INTO chat (id, user_id, title, chat) VALUES (%s, %s, 't', %s::json)",
                        [(c.id, c.user_id, c.chat) for c in chats()])
        assert toasted_chats(cur) > 100, "too few chats in the TOAST table: this test could not fail"
        cur.execute(TARGET_DDL)
        streamed, held, said = three_runs(conn, cur, "migration")
        assert len(said) > 100 and not any("repeated " in n or "encoded " in n for n in said), len(said)
        assert streamed == held and held[0] > 1000, (streamed, held)
        rejected = same_rows_as_held(cur, held[0])
        assert len({r[1:] for r in rejected}) == 1 and rejected[0][1] > 0, rejected


@pytest.mark.parametrize("change", ["delete", "update", "rewrite"])
def test_a_streamed_chat_changed_between_batches(cluster, change):
    """The committing form goes on with a streamed chat after each COMMIT, reading its TOAST
    value again; changed in between (here during the CALL's pause, which holds no snapshot),
    the value is gone. The chat is read again: deleted, it counts as vanished (a NOTICE says
    so) and the run goes on; updated (the app rewrites a chat's JSON on every message), or
    its table rewritten, it is expanded again from its start and every message is written
    (the twentieth review's high and medium: the update lost the rest of the chat, counted as
    deleted; the rewrite stopped the CALL with XX000: "could not open relation")."""
    db = cluster.create_db(f"stream_{change}")
    doc = json.dumps({"history": {"messages": {f"m{i:04d}": {"role": "user", "content": f"{i} " + "z" * 2000}
                                               for i in range(2000)}}})
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(CHAT_DDL)
        cur.execute("ALTER TABLE chat ALTER COLUMN chat SET STORAGE EXTERNAL")
        cur.execute("INSERT INTO chat VALUES ('a-big', 'u', 't', %s), ('b-after', 'u', 't', "
                    "'{\"history\": {\"messages\": {\"x\": {\"role\": \"user\"}}}}')", (doc,))
        cur.execute(TARGET_DDL)
        cur.execute("ALTER DATABASE %s SET chat_backfill.stream_chats_over = 0" % db)
    notices = []

    def run():
        with cluster.connect(db) as conn, conn.cursor() as cur:
            # A slice is a megabyte (about 500 of these messages): the second batch reads on.
            cur.execute("CALL backfill_chat_messages_resumable(now => %s, batch_size => 300, "
                        "pause => '1 second')", (NOW,))
            notices.extend(conn.notices)

    caller = threading.Thread(target=run)
    caller.start()
    with cluster.connect(db) as conn, conn.cursor() as cur:
        deadline = time.monotonic() + 30
        while True:
            cur.execute("SELECT count(*) FROM chat_message")
            if cur.fetchone()[0] > 0:
                break
            assert time.monotonic() < deadline
            time.sleep(0.02)
        cur.execute({"delete": "DELETE FROM chat WHERE id = 'a-big'",
                     "update": "UPDATE chat SET chat = (chat::jsonb || '{\"title\": \"renamed\"}')::json "
                               "WHERE id = 'a-big'",
                     "rewrite": "ALTER TABLE chat ALTER COLUMN chat TYPE text"}[change])
        cur.execute("VACUUM chat")
    caller.join()
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT state, chats_vanished FROM chat_backfill.status")
        state = cur.fetchone()
        cur.execute("SELECT chat_id, count(*) FROM chat_message GROUP BY chat_id ORDER BY chat_id")
        rows = cur.fetchall()
    deleted = any("was deleted while it was being expanded" in n for n in notices)
    if change == "delete":
        assert (state, rows, deleted) == (("finished", 1), [("b-after", 1)], True), (state, rows, notices)
    elif change == "rewrite":
        # A table rewrite is not MVCC-safe: a transaction whose snapshot is older than the
        # ALTER sees the new table empty, and the CALL's next batch may be one (the chat then
        # reads as deleted, and so may the next ones, on either path). What is pinned: the
        # run finishes, no internal error.
        assert state[0] == "finished", (state, rows, notices)
    else:
        assert (state, rows, deleted) == (("finished", 0), [("a-big", 2000), ("b-after", 1)], False), \
            (state, rows, notices)


def test_streamed_chats_give_the_app_rows_held_ones_do(cluster):
    """rows => 'app' streams too: the app's load checks (its codec's shape of the document,
    the sanitized index, the currentId repair) run as the text streams, then each pass of
    the all-or-nothing write reads the stream again. The rows and the recorded rejections
    must be those of the same chats held, on test_app_rows' corpus (checked there against
    Open WebUI's own code), in both forms; in the committing one a streamed chat opened
    before a COMMIT is written after it."""
    from test_app_rows import all_chats
    db = cluster.create_db("stream_app")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(CHAT_DDL)
        # Uncompressed, and every case padded with JSON whitespace past the 2 kB at which a
        # row's values move out (before or after the document: the streamed offsets count
        # from the text's first byte, the held ones from the trimmed document's).
        cur.execute("ALTER TABLE chat ALTER COLUMN chat SET STORAGE EXTERNAL")
        pad = lambda n, chat: chat if chat is None else (" \n" * (20000 if n % 7 == 0 else 1100) + chat if n % 2 else chat + "\r\n\t" * 800)  # noqa: E731
        cur.executemany("INSERT INTO chat (id, user_id, title, chat) VALUES (%s, %s, 't', %s::json)",
                        [(i, u, pad(n, c)) for n, (i, u, c) in enumerate(all_chats())])
        assert toasted_chats(cur) > 200, "too few chats in the TOAST table: this test could not fail"
        cur.execute(TARGET_DDL)
        cur.execute("ALTER TABLE chat_message ADD COLUMN meta json, ADD COLUMN context_summary text")
        streamed, held, said = three_runs(conn, cur, "app")
        assert len(said) > 150, len(said)
        assert streamed == held and held[0] > 300 and held[1] > 0, (streamed, held)
        rejected = same_rows_as_held(cur, held[0])
        assert len(rejected) == 3 and len({r[1:] for r in rejected}) == 1, rejected


@pytest.mark.parametrize("change", ["delete", "update"])
def test_a_streamed_app_chat_changed_before_it_is_written(cluster, change):
    """App rows write a chat bigger than a batch in a batch of its own, after the COMMIT of
    the batch that opened it. Changed before that COMMIT (here while a trigger holds the
    first batch's write), then vacuumed during the pause, the value it was opened with is
    gone: the chat is read again in the writing batch's snapshot, which keeps the value it
    sees until the rows are in. Deleted, it counts as vanished; updated, its new text is
    written whole."""
    db = cluster.create_db(f"stream_app_{change}")
    doc = {"history": {"messages": {f"m{i:04d}": {"id": f"m{i:04d}", "role": "user", "content": f"{i} " + "z" * 2000}
                                    for i in range(600)}, "currentId": "m0599"}}
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(CHAT_DDL)
        cur.execute("ALTER TABLE chat ALTER COLUMN chat SET STORAGE EXTERNAL")
        cur.execute("INSERT INTO chat VALUES ('a-small', 'u', 't', "
                    "'{\"history\": {\"messages\": {\"x\": {\"role\": \"user\"}}}}'), ('b-big', 'u', 't', %s)",
                    (json.dumps(doc),))
        cur.execute(TARGET_DDL)
        cur.execute("ALTER TABLE chat_message ADD COLUMN meta json, ADD COLUMN context_summary text")
        cur.execute("CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                    "IF NEW.chat_id = 'a-small' THEN PERFORM pg_sleep(1); END IF; RETURN NEW; END $$")
        cur.execute("CREATE TRIGGER slow BEFORE INSERT ON chat_message FOR EACH ROW EXECUTE FUNCTION slow()")
        cur.execute("ALTER DATABASE %s SET chat_backfill.stream_chats_over = 0" % db)
    notices = []

    def run():
        with cluster.connect(db) as conn, conn.cursor() as cur:
            cur.execute("SET client_min_messages = debug1")
            cur.execute("CALL backfill_chat_messages_resumable(now => %s, rows => 'app', batch_size => 300, "
                        "pause => '2 seconds')", (NOW,))
            notices.extend(conn.notices)

    def wait_for(cur, sql):
        deadline = time.monotonic() + 30
        while True:
            cur.execute(sql)
            if cur.fetchone()[0]:
                return
            assert time.monotonic() < deadline, sql
            time.sleep(0.02)

    caller = threading.Thread(target=run)
    caller.start()
    with cluster.connect(db) as conn, conn.cursor() as cur:
        # The first batch has opened the big chat (carried: it is a batch of its own) and
        # is writing the small one's row.
        wait_for(cur, "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'")
        doc["history"]["messages"]["m0600"] = {"id": "m0600", "role": "user", "content": "added"}
        cur.execute({"delete": "DELETE FROM chat WHERE id = 'b-big'",
                     "update": "UPDATE chat SET chat = %s WHERE id = 'b-big'"}[change], (json.dumps(doc),))
        wait_for(cur, "SELECT count(*) FROM chat_message")
        cur.execute("VACUUM chat")
    caller.join()
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT state, chats_vanished FROM chat_backfill.status")
        state = cur.fetchone()
        cur.execute("SELECT chat_id, count(*) FROM chat_message GROUP BY chat_id ORDER BY chat_id")
        rows = cur.fetchall()
    said = [n for n in notices if "read again before it is written" in n]
    if change == "delete":
        assert (state, rows, said) == (("finished", 1), [("a-small", 1)], []), (state, rows, notices)
    else:
        assert (state, rows, [n.split(": ")[-1].strip() for n in said]) == \
            (("finished", 0), [("a-small", 1), ("b-big", 601)], ["changed"]), (state, rows, notices)


def test_verify_streams_and_finds_what_it_finds_held(cluster):
    """verify() takes a chat over stream_chats_over as a long chat whose text streams: the
    app's check and failures read off the stream first, then slices of at most 2000
    messages or 8 MB of text. Its findings (missing, different, extra, partial) must be
    those of the same chats held, in both row modes, on test_app_rows' corpus plus a 10 MB
    chat of 2500 messages and a chat the app fails on, against a target with rows removed,
    changed and added."""
    from test_app_rows import all_chats
    db = cluster.create_db("stream_verify")
    big = {"history": {"messages": {f"m{i:04d}": {"id": f"m{i:04d}", "role": "user", "content": f"{i} " + "v" * 4000}
                                    for i in range(2500)}, "currentId": "m2499"}}
    bad = {"history": {"messages": {f"b{i}": {"role": "user", "content": "x", "timestamp": "t" if i == 7 else i}
                                    for i in range(10)}}}
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(CHAT_DDL)
        cur.execute("ALTER TABLE chat ALTER COLUMN chat SET STORAGE EXTERNAL")
        rows = all_chats() + [("zz-big", "u", json.dumps(big)), ("zz-bad", "u", json.dumps(bad))]
        cur.executemany("INSERT INTO chat (id, user_id, title, chat) VALUES (%s, %s, 't', %s::json)",
                        [(i, u, c if c is None else " " * 2100 + c) for i, u, c in rows])
        cur.execute(TARGET_DDL)
        cur.execute("ALTER TABLE chat_message ADD COLUMN meta json, ADD COLUMN context_summary text")
        cur.execute("SELECT count(*) FROM backfill_chat_messages(now => %s, rows => 'app', force => true)", (NOW,))
        cur.execute("DELETE FROM chat_message WHERE id IN (SELECT id FROM chat_message ORDER BY md5(id) LIMIT 40)")
        cur.execute("UPDATE chat_message SET content = '\"changed\"' "
                    "WHERE id IN (SELECT id FROM chat_message ORDER BY md5(id || 'u') LIMIT 40)")
        cur.execute("INSERT INTO chat_message (id, chat_id, user_id, role, content, created_at, updated_at) "
                    "SELECT id || '-extra', chat_id, user_id, role, content, 0, 0 FROM chat_message "
                    "WHERE id IN (SELECT id FROM chat_message ORDER BY md5(id || 'x') LIMIT 40) "
                    "UNION ALL SELECT 'zz-bad-b1', 'zz-bad', 'u', 'user', '\"x\"', 0, 0")
        findings = {}
        for stream in ("0", "64MB"):
            cur.execute(f"SET chat_backfill.stream_chats_over = '{stream}'")
            for rows_mode in ("app", "migration"):
                cur.execute("SELECT chat_id, message_key, kind, columns::text FROM chat_backfill.verify(rows => %s)",
                            (rows_mode,))
                findings[stream, rows_mode] = sorted(cur.fetchall(), key=repr)
        kinds = collections.Counter(f[2] for f in findings["0", "app"])
        assert kinds["missing"] >= 40 and kinds["different"] >= 30 and kinds["extra"] >= 41, kinds
        assert ("zz-bad", "b1", "extra", None) in findings["0", "app"]
        for rows_mode in ("app", "migration"):
            assert findings["0", rows_mode] == findings["64MB", rows_mode], rows_mode


def test_chat_messages_and_problems_stream_a_toasted_argument(cluster):
    """chat_messages() and chat_message_problems() given a column still in its TOAST table
    (json, or text) stream it: the same rows and problems as the value held, on the
    generator's and the hostile chats. (A jsonb argument is printed whole first, and a
    value not in a TOAST table is held, as before.)"""
    db = cluster.create_db("stream_args")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(CHAT_DDL)
        cur.execute("ALTER TABLE chat ADD COLUMN as_text text")
        cur.execute("ALTER TABLE chat ALTER COLUMN chat SET STORAGE EXTERNAL, ALTER COLUMN as_text SET STORAGE EXTERNAL")
        cur.executemany("INSERT INTO chat (id, user_id, title, chat, as_text) VALUES (%s, %s, 't', %s::json, %s)",
                        [(c.id, c.user_id, c.chat if c.chat is None else " " * 2100 + c.chat,
                          c.chat if c.chat is None else c.chat + " " * 2100) for c in chats()])
        queries = {
            "json": "SELECT m::text FROM chat c, chat_messages(c.id, c.user_id, c.chat, %s) m",
            "text": "SELECT m::text FROM chat c, chat_messages(c.id, c.user_id, c.as_text, %s) m",
            "problems": "SELECT c.id || ': ' || p::text FROM chat c, chat_message_problems(c.id, c.chat) p "
                        "WHERE %s IS NOT NULL",
        }
        got = {}
        for stream in ("0", "64MB"):
            cur.execute(f"SET chat_backfill.stream_chats_over = '{stream}'; SET client_min_messages = debug1")
            for name, sql in queries.items():
                conn.notices = collections.deque(maxlen=100000)
                cur.execute(sql, (NOW,))
                got[stream, name] = collections.Counter(r[0] for r in cur.fetchall())
                streamed = sum("a chat argument streams" in n for n in conn.notices)
                assert (streamed > 100) == (stream == "0"), (stream, name, streamed)
            cur.execute("RESET client_min_messages")
        for name in queries:
            assert got["0", name] == got["64MB", name], name
        assert sum(got["0", "json"].values()) > 1000 and sum(got["0", "problems"].values()) > 10
        assert got["0", "json"] == got["0", "text"]
