"""chat_messages() and backfill_chat_messages() against Open WebUI's real migration
8452d01d26d7 (from the PyPI wheel, run through Alembic) on the same generated chats.

What "the same rows" means here (compare.py): the same ids; text, boolean and bigint
columns equal; JSON columns equal as parsed JSON values, telling 1 from 1.0 from true.
JSON text cannot be compared with the reference, which re-serialises every value with
json.dumps. So, separately, every JSON column we store must be byte for byte the text of
that value in the source document (compare.json_text_problems, sliced from the document
without parsing it into Python objects)."""

from __future__ import annotations

import json

import pytest

import chatgen
from compare import compare, failed_ids, fetch_rows, json_text_problems
from conftest import load_chats
from load_sample import TARGET_DDL
from reference import run_reference

ONE_STATEMENT = """
INSERT INTO chat_message
SELECT m.* FROM chat c, chat_messages(c.id, c.user_id, c.chat, %(now)s) m
WHERE c.user_id NOT LIKE 'shared-%%'
ON CONFLICT (id) DO NOTHING
"""

PROBLEMS = """
SELECT c.id, p.message_key, p.reason FROM chat c, chat_message_problems(c.id, c.chat) p
WHERE c.user_id NOT LIKE 'shared-%%'
"""


def display(text: str) -> str:
    """How chat_message_problems shows a key: NUL and lone surrogates as JSON escapes."""
    return "".join(
        f"\\u{ord(ch):04x}" if ch == "\x00" or 0xD800 <= ord(ch) < 0xE000 else ch for ch in text
    )


def source_message_ids(chats) -> set[str]:
    """Every key of history.messages, read with Python's json (the reference's parser)."""
    ids = set()
    for c in chats:
        if c.chat is None or c.user_id is None or c.user_id.startswith("shared-"):
            continue
        doc = json.loads(c.chat)
        if isinstance(doc, str):
            try:
                doc = json.loads(doc)
            except ValueError:
                continue
        if not isinstance(doc, dict):
            continue
        messages = (doc.get("history") or {}) if isinstance(doc.get("history", {}), dict) else {}
        if isinstance(messages, dict) and isinstance(messages.get("messages", {}), dict):
            ids.update(f"{c.id}-{k}" for k in messages.get("messages", {}))
    return ids


def database_with_reference_ddl(cluster, prefix, chats) -> str:
    """A database whose chat_message comes from the reference itself (its migration run
    on an empty chat table), then loaded with `chats`."""
    db = cluster.create_db(prefix)
    with cluster.connect(db) as conn:
        load_chats(conn, [])
    run_reference(cluster.url(db), chatgen.NOW)
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO chat (id, user_id, title, chat) VALUES (%s, %s, 't', %s::json)",
            [(c.id, c.user_id, c.chat) for c in chats],
        )
    return db


def run_ours(cluster, chats, parse_json=True) -> tuple[str, dict, set[str], set[str]]:
    """The one-statement form on a database with the reference's own DDL."""
    db = database_with_reference_ddl(cluster, "ours", chats)
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(ONE_STATEMENT, {"now": chatgen.NOW})
        cur.execute(PROBLEMS)
        problems = cur.fetchall()
        rows = fetch_rows(conn, parse_json)
    rejected = {f"{cid}-{key}" for cid, key, reason in problems if key is not None and reason.startswith("cannot")}
    skipped = {f"{cid}-{key}" for cid, key, reason in problems if key is not None and reason.startswith("skipped")}
    return db, rows, rejected, skipped


def run_ref(cluster, chats) -> tuple[dict, list[str]]:
    db = cluster.create_db("ref", extension=False)
    with cluster.connect(db) as conn:
        load_chats(conn, chats)
    failures = run_reference(cluster.url(db), chatgen.NOW)
    with cluster.connect(db) as conn:
        return fetch_rows(conn), failures


