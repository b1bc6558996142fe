"""Hardening (0.2.0, issue 7) against a real server, both forms of the backfill:

1. class 54 errors on insert (an index row too large: 54000; jsonb nested past the stack
   limit: 54001) are row errors, recorded in chat_backfill.rejected_messages, and the run
   goes on (the resumable CALL finishes, and finishes again with restart => true);
2. the stored rows are byte-identical to chat_messages() whatever the session's
   client_encoding (COPY's text format is read in the client encoding unless told otherwise);
3. a rule on the target fires for every row written (COPY bypasses rules);
4. rejections are deduplicated across runs, and run_ids come from
   chat_backfill.runs_run_id_seq in both forms;
5. chats the application deletes during a run are counted in chats_vanished, not rejected.

Every comparison of stored text is made on bytes computed by the server
(convert_to(col::text, 'UTF8')), so the client encoding cannot hide a difference.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import string
import threading
import time

import psycopg2
import pytest

import chatgen
from chatgen import Chat
from compare import COLUMNS
from load_sample import TARGET_DDL, copy_chats

NOW = chatgen.NOW
FORMS = ["one-shot", "resumable"]

ONE_SHOT = "SELECT * FROM backfill_chat_messages(now => %(now)s, {extra})"
CALL = "CALL backfill_chat_messages_resumable(now => %(now)s, {extra})"

# Every column as the UTF8 bytes of its text: what is stored, independent of the client.
ROW_BYTES = ", ".join(f"pg_catalog.convert_to({c}::text, 'UTF8')" for c in COLUMNS)
TARGET_BYTES = f"SELECT {ROW_BYTES} FROM chat_message"
EXPECTED_BYTES = (
    f"SELECT {ROW_BYTES} FROM (SELECT m.* FROM chat c, chat_messages(c.id, c.user_id, c.chat, %(now)s) m"
    " WHERE c.user_id NOT LIKE 'shared-%%') chat_message"
)


# ---------------------------------------------------------------- helpers

def make_db(cluster, chats, ddl=TARGET_DDL, chat_type="json", prefix="hard") -> str:
    db = cluster.create_db(prefix)
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE TABLE chat (id text PRIMARY KEY, user_id text, title text, chat {chat_type})")
        copy_chats(conn, chats)
        cur.execute(ddl)
    return db


def one_shot(conn, extra="batch_size => 5000") -> dict:
    """Runs the one-transaction form; returns its per-batch counts summed, by column name
    (so a test does not depend on columns it does not look at)."""
    with conn.cursor() as cur:
        cur.execute(ONE_SHOT.format(extra=extra), {"now": NOW})
        names = [d.name for d in cur.description]
        rows = cur.fetchall()
    totals = {n: 0 for n in names if n not in ("batch", "last_chat_id", "elapsed_ms", "write_path")}
    for row in rows:
        for n, v in zip(names, row):
            if n in totals:
                totals[n] += v
    totals["batches"] = len(rows)
    return totals


def call(conn, extra="batch_size => 40"):
    with conn.cursor() as cur:
        cur.execute(CALL.format(extra=extra), {"now": NOW})


def latest_status(conn) -> dict:
    with conn.cursor() as cur:
        cur.execute("SELECT * FROM chat_backfill.status ORDER BY run_id DESC LIMIT 1")
        return dict(zip([d.name for d in cur.description], cur.fetchone()))


def run_form(cluster, db, form, extra, client_encoding=None) -> dict:
    """One run in its own session; returns the one-shot's totals, or the status row of the
    resumable run, plus the session's NOTICEs under "notices"."""
    with cluster.connect(db) as conn:
        if client_encoding:
            with conn.cursor() as cur:
                cur.execute(f"SET client_encoding = '{client_encoding}'")
        if form == "one-shot":
            out = one_shot(conn, extra)
        else:
            call(conn, extra)
            out = latest_status(conn)
        out["notices"] = list(conn.notices)
        return out


