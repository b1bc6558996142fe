"""rows => 'app': the rows Open WebUI 0.12.4 itself writes when it opens a chat, checked
against the app's own code (app_reference.py loads it from the wheel), and verify().

- the differential test: the same head-schema database twice; on one the app's entry point
  `Chats.get_messages_map_by_chat_id` runs for every chat (time pinned), on the copy the
  backfill with rows => 'app'; the two chat_message tables must hold the same rows, column
  by column (JSON columns as values), the chats that get no rows included;
- the head-schema test: Open WebUI's real migration chain to its head, some chats opened
  by the app first, then the committing backfill in 'app' mode;
- verify() before and after, in both modes.
"""

from __future__ import annotations

import json

import psycopg2
import pytest

import app_reference
import chatgen
from conftest import CHAT_DDL

NOW = chatgen.NOW

COLUMNS = ["id", "chat_id", "user_id", "role", "parent_id", "content", "output", "model_id", "files", "sources",
           "embeds", "meta", "done", "status_history", "error", "usage", "context_summary", "created_at", "updated_at"]
JSON_COLUMNS = {"content", "output", "files", "sources", "embeds", "meta", "status_history", "error", "usage"}


def _chat(messages: dict | str) -> str:
    """A chat as the app keeps it: each message with its own id, currentId the last one."""
    if isinstance(messages, str):
        return '{"history":{"messages":%s,"currentId":null}}' % messages
    messages = {k: ({"id": k, **v} if isinstance(v, dict) else v) for k, v in messages.items()}
    return json.dumps({"history": {"messages": messages, "currentId": list(messages)[-1]}})