def test_same_values_as_the_reference_on_realistic_and_hostile_chats(cluster):
    """chat_messages() in one INSERT: the reference's rows with equal values (JSON columns
    compared parsed), and our JSON columns are the source documents' own text."""
    chats = chatgen.realistic_chats(seed=7, count=150) + [
        c for c in chatgen.hostile_chats() if not c.crashes_reference
    ]
    ref_rows, failures = run_ref(cluster, chats)
    db, our_rows, rejected, skipped = run_ours(cluster, chats)
    with cluster.connect(db) as conn:
        our_text = fetch_rows(conn, parse_json=False)
    text_problems = json_text_problems(our_text, chats)
    assert not text_problems, f"{len(text_problems)} JSON values not stored as their source text:\n" + "\n".join(
        text_problems[:30])

    every_id = source_message_ids(chats)
    ref_failed = {display(i) for i in failed_ids(failures, every_id)}
    problems = compare(our_rows, ref_rows, ref_failed, rejected)
    assert not problems, f"{len(problems)} rows whose values differ:\n" + "\n".join(problems[:60])

    # The hostile set really exercises the reference's failure path, and all of it is ours.
    assert len(ref_failed) >= 10, failures
    assert ref_failed - rejected == {i for i in ref_failed if i in our_rows}
    # Nothing lost: every message of the source is a row, a recorded rejection, or a
    # rule skip the reference makes too.
    accounted = set(our_rows) | rejected | skipped
    lost = {display(i) for i in every_id} - accounted
    assert not lost, sorted(lost)[:20]
    assert len(ref_rows) > 1000
    print(f"reference rows {len(ref_rows)}, ours {len(our_rows)}, reference failures {len(ref_failed)}, "
          f"ours rejected {len(rejected)}, stored by us where the reference failed {len(ref_failed & set(our_rows))}")


@pytest.mark.parametrize("chat", [c for c in chatgen.hostile_chats() if c.crashes_reference], ids=lambda c: c.tag)
def test_chats_that_crash_the_reference_are_skipped_and_reported(cluster, chat):
    # The reference aborts the whole migration on this chat, in its own Python code (not a
    # database error): `chat_data.get` on a value that is not a dict, or the recursion
    # limit of Python's json module when the driver decodes the deep document ...
    if chat.tag == "deep nesting":
        expected, message = RecursionError, "maximum recursion depth exceeded while decoding"
    else:
        expected, message = AttributeError, "object has no attribute 'get'"
    with pytest.raises(expected, match=message):
        run_ref(cluster, [chat])
    # ... ours keeps going, and says what it did with it.
    _, rows, rejected, skipped = run_ours(cluster, [chat], parse_json=False)
    db = cluster.create_db("crash")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        load_chats(conn, [chat])
        cur.execute(PROBLEMS)
        problems = cur.fetchall()
    if chat.tag == "deep nesting":
        assert list(rows) == [f"{chat.id}-deep"]
        assert rows[f"{chat.id}-deep"]["content"] == "[" * 5000 + "]" * 5000
        assert problems == []
    else:
        assert rows == {}
        assert [(p[1], p[2].split(":")[0]) for p in problems] == [(None, "chat skipped")]


def test_backfill_function_matches_the_reference_and_accounts_for_every_message(cluster):
    """backfill_chat_messages(): the reference's rows with equal values (JSON columns
    compared parsed), JSON columns that are the source documents' own text, every failure
    of the reference either stored or in chat_backfill.rejected_messages, and the per-batch
    counts add up to the source."""
    chats = chatgen.realistic_chats(seed=11, count=120) + [c for c in chatgen.hostile_chats()]
    safe = [c for c in chats if not c.crashes_reference]
    ref_rows, failures = run_ref(cluster, safe)

    db = database_with_reference_ddl(cluster, "engine", chats)
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT sum(chats_read), sum(messages_inserted), sum(messages_rejected), sum(messages_existing),"
            " sum(messages_skipped), sum(chats_skipped), count(*)"
            " FROM backfill_chat_messages(batch_size => 200, now => %s)",
            (chatgen.NOW,),
        )
        chats_read, inserted, rejected_n, existing, skipped_n, chats_skipped, batches = cur.fetchone()
        cur.execute("SELECT chat_id, message_key FROM chat_backfill.rejected_messages WHERE message_key IS NOT NULL")
        rejected = {f"{cid}-{key}" for cid, key in cur.fetchall()}
        cur.execute("SELECT count(*) FROM chat_backfill.rejected_messages WHERE message_key IS NULL")
        (chats_recorded,) = cur.fetchone()
        cur.execute("SELECT count(*) FROM chat_message")
        (stored,) = cur.fetchone()
        our_rows = fetch_rows(conn, parse_json=False)

    # Rows of the chats the reference survives compare exactly; the deep chat is ours alone.
    deep_ids = {i for i in our_rows if i.startswith(next(c.id for c in chats if c.tag == "deep nesting"))}
    with cluster.connect(db) as conn:
        parsed = {k: v for k, v in fetch_rows_except(conn, deep_ids).items()}
    every_id = source_message_ids(safe)
    ref_failed = {display(i) for i in failed_ids(failures, every_id)}
    problems = compare(parsed, ref_rows, ref_failed, rejected)
    assert not problems, f"{len(problems)} rows whose values differ:\n" + "\n".join(problems[:60])
    # Every stored row, the deep chat's included: JSON columns are the source text.
    text_problems = json_text_problems(our_rows, chats)
    assert not text_problems, f"{len(text_problems)} JSON values not stored as their source text:\n" + "\n".join(
        text_problems[:30])

    eligible = [c for c in chats if c.user_id is not None and not c.user_id.startswith("shared-")]
    assert chats_read == len(eligible)
    assert inserted == stored == len(our_rows) and existing == 0 and batches > 3
    assert rejected_n == len(rejected) and chats_recorded == chats_skipped > 0
    # Nothing lost: every entry of every eligible chat is inserted, rejected or rule-skipped.
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM chat c, chat_message_problems(c.id, c.chat) p"
            " WHERE c.user_id NOT LIKE 'shared-%' AND p.message_key IS NOT NULL"
        )
        (left_out,) = cur.fetchone()
    assert left_out == rejected_n + skipped_n
    print(f"batches {batches}, chats {chats_read}, inserted {inserted}, rejected {rejected_n}, "
          f"rule-skipped {skipped_n}, unusable chats {chats_skipped}")