def rows_bytes(conn, query=TARGET_BYTES) -> dict[bytes, tuple]:
    """Rows by id, every column as the UTF8 bytes of its text (NULL: None)."""
    with conn.cursor() as cur:
        cur.execute(query, {"now": NOW})
        out = {}
        for values in cur.fetchall():
            row = tuple(None if v is None else bytes(v) for v in values)
            assert row[0] not in out, f"id {row[0]!r} twice"
            out[row[0]] = row
        return out


def expected_bytes(conn) -> dict[bytes, tuple]:
    """chat_messages() over the eligible chats now in `chat`, in a UTF8 session."""
    with conn.cursor() as cur:
        cur.execute("SHOW client_encoding")
        assert cur.fetchone() == ("UTF8",)
    return rows_bytes(conn, EXPECTED_BYTES)


def assert_same_rows(got: dict, want: dict):
    """Stored rows (rows_bytes) equal the expected ones, with a short report if not."""
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    differing = sorted(i for i in want.keys() & got.keys() if got[i] != want[i])
    assert not (missing or extra or differing), (
        f"{len(missing)} missing {[i.decode() for i in missing[:5]]}, {len(extra)} unexpected "
        f"{[i.decode() for i in extra[:5]]}, {len(differing)} differ: "
        + "; ".join(first_difference(i, got[i], want[i]) for i in differing[:3])
    )


def first_difference(rid: bytes, got, want) -> str:
    if got is None:
        return f"{rid.decode()!r}: missing"
    n = next(n for n in range(len(COLUMNS)) if got[n] != want[n])
    return f"{rid.decode()!r} {COLUMNS[n]}: stored {got[n]!r:.100}, chat_messages() {want[n]!r:.100}"


def rejected(conn) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute("SELECT chat_id, message_id, sqlstate, run_id FROM chat_backfill.rejected_messages ORDER BY id")
        return cur.fetchall()


def notice_run_id(notices) -> int:
    """The run id the NOTICE names ("... rejected_messages WHERE run_id = N")."""
    ids = {int(m) for n in notices for m in re.findall(r"run_id = (\d+)", n)}
    assert len(ids) == 1, notices
    return ids.pop()


def realistic(count, seed):
    return chatgen.realistic_chats(seed=seed, count=count, content_bytes=(200, 1200), messages=(2, 8))


# ---------------------------------------------------------------- 1. class 54 as row errors

def _incompressible(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(n))


def big_model_chat() -> Chat:
    """A message whose model is ~13 KB that pglz cannot compress: its entry in the btree
    index on model_id needs more than 8191 bytes (54000 "index row requires ... bytes")."""
    messages = {
        "q": {"role": "user", "content": "before", "timestamp": 1700000000},
        "big": {"role": "assistant", "model": _incompressible(13_000, 54), "parentId": "q", "content": "x",
                "timestamp": 1700000001},
        "after": {"role": "user", "parentId": "big", "content": "after", "timestamp": 1700000002},
    }
    return Chat("8000000000000000-big-model", "user-54", json.dumps({"history": {"messages": messages}}))


def class54_chats() -> tuple[list[Chat], bytes]:
    chats = realistic(40, seed=54)
    chats.insert(20, big_model_chat())
    return chats, b"8000000000000000-big-model-big"


