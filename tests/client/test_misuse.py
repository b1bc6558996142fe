"""Every misuse gives a named SQLSTATE, never an internal error (XX000, with a Rust
backtrace): every argument of every entry point the extension installs is called with NULL
(the others at their defaults, or at a working value where they have none), and each
regclass argument with the oid of a table that is gone. On 0.6.0 a NULL id_column,
user_id_column, chat_column, rows, dry_run or force of backfill_chat_messages() raised XX000
"argument 5 must not be null", and a dangling regclass XX000 instead of 42P01."""

from __future__ import annotations

import psycopg2
import pytest

import chatgen
from conftest import load_chats
from load_sample import TARGET_DDL

# Values for the parameters that have no default.
REQUIRED = {"chat_id": "'c'", "user_id": "'u'", "chat": None}  # chat: typed per overload below
SAMPLE_CHAT = '{"history":{"messages":{"a":{"role":"user","content":"hi"}}}}'


def entry_points(cur) -> list[tuple[str, str, list[tuple[str, str, bool]]]]:
    """(kind, qualified name, [(argument, type, has a default)]) of every function and procedure."""
    cur.execute("""
        SELECT p.prokind, format('%I.%I', p.pronamespace::regnamespace, p.proname),
               array_agg(a.name ORDER BY a.n), array_agg(format_type(a.type, NULL) ORDER BY a.n),
               p.pronargs - p.pronargdefaults
        FROM pg_depend d JOIN pg_proc p ON p.oid = d.objid
        CROSS JOIN LATERAL unnest(p.proargnames[1:p.pronargs], p.proargtypes::oid[]) WITH ORDINALITY AS a(name, type, n)
        WHERE d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'chat_backfill') AND d.deptype = 'e'
          AND d.classid = 'pg_proc'::regclass AND p.prokind IN ('f', 'p') AND p.pronargs > 0
          AND p.prorettype <> 'trigger'::regtype
        GROUP BY p.oid, p.prokind""")
    out = []
    for kind, name, args, types, required in cur.fetchall():
        out.append((kind, name, [(a, t, i >= required) for i, (a, t) in enumerate(zip(args, types))]))
    return out


def call_sql(kind: str, name: str, args, null: str | None = None, given: dict | None = None) -> str:
    parts = []
    for arg, typ, has_default in args:
        if arg == null:
            parts.append(f'"{arg}" => NULL::{typ}')
        elif given and arg in given:
            parts.append(f'"{arg}" => {given[arg]}')
        elif not has_default:
            value = f"'{SAMPLE_CHAT}'" if arg == "chat" else REQUIRED.get(arg, "NULL")
            parts.append(f'"{arg}" => {value}::{typ}')
    call = f"{name}({', '.join(parts)})"
    return f"CALL {call}" if kind == "p" else f"SELECT count(*) FROM {call}"


@pytest.fixture(scope="module")
def misuse_db(cluster):
    db = cluster.create_db("misuse")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        load_chats(conn, chatgen.realistic_chats(seed=3, count=12, content_bytes=(50, 200), messages=(1, 4)))
        cur.execute(TARGET_DDL)
        cur.execute("CREATE TABLE gone (id int)")
        cur.execute("SELECT 'gone'::regclass::oid")
        gone = cur.fetchone()[0]
        cur.execute("DROP TABLE gone")
    return db, gone


def run(cluster, db, sql) -> str | None:
    """The SQLSTATE the statement fails with, or None; each in a fresh session."""
    with cluster.connect(db) as conn, conn.cursor() as cur:
        try:
            cur.execute(sql)
            return None
        except psycopg2.Error as e:
            assert e.pgcode != "XX000", f"{sql}: internal error {e.pgerror}"
            assert "backtrace" not in (e.pgerror or "").lower(), f"{sql}: {e.pgerror}"
            return e.pgcode


def test_every_argument_null_gives_a_default_or_a_named_sqlstate(cluster, misuse_db):
    db, _ = misuse_db
    with cluster.connect(db) as conn, conn.cursor() as cur:
        points = entry_points(cur)
    assert {name for _, name, _ in points} >= {"public.backfill_chat_messages", "public.backfill_chat_messages_resumable",
                                               "public.chat_messages", "public.chat_message_problems",
                                               "chat_backfill.plan", "chat_backfill.verify"}
    calls = 0
    for kind, name, args in points:
        for arg, _, _ in args:
            run(cluster, db, call_sql(kind, name, args, null=arg))
            calls += 1
    assert calls > 60
    # NULL means the default in the one-transaction form, as in the CALL: the run happens.
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("TRUNCATE chat_message")
        cur.execute("SELECT sum(messages_inserted) FROM backfill_chat_messages(id_column => NULL, user_id_column => NULL, "
                    "chat_column => NULL, dry_run => NULL, force => NULL, \"rows\" => NULL)")
        assert cur.fetchone()[0] > 0


def test_a_dangling_regclass_is_42P01(cluster, misuse_db):
    db, gone = misuse_db
    with cluster.connect(db) as conn, conn.cursor() as cur:
        points = entry_points(cur)
    checked = 0
    for kind, name, args in points:
        for arg, typ, _ in args:
            if typ == "regclass":
                failed = run(cluster, db, call_sql(kind, name, args, given={arg: f"{gone}::regclass"}))
                # plan() reports a target it cannot use as its finding, not as an error.
                allowed = ("42P01", None) if (name, arg) == ("chat_backfill.plan", "target") else ("42P01",)
                assert failed in allowed, (name, arg, failed)
                checked += 1
    assert checked >= 6