def fetch_rows_except(conn, ids):
    with conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE skip_ids (id text)")
        cur.executemany("INSERT INTO skip_ids VALUES (%s)", [(i,) for i in ids])
        cur.execute("CREATE TEMP VIEW chat_message AS SELECT * FROM public.chat_message WHERE id NOT IN (SELECT id FROM skip_ids)")
    return fetch_rows(conn)


@pytest.mark.parametrize("json_type", ["json", "jsonb"])
def test_the_direct_path_and_copy_in_binary_and_in_text_write_the_same_rows(cluster, json_type):
    """Issue 23: a batch goes straight into a plain table whose columns have our datums'
    types (json, not jsonb); elsewhere to COPY in its binary format where the session's
    client encoding is the database's, in its text format otherwise. All three write byte
    for byte the same rows, on the generator's chats and the hostile ones, into json columns
    and into jsonb ones (whose binary form has a version byte). A statement trigger (which
    the direct path leaves to COPY) makes a target take COPY."""
    chats = chatgen.realistic_chats(seed=13, count=120) + chatgen.hostile_chats()
    db = cluster.create_db("copy_formats")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        load_chats(conn, chats)
        cur.execute(TARGET_DDL)
        if json_type == "jsonb":
            cur.execute("SELECT string_agg(format('ALTER COLUMN %I TYPE jsonb', attname), ', ') FROM pg_attribute "
                        "WHERE attrelid = 'chat_message'::regclass AND atttypid = 'json'::regtype")
            cur.execute(f"ALTER TABLE chat_message {cur.fetchone()[0]}")
        cur.execute("CREATE FUNCTION nothing() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END'")
        for copy in ("chat_message_binary", "chat_message_text"):
            cur.execute(f"CREATE TABLE {copy} (LIKE chat_message INCLUDING ALL)")
            cur.execute(f"CREATE TRIGGER s AFTER INSERT ON {copy} FOR EACH STATEMENT EXECUTE FUNCTION nothing()")
        paths = {}
        for target, encoding in (("chat_message", "UTF8"), ("chat_message_binary", "UTF8"),
                                 ("chat_message_text", "SQL_ASCII")):
            cur.execute(f"SET client_encoding = '{encoding}'; SET client_min_messages = debug1")
            del conn.notices[:]
            # force: no admission trial, which writes into a table of its own.
            cur.execute("SELECT array_agg(DISTINCT write_path) FROM backfill_chat_messages(target => %s, now => %s, "
                        "batch_size => 200, force => true)", (target, chatgen.NOW))
            # What the result names, each batch's path (a batch with a row that COPY refuses, a
            # NUL in jsonb, goes to the INSERT path), agrees with what the log says.
            named = {"direct": "direct insert", "copy binary": "binary format", "copy text": "text format"}
            write_paths = {named[p] for p in cur.fetchone()[0] if p != "insert"}
            assert write_paths == {p for n in conn.notices for p in named.values() if p in n}, conn.notices
            paths[target] = {p for n in conn.notices for p in ("direct insert", "binary format", "text format")
                             if p in n}
            cur.execute("RESET client_encoding; RESET client_min_messages")
        first = "direct insert" if json_type == "json" else "binary format"
        assert paths == {"chat_message": {first}, "chat_message_binary": {"binary format"},
                         "chat_message_text": {"text format"}}, paths
        counts = []
        for other in ("chat_message_binary", "chat_message_text"):
            cur.execute(f"SELECT (SELECT count(*) FROM chat_message), (SELECT count(*) FROM {other}), "
                        "(SELECT count(*) FROM (SELECT m::text FROM chat_message m EXCEPT ALL "
                        f"                       SELECT t::text FROM {other} t) d), "
                        f"(SELECT count(*) FROM (SELECT t::text FROM {other} t EXCEPT ALL "
                        "                       SELECT m::text FROM chat_message m) d)")
            counts.append(cur.fetchone())
    for ours, theirs, only_ours, only_theirs in counts:
        assert ours == theirs > 1000 and only_ours == only_theirs == 0, counts