def app_cases() -> list[tuple[str, str]]:
    """(tag, chat JSON) for what the app's mapping differs on, one case a chat."""
    m = lambda **kw: {"role": "assistant", "content": "x", **kw}  # noqa: E731
    cases = {
        "usage openai": m(usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}),
        "usage ollama": m(usage={"prompt_eval_count": 5, "eval_count": 6, "total_duration": 1234}),
        "usage llama.cpp": m(usage={"prompt_n": 2, "cache_n": 3, "predicted_n": 4, "predicted_ms": 1.5}),
        "usage llama.cpp without cache": m(usage={"prompt_n": 2, "predicted_n": 4}),
        "usage under info": m(info={"usage": {"prompt_tokens": 1, "completion_tokens": 2}}),
        "usage under info and falsy usage": m(usage={}, info={"usage": {"eval_count": 9}}),
        "usage already normalized": m(usage={"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}),
        "usage token strings": m(usage={"input_tokens": "12", "output_tokens": "34"}),
        "usage floats": m(usage={"prompt_tokens": 2.9, "completion_tokens": 1}),
        "usage bools": m(usage={"input_tokens": True, "output_tokens": False}),
        "usage big ints": m(usage={"input_tokens": 10**30, "output_tokens": 10**29}),
        "usage only unknown keys": m(usage={"cost": 0.01}),
        "usage empty": m(usage={}),
        "usage null": m(usage=None),
        "info empty": m(info={}),
        "info without usage": m(info={"x": 1}),
        "usage a string": m(usage="lots"),
        "usage a list": m(usage=[1]),
        "info a string": m(info="x"),
        "usage string plus int": m(usage={"input_tokens": "1", "output_tokens": 2}),
        "usage token count not a number": m(usage={"input_tokens": "many"}),
        "usage falsy prompt_eval_count": m(usage={"prompt_eval_count": ""}),
        "own user_id": m(user_id="someone-else"),
        "own user_id empty": m(user_id=""),
        "own user_id a number": m(user_id=7),
        "meta": m(meta={"k": [1, 2], "s": "t"}),
        "meta null": m(meta=None),
        "contextSummary": m(contextSummary="earlier: hello"),
        "context_summary over contextSummary": m(context_summary="snake", contextSummary="camel"),
        "context_summary empty": m(context_summary="", contextSummary="camel"),
        "parent_id snake case": m(parent_id="p1"),
        "parent_id empty, parentId set": m(parent_id="", parentId="p2"),
        "model_id over model": m(model_id="mid", model="model"),
        "status_history snake case": m(status_history=[{"done": True}]),
        "statusHistory empty list": m(statusHistory=[]),
        "status_history empty, statusHistory string": m(status_history=[], statusHistory=""),
        "done missing": m(),
        "done false": m(done=False),
        "done null": m(done=None),
        "done one": m(done=1),
        "done 'true'": m(done="true"),
        "timestamp ms": m(timestamp=1700000000123),
        "timestamp zero": m(timestamp=0),
        "timestamp before 2020": m(timestamp=5),
        "timestamp integer string": m(timestamp="1700000000"),
        "timestamp padded integer string": m(timestamp=" 1700000000 "),
        "timestamp non-integer string": m(timestamp="1.5"),
        "timestamp float": m(timestamp=1700000000.5),
        "timestamp float half up": m(timestamp=1700000001.5),
        "timestamp negative": m(timestamp=-3),
        "timestamp true": m(timestamp=True),
        "parentId a list": m(parentId=["a"]),
        "parentId a number": m(parentId=12),
        "model a float": m(model=0.25),
        "role a number": {"role": 5},
        "role missing": {"content": "no role"},
        "role NUL only": {"role": "\u0000"},
        "NUL in content and keys": {"role": "user", "content": "a\u0000b", "meta": {"k\u0000": "v\u0000"}},
        "NUL in the message key": None,
    }
    out = [(tag, _chat({"m": msg})) for tag, msg in cases.items() if msg is not None]
    out.append(("NUL in the message key", _chat('{"a\\u0000b":{"role":"user"}}')))
    out.append(("NUL in history's key", '{"hist\\u0000ory":{"messages":{"m":{"role":"user"}}}}'))
    # A chat whose one bad message keeps all of it out, and its good neighbour alone.
    out.append(("one bad message of three", _chat({"a": m(), "b": m(done="yes"), "c": m(parentId="a")})))
    out.append(("three good messages", _chat({"a": m(), "b": m(parentId="a"), "c": m(parentId="b", usage={"eval_count": 1})})))
    # orjson reads a long integer as a float; with a lone surrogate anywhere the fallback
    # codec reads the chat, keeps integers exact and refuses one over 100 characters.
    out.append(("integer literal of 101 characters", _chat('{"m":{"role":"user","content":%s}}' % ("9" * 101))))
    out.append(("integer beyond 64 bits in usage", _chat('{"m":{"role":"user","usage":{"input_tokens":%s}}}' % ("9" * 30))))
    out.append(("101 characters and a lone surrogate",
                _chat('{"m":{"role":"user","content":%s,"x":"\\udc00"}}' % ("9" * 101))))
    out.append(("100 characters and a lone surrogate",
                _chat('{"m":{"role":"user","content":%s,"x":"\\udc00"}}' % ("9" * 100))))
    out.append(("float beyond double", _chat('{"m":{"role":"user","content":[1e400, 2.5]}}')))
    out.append(("float beyond double next to a wide integer",
                _chat('{"m":{"role":"user","content":[1e400, %s]}}' % ("9" * 30))))
    # With no usable currentId the app's repair compares leaf timestamps: a string fails.
    out.append(("string timestamp, no currentId", _chat('{"m":{"role":"user","timestamp":"1700000000"}}')))
    out.append(("leaf timestamps, no currentId",
                _chat('{"a":{"role":"user","timestamp":5},"b":{"role":"user","timestamp":7.5,"parentId":null}}')))
    out.append(("current message output a number",
                '{"history":{"currentId":"m","messages":{"m":{"id":"m","role":"user","output":3}}}}'))
    # Where the app's sanitizer walks the document (a NUL anywhere), half as deep.
    for depth in (400, 500):
        out.append((f"nesting {depth} with a NUL",
                    _chat('{"m":{"role":"user","content":%s,"x":"a\\u0000"}}' % ("[" * depth + "]" * depth))))
    for depth in (250, 900, 1030):
        out.append((f"nesting {depth}", _chat('{"m":{"role":"user","content":%s}}' % ("[" * depth + "]" * depth))))
    return out


def all_chats() -> list[tuple[str, str | None, str | None]]:
    """(id, user_id, chat) rows: the app's cases, the generator's realistic and hostile chats,
    and every hostile message as a chat of its own."""
    rows = [(f"app-{n:03d}", "u-app", chat) for n, (_, chat) in enumerate(app_cases())]
    for c in realistic() + chatgen.hostile_chats() + chatgen.hostile_message_chats():
        # The app's chat table holds no shared snapshots (0.12.4 keeps them elsewhere).
        if c.user_id is None or not c.user_id.startswith("shared-"):
            rows.append((c.id, c.user_id, c.chat))
    return rows


def realistic() -> list[chatgen.Chat]:
    return chatgen.realistic_chats(seed=23, count=40, content_bytes=(100, 2000), messages=(1, 8))


def message_rows(conn) -> dict[str, dict]:
    with conn.cursor() as cur:
        cols = ", ".join(f"{c}::text" if c in JSON_COLUMNS else c for c in COLUMNS)
        cur.execute(f"SELECT {cols} FROM chat_message ORDER BY id")
        return {r[0]: dict(zip(COLUMNS, r)) for r in cur.fetchall()}


def differences(want: dict[str, dict], got: dict[str, dict]) -> list[str]:
    out = []
    for id_ in sorted(set(want) | set(got)):
        if id_ not in got:
            out.append(f"{id_!r}: missing")
            continue
        if id_ not in want:
            out.append(f"{id_!r}: extra")
            continue
        for c in COLUMNS:
            a, b = want[id_][c], got[id_][c]
            if c in JSON_COLUMNS and a is not None and b is not None:
                a, b = json.loads(a), json.loads(b)
            if a != b:
                out.append(f"{id_!r}.{c}: app {want[id_][c]!r}, ours {got[id_][c]!r}")
    return out


@pytest.fixture(scope="module")
def head_db(cluster):
    """A database at Open WebUI 0.12.4's head with every test chat loaded, no rows yet."""
    db = cluster.create_db("apphead", extension=False)
    app_reference.build_head_schema(cluster.url(db))
    with cluster.connect(db) as conn:
        app_reference.insert_chats(conn, all_chats())
    return db


def copy_of(cluster, db: str, prefix: str) -> str:
    name = cluster.create_db(prefix, extension=False)
    with cluster.connect() as c, c.cursor() as cur:
        cur.execute(f'DROP DATABASE "{name}"')
        cur.execute(f'CREATE DATABASE "{name}" TEMPLATE "{db}"')
    with cluster.connect(name) as c, c.cursor() as cur:
        cur.execute("CREATE EXTENSION chat_backfill")
    return name


def test_app_rows_equal_what_open_webui_writes(cluster, head_db):
    ids = [r[0] for r in all_chats()]
    theirs = copy_of(cluster, head_db, "app_theirs")
    ours = copy_of(cluster, head_db, "app_ours")
    app_reference.app_messages_maps(cluster.url(theirs), ids, NOW)
    with cluster.connect(ours) as conn, conn.cursor() as cur:
        cur.execute("SELECT sum(messages_inserted), sum(messages_rejected) FROM backfill_chat_messages(now => %s, "
                    "source_filter => NULL, rows => 'app')", (NOW,))
        inserted, rejected = cur.fetchone()
    with cluster.connect(theirs) as a, cluster.connect(ours) as b:
        want, got = message_rows(a), message_rows(b)
    diff = differences(want, got)
    assert not diff, f"{len(diff)} differences, first ones:\n" + "\n".join(diff[:40])
    # The rows the app wrote itself verify clean too (JSON nested deeper than a parser's
    # limit compared without its spacing: the app's fallback writer adds spaces).
    with cluster.connect(theirs) as conn, conn.cursor() as cur:
        cur.execute("SELECT chat_id, message_key, kind, columns FROM chat_backfill.verify(rows => 'app')")
        assert cur.fetchall() == []
    assert inserted == len(got) and rejected > 0
    # Every chat the app leaves without rows is one we leave without rows, and says why
    # unless it is simply empty.
    with cluster.connect(ours) as conn, conn.cursor() as cur:
        cur.execute("SELECT DISTINCT chat_id FROM chat_backfill.rejected_messages")
        recorded = {r[0] for r in cur.fetchall()}
    with_rows = {r["chat_id"] for r in want.values()}
    # Not vacuous: hundreds of rows compared, and many chats the app leaves without rows.
    assert len(want) > 250 and len(with_rows) > 100 and len(set(ids) - with_rows) > 50
    assert not (recorded & with_rows), "a chat with rows has a rejection"
    tags = dict((f"app-{n:03d}", tag) for n, (tag, _) in enumerate(app_cases()))
    for chat_id, tag in tags.items():
        if tag in ("usage a string", "usage a list", "info a string", "done 'true'", "timestamp non-integer string",
                   "parentId a list", "one bad message of three", "101 characters and a lone surrogate",
                   "string timestamp, no currentId", "current message output a number", "nesting 1030",
                   "nesting 500 with a NUL"):
            assert chat_id not in with_rows and chat_id in recorded, tag


def test_verify_reports_nothing_after_an_app_backfill_and_the_migration_differences(cluster, head_db):
    db = copy_of(cluster, head_db, "app_verify")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT kind, count(*) FROM chat_backfill.verify(rows => 'app') GROUP BY kind")
        before = dict(cur.fetchall())
        assert set(before) == {"missing"}
        cur.execute("SELECT count(*) FROM backfill_chat_messages(now => %s, rows => 'migration')", (NOW,))
        cur.execute("SELECT chat_id, message_key, columns FROM chat_backfill.verify(rows => 'app') "
                    "WHERE kind = 'different'")
        different = {(c, k): set(cols) for c, k, cols in cur.fetchall()}
        cur.execute("SELECT count(*) FROM chat_backfill.verify(rows => 'migration')")
        assert cur.fetchone()[0] == 0, "the migration's own rows verify clean in 'migration' mode"
    tags = {tag: f"app-{n:03d}" for n, (tag, _) in enumerate(app_cases())}
    # What the migration's mapping gets differently from the app's.
    for tag, columns in [
        ("usage ollama", {"usage"}),
        ("usage under info", {"usage"}),
        ("own user_id", {"user_id"}),
        ("meta", {"meta"}),
        ("contextSummary", {"context_summary"}),
        ("parent_id snake case", {"parent_id"}),
        ("timestamp ms", {"created_at"}),
        ("model_id over model", {"model_id"}),
    ]:
        assert different.get((tags[tag], "m"), set()) >= columns, (tag, different.get((tags[tag], "m")))
    assert (tags["usage openai"], "m") in different  # the normalized token columns are added
    assert different.get((tags["done missing"], "m"), set()) <= {"usage"}


def test_head_schema_opened_chats_then_committing_backfill(cluster, head_db):
    db = copy_of(cluster, head_db, "app_opened")
    url = cluster.url(db)
    opened = [c.id for c in realistic() if not c.user_id.startswith("shared-")][:10]
    # Opened since the upgrade: the app wrote their rows itself, an hour before the backfill.
    app_reference.app_messages_maps(url, opened, NOW - 3600)
    # One chat opened, then a message added in the JSON only (rows lag behind the document).
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT chat::text FROM chat WHERE id = %s", (opened[0],))
        doc = json.loads(cur.fetchone()[0])
        doc["history"]["messages"]["late"] = {"role": "user", "content": "added later", "parentId": None}
        cur.execute("UPDATE chat SET chat = %s::json WHERE id = %s", (json.dumps(doc), opened[0]))
        cur.execute("SELECT kind, count(*) FROM chat_backfill.verify(rows => 'app') GROUP BY kind")
        before = dict(cur.fetchall())
        before_rows = message_rows(conn)
    assert before.get("partial_chat") == 1 and before.get("missing", 0) > 0 and "different" not in before
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("CALL backfill_chat_messages_resumable(now => %s, rows => 'app', batch_size => 50)", (NOW,))
        cur.execute("SELECT count(*) FROM chat_backfill.verify(rows => 'app')")
        assert cur.fetchone()[0] == 0
        after = message_rows(conn)
        cur.execute("SELECT state, rows FROM chat_backfill.status ORDER BY run_id DESC LIMIT 1")
        assert cur.fetchone() == ("finished", "app")
        # Every message once: ids are the primary key, and the count equals what the rules give.
        cur.execute("SELECT count(*), count(DISTINCT id) FROM chat_message")
        n, distinct = cur.fetchone()
    assert n == distinct
    # App-written rows untouched (their updated_at is the hour-earlier clock).
    for id_, row in before_rows.items():
        assert after[id_] == row, id_
    assert any(r["updated_at"] == NOW - 3600 for r in after.values())
    assert f"{opened[0]}-late" in after and after[f"{opened[0]}-late"]["updated_at"] == NOW
    # A second CALL in the same mode has nothing to do; 'migration' mode is a run of its own.
    with cluster.connect(db) as conn, conn.cursor() as cur:
        conn.notices.clear()
        cur.execute("CALL backfill_chat_messages_resumable(rows => 'app')")
        assert any("already complete" in n for n in conn.notices)


def test_rows_argument_and_target_columns(cluster):
    db = cluster.create_db("app_args")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE chat (id text PRIMARY KEY, user_id text, chat json)")
        cur.execute("""CREATE TABLE chat_message (id text PRIMARY KEY, chat_id text, user_id text, role text, parent_id text,
            content json, output json, model_id text, files json, sources json, embeds json, done boolean,
            status_history json, error json, usage json, created_at bigint, updated_at bigint)""")
        with pytest.raises(psycopg2.Error) as e:
            cur.execute("SELECT * FROM backfill_chat_messages(rows => 'apps')")
        assert e.value.pgcode == "22023"
        # The migration's 17 columns: 'app' needs the head's meta and context_summary.
        with pytest.raises(psycopg2.Error) as e:
            cur.execute("SELECT * FROM backfill_chat_messages(rows => 'app')")
        assert e.value.pgcode == "42703" and "rows => 'migration'" in e.value.diag.message_hint
        with pytest.raises(psycopg2.Error) as e:
            cur.execute("CALL backfill_chat_messages_resumable(rows => 'app')")
        assert e.value.pgcode == "42703"
        with pytest.raises(psycopg2.Error) as e:
            cur.execute("SELECT * FROM chat_backfill.verify(rows => 'app')")
        assert e.value.pgcode == "42703"
        # verify() needs SELECT on both tables, said up front.
        role = f"vr_{db[-8:]}"
        cur.execute(f"CREATE ROLE {role}; GRANT SELECT ON chat TO {role}; SET ROLE {role}")
        with pytest.raises(psycopg2.Error) as e:
            cur.execute("SELECT * FROM chat_backfill.verify()")
        assert e.value.pgcode == "42501" and "GRANT SELECT ON" in e.value.diag.message_hint
        cur.execute("RESET ROLE")


def test_app_rows_with_workers_equal_one_session(cluster, head_db):
    one = copy_of(cluster, head_db, "app_one")
    two = copy_of(cluster, head_db, "app_two")
    with cluster.connect(one) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM backfill_chat_messages(now => %s, rows => 'app')", (NOW,))
    with cluster.connect(two) as conn, conn.cursor() as cur:
        cur.execute("CALL backfill_chat_messages_resumable(now => %s, rows => 'app', batch_size => 20, workers => 2)",
                    (NOW,))
        cur.execute("SELECT state, rows FROM chat_backfill.status")
        assert cur.fetchall() == [("finished", "app")]
    with cluster.connect(one) as a, cluster.connect(two) as b:
        want, got = message_rows(a), message_rows(b)
        rejections = "SELECT chat_id, message_key, sqlstate FROM chat_backfill.rejected_messages ORDER BY 1, 2, 3"
        with a.cursor() as ca, b.cursor() as cb:
            ca.execute(rejections)
            cb.execute(rejections)
            assert ca.fetchall() == cb.fetchall()
    assert want and got == want


def test_verify_reports_hand_edits(cluster, head_db):
    db = copy_of(cluster, head_db, "app_edits")
    chat_id = next(c.id for c in realistic() if not c.user_id.startswith("shared-") and c.chat.count('"role"') >= 3)
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM backfill_chat_messages(now => %s, rows => 'app')", (NOW,))
        cur.execute("SELECT id FROM chat_message WHERE chat_id = %s ORDER BY id", (chat_id,))
        ids = [r[0] for r in cur.fetchall()]
        assert len(ids) >= 2
        cur.execute("UPDATE chat_message SET role = 'tampered', content = '{\"x\": 1}' WHERE id = %s", (ids[0],))
        cur.execute("DELETE FROM chat_message WHERE id = %s", (ids[1],))
        # A thousand rows of messages the document does not hold, read a chunk at a time.
        cur.execute("INSERT INTO chat_message (id, chat_id, role, created_at, updated_at) "
                    "SELECT %s || '-ghost' || g, %s, 'user', 1, 1 FROM generate_series(1, 1000) g", (chat_id, chat_id))
        cur.execute("SELECT kind, message_key, columns FROM chat_backfill.verify(rows => 'app') ORDER BY 1, 2")
        found = cur.fetchall()
    prefix = len(chat_id) + 1
    assert ("different", ids[0][prefix:], ["role", "content"]) in found
    assert ("missing", ids[1][prefix:], None) in found
    assert ("partial_chat", None, None) in found
    assert sum(1 for kind, _, _ in found if kind == "extra") == 1000
    assert len(found) == 1003


def _long_chat(n: int, tag: str, **changes) -> str:
    """A linear conversation of n messages; `changes` maps a message number to fields set on it."""
    messages = {}
    for i in range(n):
        key = f"{tag}{i:03d}"
        messages[key] = {"id": key, "parentId": f"{tag}{i - 1:03d}" if i else None,
                         "role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}",
                         "timestamp": 1_700_000_000 + i, **changes.get(f"m{i}", {})}
    return json.dumps({"history": {"messages": messages, "currentId": f"{tag}{n - 1:03d}"}})


@pytest.mark.parametrize("form", ["select", "call"])
def test_a_chat_bigger_than_a_batch_is_written_all_or_nothing(cluster, form):
    """App rows of a chat of more messages than a batch go in slices inside one
    subtransaction: the same rows as a batch that holds the chat whole; none at all when the
    app fails on its last message, or when the target refuses a row of a later slice (the
    earlier slices are rolled back), with the bad message recorded either way."""
    from load_sample import TARGET_DDL, copy_chats
    chats = [chatgen.Chat("a-fine", "u1", _long_chat(50, "a")),
             chatgen.Chat("b-app-fails", "u1", _long_chat(50, "b", m47={"usage": "lots"})),
             chatgen.Chat("c-target-refuses", "u1", _long_chat(50, "c", m41={"content": "refused"})),
             chatgen.Chat("d-small", "u2", _long_chat(3, "d"))]
    dbs = {}
    for size in (5000, 8):
        db = dbs[size] = cluster.create_db("app_whole")
        with cluster.connect(db) as conn, conn.cursor() as cur:
            cur.execute(CHAT_DDL)
            copy_chats(conn, chats)
            cur.execute(TARGET_DDL)
            cur.execute("ALTER TABLE chat_message ADD COLUMN meta json, ADD COLUMN context_summary text, "
                        "ADD CONSTRAINT no_refused CHECK (content::text <> '\"refused\"')")
            if form == "select" or size == 5000:
                cur.execute("SELECT sum(messages_inserted), sum(messages_rejected), sum(messages_skipped), "
                            "sum(chats_read) FROM backfill_chat_messages(now => %s, rows => 'app', batch_size => %s)",
                            (NOW, size))
                assert cur.fetchone() == (53, 2, 98, 4)
            else:
                cur.execute("CALL backfill_chat_messages_resumable(now => %s, rows => 'app', batch_size => %s)",
                            (NOW, size))
                cur.execute("SELECT state, messages_inserted, messages_rejected FROM chat_backfill.status")
                assert cur.fetchone() == ("finished", 53, 2)
            cur.execute("SELECT chat_id, message_key, sqlstate, detail LIKE '%%all or nothing%%' "
                        "FROM chat_backfill.rejected_messages ORDER BY 1")
            assert cur.fetchall() == [("b-app-fails", "b047", "22023", True), ("c-target-refuses", "c041", "23514", True)]
            cur.execute("SELECT chat_id, count(*) FROM chat_message GROUP BY 1 ORDER BY 1")
            assert cur.fetchall() == [("a-fine", 50), ("d-small", 3)]
    with cluster.connect(dbs[5000]) as a, cluster.connect(dbs[8]) as b:
        assert message_rows(a) == message_rows(b)