@pytest.mark.parametrize("form", FORMS)
def test_index_row_too_large_is_a_row_error(cluster, form):
    """54000 from the btree index on model_id: that message is recorded with sqlstate 54000,
    every other message is written. Against 0.1.0 the whole run fails with 54000."""
    chats, big_id = class54_chats()
    db = make_db(cluster, chats, prefix="c54")
    result = run_form(cluster, db, form, "batch_size => 40")
    with cluster.connect(db) as conn:
        want = expected_bytes(conn)
        assert big_id in want
        del want[big_id]
        assert_same_rows(rows_bytes(conn), want)
        [(chat_id, message_id, sqlstate, run_id)] = rejected(conn)
        assert (chat_id, message_id, sqlstate) == (big_id.decode()[: -len("-big")], big_id.decode(), "54000")
    if form == "one-shot":
        assert (result["messages_inserted"], result["messages_rejected"]) == (len(want), 1)
    else:
        assert result["state"] == "finished"
        assert (result["messages_inserted"], result["messages_rejected"]) == (len(want), 1)
        # Again from the beginning: it finishes too; everything exists, the one rejection
        # is counted again but recorded once.
        again = run_form(cluster, db, form, "batch_size => 40, restart => true")
        assert again["run_id"] != result["run_id"]
        assert again["state"] == "finished"
        assert (again["messages_inserted"], again["messages_existing"], again["messages_rejected"]) == (0, len(want), 1)
        with cluster.connect(db) as conn:
            assert [r[2] for r in rejected(conn)] == ["54000"]
            assert_same_rows(rows_bytes(conn), want)


def deep_jsonb_chat(depth=20_000) -> Chat:
    messages = (
        '{"q":{"role":"user","content":"before"},'
        '"deep":{"role":"user","parentId":"q","content":%s},'
        '"after":{"role":"user","parentId":"deep","content":"after"}}' % ("[" * depth + "]" * depth)
    )
    return Chat("8000000000000000-deep", "user-54", '{"history":{"messages":%s}}' % messages)


@pytest.mark.parametrize("form", FORMS)
def test_stack_depth_on_insert_is_a_row_error(cluster, form):
    """A target whose content is jsonb and a content nested 20,000 deep: json -> jsonb
    conversion exceeds max_stack_depth (2MB) on insert, SQLSTATE 54001 (observed on
    PostgreSQL 15; 0.1.0 fails the whole run with it). The message is recorded with that
    SQLSTATE and the run goes on. The source column is text: a json column cannot hold this
    document at the default max_stack_depth (json_in fails the same way)."""
    chats = realistic(20, seed=541)
    chats.insert(10, deep_jsonb_chat())
    ddl = TARGET_DDL.replace("content json,", "content jsonb,")
    assert ddl != TARGET_DDL
    db = make_db(cluster, chats, ddl=ddl, chat_type="text", prefix="c54deep")
    result = run_form(cluster, db, form, "batch_size => 40")
    deep_id = "8000000000000000-deep-deep"
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT m.id FROM chat c, chat_messages(c.id, c.user_id, c.chat, %s) m"
                    " WHERE c.user_id NOT LIKE 'shared-%%'", (NOW,))
        want = {r[0] for r in cur.fetchall()} - {deep_id}
        cur.execute("SELECT id FROM chat_message")
        assert {r[0] for r in cur.fetchall()} == want
        [(chat_id, message_id, sqlstate, _)] = rejected(conn)
    assert (chat_id, message_id) == ("8000000000000000-deep", deep_id)
    assert sqlstate == "54001", sqlstate
    assert (result["messages_inserted"], result["messages_rejected"]) == (len(want), 1)
    if form == "resumable":
        assert result["state"] == "finished"


# ---------------------------------------------------------------- 2. byte-exact whatever the session

def non_ascii_chats() -> list[Chat]:
    """Chat ids stay ASCII (the one-shot form returns them as last_chat_id, which LATIN1
    could not represent); everything else carries é, ж, 中 and emoji, in text and JSON
    columns and in the message keys (ids)."""
    chats = []
    for i in range(12):
        messages = {
            f"clé-{i}": {"role": "user", "content": f"héllo ж 中文 🙂 {i}", "timestamp": 1700000000 + i,
                         "files": [{"name": "résumé-ж.pdf"}]},
            f"ответ-{i}": {"role": "assistant", "parentId": f"clé-{i}", "model": "modèle-中-🙂",
                           "content": "Ça va? Дa. 好的 👍🏽 \\ tab\t\"q\"", "usage": {"note": "ß€"},
                           "statusHistory": [{"description": "recherché 🔎"}], "timestamp": 1700000100 + i},
            f"{i}-ascii": {"role": "user", "content": "plain", "timestamp": 1700000200 + i},
        }
        chats.append(Chat(f"enc-{i:03d}", f"usér-ж-{i % 3}", json.dumps({"history": {"messages": messages}},
                                                                       ensure_ascii=(i % 2 == 0))))
    return chats