def test_a_trigger_that_changes_client_encoding_during_a_binary_copy_corrupts_nothing(cluster):
    """The seventeenth review (low): the binary format's text and json values are converted
    from the client encoding of the moment, so a target's trigger that set client_encoding
    made every later row of its batch mojibake. The batch is refused when the encoding
    changed during its COPY, and goes to the INSERT path."""
    db = cluster.create_db("copy_flip")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE chat (id text PRIMARY KEY, user_id text, chat json)")
        cur.execute(TARGET_DDL)
        cur.execute("INSERT INTO chat SELECT 'k' || i, 'u', json_build_object('history', json_build_object('messages', "
                    "json_build_object('m' || i, json_build_object('id', 'm' || i, 'role', 'user', "
                    "'content', 'café ünïcode ' || i, 'timestamp', 1700000000)))) FROM generate_series(1, 10) i")
        cur.execute("CREATE FUNCTION flip() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN PERFORM set_config('client_encoding', 'LATIN1', false); RETURN NEW; END $$; "
                    "CREATE TRIGGER flip BEFORE INSERT ON chat_message FOR EACH ROW EXECUTE FUNCTION flip()")
        cur.execute("SELECT sum(messages_inserted) FROM backfill_chat_messages(now => %s, force => true)",
                    (chatgen.NOW,))
        assert cur.fetchone() == (10,)
        cur.execute("SET client_encoding = 'UTF8'")
        cur.execute("SELECT count(*) FILTER (WHERE content::text = format('\"café ünïcode %s\"', "
                    "substr(chat_id, 2))), count(*) FROM chat_message")
        assert cur.fetchone() == (10, 10)


def test_a_column_not_written_of_a_not_null_domain_refuses_rows_as_insert_does(cluster):
    """The eighteenth review (low): COPY, and so the direct path, stored NULL in a column the
    backfill does not write whose domain is NOT NULL, which the caller's own INSERT refuses.
    Such a target gets the INSERT path: every row is rejected with 23502, none written."""
    chats = chatgen.realistic_chats(seed=5, count=10)
    db = cluster.create_db("domain_column")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        load_chats(conn, chats)
        cur.execute(TARGET_DDL)
        cur.execute("CREATE DOMAIN required AS text NOT NULL")
        cur.execute("ALTER TABLE chat_message ADD COLUMN x required")
        cur.execute("SELECT sum(messages_inserted), sum(messages_rejected), array_agg(DISTINCT write_path) "
                    "FROM backfill_chat_messages(now => %s, force => true)", (chatgen.NOW,))
        inserted, rejected, paths = cur.fetchone()
        cur.execute("SELECT count(*), array_agg(DISTINCT sqlstate) FROM chat_backfill.rejected_messages")
        recorded, states = cur.fetchone()
        # Control: without the domain column the same chats are written.
        cur.execute("ALTER TABLE chat_message DROP COLUMN x")
        cur.execute("SELECT sum(messages_inserted) FROM backfill_chat_messages(now => %s, force => true)", (chatgen.NOW,))
        (written,) = cur.fetchone()
    assert (inserted, paths, states) == (0, ["insert"], ["23502"]) and rejected == recorded == written > 0, \
        (inserted, rejected, paths, recorded, states, written)