@pytest.mark.parametrize("client_encoding", ["LATIN1", "SQL_ASCII"])
@pytest.mark.parametrize("form", FORMS)
def test_rows_are_byte_identical_whatever_the_client_encoding(cluster, form, client_encoding):
    """Against 0.1.0 the COPY fast path reads its lines in the client encoding: under LATIN1
    "héllo" is stored as "hÃ©llo"."""
    chats = non_ascii_chats()
    db = make_db(cluster, chats, prefix="enc")
    result = run_form(cluster, db, form, "batch_size => 12", client_encoding=client_encoding)
    with cluster.connect(db) as conn:
        want = expected_bytes(conn)
        assert len(want) == 36 and any("é".encode() in r[5] for r in want.values())
        got = rows_bytes(conn)
    assert_same_rows(got, want)
    assert result["messages_inserted"] == 36


# ---------------------------------------------------------------- 3. rules on the target

RULE_DDL = """
CREATE TABLE audit (id text NOT NULL);
CREATE RULE r AS ON INSERT TO chat_message DO ALSO INSERT INTO audit VALUES (NEW.id);
"""


def audit_matches_target(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT id, count(*) FROM audit GROUP BY id")
        audit = dict(cur.fetchall())
        cur.execute("SELECT id FROM chat_message")
        written = {r[0] for r in cur.fetchall()}
    assert len(written) > 100
    assert set(audit) == written, f"{len(written - set(audit))} rows written without the rule firing"
    assert set(audit.values()) == {1}, "the rule fired more than once for a row"


@pytest.mark.parametrize("form", FORMS)
def test_rule_on_the_target_fires_for_every_row(cluster, form):
    """Three ways to get this wrong: COPY never applies rules; INSERT ... ON CONFLICT is
    refused on a table with INSERT rules (0A000: 0.1.0 fails there, preparing its INSERT,
    before writing anything); and a DO ALSO action runs after the original INSERT, so an
    INSERT ... WHERE NOT EXISTS (anti-join against the target) would find the rows just
    written and audit none of them. Audit must hold every written row, once."""
    chats = realistic(40, seed=3)
    db = make_db(cluster, chats, ddl=TARGET_DDL + RULE_DDL, prefix="rule")
    result = run_form(cluster, db, form, "batch_size => 40")
    with cluster.connect(db) as conn:
        want = expected_bytes(conn)
        assert_same_rows(rows_bytes(conn), want)
        audit_matches_target(conn)
    assert result["messages_inserted"] == len(want) and result["messages_rejected"] == 0
    # Again: nothing is written, so the rule adds nothing (and nothing is rejected).
    again = run_form(cluster, db, form, "batch_size => 40" + (", restart => true" if form == "resumable" else ""))
    assert (again["messages_inserted"], again["messages_existing"], again["messages_rejected"]) == (0, len(want), 0)
    with cluster.connect(db) as conn:
        audit_matches_target(conn)
        assert rejected(conn) == []


@pytest.mark.parametrize("form", FORMS)
def test_rule_target_needs_select_and_says_so_before_writing(cluster, form):
    """Without ON CONFLICT, the backfill asks a rule target which ids are missing: a role that
    may INSERT into it but not SELECT from it is refused with 42501 up front, not in the middle
    of the run, and nothing is written."""
    db = make_db(cluster, realistic(5, seed=4), ddl=TARGET_DDL + RULE_DDL, prefix="rulepriv")
    role = f"rule_writer_{db[-6:]}"
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE ROLE {role}")
        cur.execute(f"GRANT SELECT ON chat TO {role}; GRANT INSERT ON chat_message, audit TO {role}")
        cur.execute(f"SET ROLE {role}")
        sql = (ONE_SHOT if form == "one-shot" else CALL).format(extra="batch_size => 40")
        with pytest.raises(psycopg2.Error) as e:
            cur.execute(sql, {"now": chatgen.NOW})
        assert e.value.pgcode == "42501" and "SELECT" in str(e.value)
        cur.execute("RESET ROLE")
        cur.execute("SELECT (SELECT count(*) FROM chat_message), (SELECT count(*) FROM chat_backfill.runs)")
        assert cur.fetchone() == (0, 0)


# ---------------------------------------------------------------- 4. dedupe and run ids

def test_rejections_are_recorded_once_and_run_ids_come_from_the_sequence(cluster):
    db = make_db(cluster, chatgen.hostile_chats(), prefix="dedupe")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT nextval('chat_backfill.runs_run_id_seq')")
        (before,) = cur.fetchone()
        first = one_shot(conn, "batch_size => 50")
        first_id = notice_run_id(conn.notices)
        recorded = rejected(conn)
        del conn.notices[:]
        second = one_shot(conn, "batch_size => 50")
        second_id = notice_run_id(conn.notices)
        cur.execute("SELECT nextval('chat_backfill.runs_run_id_seq')")
        (after,) = cur.fetchone()
        again = rejected(conn)
    assert first["messages_rejected"] > 10 and first["chats_skipped"] > 5
    # Same counts, nothing recorded twice.
    assert (second["messages_rejected"], second["chats_skipped"]) == (first["messages_rejected"], first["chats_skipped"])
    assert second["messages_existing"] == first["messages_inserted"] and second["messages_inserted"] == 0
    assert again == recorded, f"{len(again) - len(recorded)} rejections recorded again"
    assert {r[3] for r in recorded} == {first_id}
    # Both run ids were drawn from the sequence, in order (txid_current() would not be).
    assert before < first_id < second_id < after, (before, first_id, second_id, after)
    # A resumable run over the same source and target: its own id, nothing recorded again.
    with cluster.connect(db) as conn:
        call(conn, "batch_size => 50, restart => true")
        status = latest_status(conn)
        assert status["state"] == "finished"
        assert status["run_id"] > after and status["run_id"] not in (first_id, second_id)
        assert status["messages_rejected"] == first["messages_rejected"]
        assert rejected(conn) == recorded


# ---------------------------------------------------------------- 5. chats deleted during a run

# 30 chats of 4 messages, ids in key order = heap order; batch_size 20 makes batches of
# exactly 5 chats: c00-c04, c05-c09, ... Writing c05's rows (batch 2) deletes:
ALREADY_WRITTEN = ["c02"]          # batch 1: its rows are gone by ON DELETE CASCADE
SAME_BATCH = ["c07", "c09"]        # read with c05, before the delete: they vanish
LATER_BATCH = ["c22"]              # batch 5: the one-shot's portal (opened before the delete)
                                   # still reads it; the resumable's next portal does not


def vanishing_chats() -> list[Chat]:
    out = []
    for i in range(30):
        messages = {f"m{j}": {"role": "user" if j % 2 == 0 else "assistant", "content": f"chat {i} message {j}",
                              "timestamp": 1700000000 + 10 * i + j} for j in range(4)}
        out.append(Chat(f"c{i:02d}", "u", json.dumps({"history": {"messages": messages}})))
    return out


def deleted_chats(form, how) -> list[str]:
    """What the application deletes. From another session, not c02 in the one-shot form:
    its chat row is KEY SHARE locked by the one-shot's open transaction (the foreign key
    check of batch 1), so that session would wait for us while we wait for it."""
    if how == "another session" and form == "one-shot":
        return SAME_BATCH + LATER_BATCH
    return ALREADY_WRITTEN + SAME_BATCH + LATER_BATCH


# The trigger waits for this advisory lock, held by the test while another session deletes.
DELETE_LOCK = 8452


def deleting_trigger(form, how) -> str:
    delete = "DELETE FROM chat WHERE id = ANY (%s)" % _array(deleted_chats(form, how))
    if how == "same transaction":
        return _trigger(delete)
    # Another session deletes, and commits, while the batch is being written: the trigger
    # waits on a lock the test holds until that session is done (no dblink needed).
    return _trigger(f"PERFORM pg_advisory_xact_lock({DELETE_LOCK})")


@contextlib.contextmanager
def another_session_deletes(cluster, db, form, how):
    """Around a run: when its trigger waits on DELETE_LOCK, delete from another session,
    commit, and let the run go on."""
    if how != "another session":
        yield
        return
    done = threading.Event()
    failure = []

    def delete_while_it_waits(holder):
        try:
            with cluster.connect(db) as conn, conn.cursor() as cur:
                while not done.is_set():
                    cur.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                                " AND objid = %s", (DELETE_LOCK,))
                    if cur.fetchone()[0]:
                        cur.execute("DELETE FROM chat WHERE id = ANY (%s)", (deleted_chats(form, how),))
                        break
                    time.sleep(0.02)
        except Exception as e:  # noqa: BLE001 - reported by the test
            failure.append(e)
        finally:
            with holder.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s)", (DELETE_LOCK,))

    with cluster.connect(db) as holder:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (DELETE_LOCK,))
        deleter = threading.Thread(target=delete_while_it_waits, args=(holder,))
        deleter.start()
        try:
            yield
        finally:
            done.set()
            deleter.join()
    assert not failure, failure


def _literal(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _array(ids) -> str:
    return "ARRAY[" + ", ".join(_literal(i) for i in ids) + "]"


def _trigger(action: str) -> str:
    return f"""
CREATE FUNCTION app_deletes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.chat_id = 'c05' THEN {action}; END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER app_deletes BEFORE INSERT ON chat_message FOR EACH ROW EXECUTE FUNCTION app_deletes();
"""


@pytest.mark.parametrize("how", ["same transaction", "another session"])
@pytest.mark.parametrize("form", FORMS)
def test_chats_deleted_during_the_run_are_counted_as_vanished(cluster, form, how):
    """The application deletes chats while the backfill writes c05 (a trigger, so the
    moment is exact): c07 and c09 were read in the same batch and their rows now fail the
    foreign key (23503) with the chat gone: counted in chats_vanished, not rejected.
    A chat deleted before it is read is not counted; one deleted after it was written
    loses its rows by the cascade. Everything else is written."""
    chats = vanishing_chats()
    db = make_db(cluster, chats, prefix="vanish")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(deleting_trigger(form, how))
    # force: admission control's trial would fire the deleting trigger before the run (its
    # deletes are rolled back with it, but not another session's).
    extra = "batch_size => 20" + (", force => true" if form == "one-shot" else "")
    with another_session_deletes(cluster, db, form, how):
        result = run_form(cluster, db, form, extra)
    deleted = set(deleted_chats(form, how))
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT id FROM chat")
        assert {r[0] for r in cur.fetchall()} == {c.id for c in chats} - deleted, "the trigger did its deletes"
        assert rejected(conn) == [], "messages of deleted chats are not rejections"
        want = expected_bytes(conn)  # chat_messages() over the chats that remain
        assert len(want) == 4 * (30 - len(deleted))
        assert_same_rows(rows_bytes(conn), want)
    if form == "one-shot":
        read, vanished = result["chats_read"], result["chats_vanished"]
    else:
        assert result["state"] == "finished"
        read, vanished = result["chats_done"], result["chats_vanished"]
    assert result["messages_rejected"] == 0
    # c07 and c09 always vanish; c22 vanishes if it was read (then 30 chats were read).
    unread = 30 - read
    assert unread in (0, 1) and vanished == 3 - unread, (read, vanished)
    # Rows written: everything that remains, plus c02's (written, then cascaded away).
    assert result["messages_inserted"] == len(want) + 4 * len(deleted & set(ALREADY_WRITTEN))
