"""Attacks on chat_backfill, run the way an attacker would run them, against a real server
(contract 0.2.0, "hardening"). Each test states its attack in SQL, runs it, and asserts the
0.2.0 outcome by SQLSTATE or by the state it leaves behind:

1. search_path hijack: the database owner (not a superuser, CREATE on `public`) plants
   shadows of every function, operator, aggregate and catalog relation the extension's SQL
   might name. Each shadow escalates its owner to SUPERUSER when a superuser runs it. A
   superuser then installs the extension and calls every entry point. No shadow may run.
2. Forged run state: `mallory` (CONNECT only) tries to call the old SECURITY DEFINER
   writers, write `chat_backfill.runs` and `rejected_messages`, read other people's runs,
   and CALL the backfill herself. A role with the rights resumes someone else's run.
3. Silent no-op: mallory holds the runner's advisory lock; `if_busy` decides what a CALL
   does then (error 55P03, skip with a NOTICE, wait, 22023 for anything else).
4. source_filter injection: a filter that smuggles a second statement fails with 42601 and
   runs nothing.
5. Trusted install: a non-superuser database owner installs the extension and runs both
   Alembic examples; with shadows planted first, the install script runs none of them.

Every test builds its own databases and roles (unique names) and drops them at the end.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import subprocess
import threading
import time
import uuid
from types import SimpleNamespace

import psycopg2
import pytest

import chatgen
from compare import COLUMNS, JSON_COLUMNS
from conftest import ROOT, Cluster
from load_sample import TARGET_DDL, copy_chats

NOW = chatgen.NOW
ALEMBIC = ROOT / ".venv/bin/alembic"
EXAMPLES = ROOT / "examples/alembic"


# --------------------------------------------------------------------------------------
# Helpers: connections as any role, with or without a clean search_path; scratch objects.
# --------------------------------------------------------------------------------------

def dsn(cluster: Cluster, db: str, user: str = "postgres", clean: bool = False) -> str:
    """`clean`: search_path = pg_catalog only, so the test's own checks never see the
    shadows in `public` (it overrides ALTER DATABASE ... SET search_path)."""
    d = f"host={cluster.host} port={cluster.port} user={user} dbname={db}"
    return d + " options='-c search_path=pg_catalog'" if clean else d


@contextlib.contextmanager
def connect(cluster: Cluster, db: str, user: str = "postgres", clean: bool = False):
    conn = psycopg2.connect(dsn(cluster, db, user, clean))
    conn.autocommit = True
    try:
        yield conn
    finally:
        conn.close()


def query(cluster, db, sql, params=None, user="postgres", clean=True):
    """One statement on a superuser (or `user`) connection, clean unless told; its rows."""
    with connect(cluster, db, user, clean=clean) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall() if cur.description else None


class Scratch:
    """Roles and databases created by one test, dropped at its end."""

    def __init__(self, cluster: Cluster):
        self.cluster, self.roles, self.dbs = cluster, [], []

    def role(self, prefix: str, attrs: str = "LOGIN") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        query(self.cluster, "postgres", f"CREATE ROLE {name} {attrs}")
        self.roles.append(name)
        return name

    def database(self, prefix: str, owner: str | None = None) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        query(self.cluster, "postgres", f"CREATE DATABASE {name}" + (f" OWNER {owner}" if owner else ""))
        self.dbs.append(name)
        return name

    def close(self):
        for db in self.dbs:
            query(self.cluster, "postgres", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        for role in self.roles:
            query(self.cluster, "postgres", f"DROP ROLE IF EXISTS {role}")


@pytest.fixture
def scratch(cluster):
    s = Scratch(cluster)
    yield s
    s.close()


def expect_sqlstate(cur, sql, sqlstate, params=None):
    """The statement fails with exactly this SQLSTATE; returns the error."""
    with pytest.raises(psycopg2.Error) as err:
        cur.execute(sql, params)
    assert err.value.pgcode == sqlstate, f"{sql!r}: {err.value.pgcode} {err.value.pgerror}"
    return err.value


def denied_or_no_rows(cur, sql, params=None):
    """Either no privilege at all (42501) or row-level security hides every row."""
    try:
        cur.execute(sql, params)
    except psycopg2.Error as e:
        assert e.pgcode == "42501", f"{sql!r}: {e.pgcode} {e.pgerror}"
        return "42501"
    assert cur.rowcount == 0, f"{sql!r} touched {cur.rowcount} row(s)"
    return "0 rows"


def message_rows(cluster, db, table="chat_message") -> dict:
    """The target's rows by id, JSON as text (schema-qualified: the caller may be clean)."""
    cols = ", ".join(f"{c}::text" if c in JSON_COLUMNS else c for c in COLUMNS)
    return {r[0]: r for r in query(cluster, db, f"SELECT {cols} FROM public.{table}")}


def load(cluster, db, chats, id_type="text", ddl=TARGET_DDL, owner="postgres"):
    """chat (id/user_id of `id_type`, as Open WebUI's varchar or as text) and the target."""
    with connect(cluster, db, owner, clean=True) as conn, conn.cursor() as cur:
        cur.execute("SET search_path = public")
        cur.execute(f"CREATE TABLE chat (id {id_type} PRIMARY KEY, user_id {id_type}, title text, chat json)")
        copy_chats(conn, chats)
        if ddl:
            cur.execute(ddl)


def plain_chats():
    return chatgen.realistic_chats(seed=23, count=60, content_bytes=(100, 600), messages=(2, 6))


@pytest.fixture(scope="module")
def plain_expected(cluster):
    """A superuser's one-shot run on a clean database: what every run below must equal."""
    db = cluster.create_db("sec_expected")
    load(cluster, db, plain_chats())
    query(cluster, db, "SELECT count(*) FROM backfill_chat_messages(now => %s)", (NOW,), clean=False)
    rows = message_rows(cluster, db)
    query(cluster, "postgres", f"DROP DATABASE {db} WITH (FORCE)")
    assert len(rows) > 100
    return rows


# ======================================================================================
# 1. search_path hijack
# ======================================================================================

# The attacker's payload. It runs with the privileges of whoever calls a shadow: for an
# ordinary caller it does nothing (the shadow behaves like the real thing, so nobody
# notices); for a superuser it makes the attacker a superuser and leaves a trace (once per
# shadow, to stay fast). The sequence counts every call: nextval survives a rollback of
# the victim's statement.
PAYLOAD_SQL = """
CREATE TABLE public.hijack_log (what text, by_role name DEFAULT current_user);
CREATE SEQUENCE public.hijack_seq;
GRANT ALL ON public.hijack_log, public.hijack_seq TO PUBLIC;
CREATE FUNCTION public.hijack(what text) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        PERFORM nextval('public.hijack_seq');
        IF NOT EXISTS (SELECT FROM public.hijack_log l WHERE l.what = hijack.what) THEN
            INSERT INTO public.hijack_log (what) VALUES (what);
            ALTER ROLE {attacker} SUPERUSER;
        END IF;
    END IF;
    RETURN true;
END $$;
"""

# Every shadow is `public.<name>(<args>)`: it calls the payload, then does what the real
# pg_catalog function does, so the victim's results stay right. Some win even with the
# default search_path (pg_catalog searched first): format_type(oid, text) beats
# format_type(oid, integer) for a NULL literal, nextval(text) beats nextval(regclass) for a
# string literal, an operator or aggregate on varchar beats the text one (exact match).
# The rest win once the owner runs ALTER DATABASE ... SET search_path = public, pg_catalog.
FUNCTION_SHADOWS = [
    # (signature, return type, what the real function returns)
    ("format_type(oid, text)", "text", "pg_catalog.format_type($1, $2::pg_catalog.int4)"),
    ("to_regclass(text)", "regclass", "pg_catalog.to_regclass($1)"),
    ("txid_current()", "bigint", "pg_catalog.txid_current()"),
    ("nextval(text)", "bigint", "pg_catalog.nextval($1::pg_catalog.regclass)"),
    ("set_config(text, text, boolean)", "text", "pg_catalog.set_config($1, $2, $3)"),
    ("pg_try_advisory_lock(bigint)", "boolean", "pg_catalog.pg_try_advisory_lock($1)"),
    ("pg_advisory_lock(bigint)", "void", "pg_catalog.pg_advisory_lock($1)"),
    ("pg_advisory_unlock(bigint)", "boolean", "pg_catalog.pg_advisory_unlock($1)"),
    ("quote_ident(text)", "text", "pg_catalog.quote_ident($1)"),
    ("clock_timestamp()", "timestamptz", "pg_catalog.clock_timestamp()"),
    ("now()", "timestamptz", "pg_catalog.now()"),
    ("current_setting(text)", "text", "pg_catalog.current_setting($1)"),
    ("pg_backend_pid()", "integer", "pg_catalog.pg_backend_pid()"),
    ("has_table_privilege(oid, text)", "boolean", "pg_catalog.has_table_privilege($1, $2)"),
    ("has_table_privilege(text, text)", "boolean", "pg_catalog.has_table_privilege($1, $2)"),
    ("has_table_privilege(regclass, text)", "boolean", "pg_catalog.has_table_privilege($1::pg_catalog.oid, $2)"),
]
# No SET search_path here: to_regclass, nextval(text), has_table_privilege(text, ...) and
# current_setting must see the caller's search_path to stay transparent.
SHADOW_FUNCTION_SQL = """
CREATE FUNCTION public.{signature} RETURNS {returns} LANGUAGE plpgsql AS $$
BEGIN
    PERFORM public.hijack('{signature}');
    {return_} {real};
    {void_return}
END $$;
"""
SHADOW_UNNEST_SQL = """
CREATE FUNCTION public.unnest(anyarray) RETURNS SETOF anyelement
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    PERFORM public.hijack('unnest(anyarray)');
    RETURN QUERY SELECT unnest($1);
END $$;
"""
# count(*), max(varchar) and max(text): aggregates whose transition function calls the payload.
SHADOW_AGGREGATE_SQL = """
CREATE FUNCTION public.shadow_count_step(bigint) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN PERFORM public.hijack('count(*)'); RETURN $1 + 1; END $$;
CREATE AGGREGATE public.count(*) (sfunc = public.shadow_count_step, stype = bigint, initcond = '0');

CREATE FUNCTION public.shadow_max_step(varchar, varchar) RETURNS varchar
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    PERFORM public.hijack('max(varchar)');
    RETURN CASE WHEN $1 IS NULL OR $2 > $1 THEN $2 ELSE $1 END;
END $$;
CREATE AGGREGATE public.max(varchar) (sfunc = public.shadow_max_step, stype = varchar);

CREATE FUNCTION public.shadow_max_step(text, text) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    PERFORM public.hijack('max(text)');
    RETURN CASE WHEN $1 IS NULL OR $2 > $1 THEN $2 ELSE $1 END;
END $$;
CREATE AGGREGATE public.max(text) (sfunc = public.shadow_max_step, stype = text);
"""
# Operators: comparison operators on every type the extension compares, LIKE / NOT LIKE
# (the default source_filter is `user_id NOT LIKE 'shared-%'`), and + (counters).
COMPARISONS = ["=", "<>", ">", "<=", "<", ">="]
OPERATOR_SHADOWS = (
    [(op, t, t, "boolean") for op in COMPARISONS
     for t in ["varchar", "text", "bigint", "oid", "integer", "smallint", "name"]]
    + [(op, t, t, "boolean") for op in ["~~", "!~~"] for t in ["varchar", "text"]]
    + [("=", "name", "text", "boolean")]  # pg_attribute.attname = $1::text
    + [("+", t, t, t) for t in ["bigint", "integer"]]
)
SHADOW_OPERATOR_SQL = """
CREATE FUNCTION public.shadow_op_{n}({left}, {right}) RETURNS {returns}
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN PERFORM public.hijack('{op}({left},{right})'); RETURN $1 {op} $2; END $$;
CREATE OPERATOR public.{op} (leftarg = {left}, rightarg = {right}, function = public.shadow_op_{n});
"""
# Catalog relations, for SQL that names them unqualified (public-first search_path).
CATALOG_SHADOWS = {
    "pg_attribute": "attrelid, attname, atttypid, attnum, attisdropped, attnotnull, atttypmod",
    "pg_index": "*", "pg_class": "*", "pg_namespace": "*", "pg_type": "*", "pg_proc": "*",
    "pg_locks": "*", "pg_database": "*", "pg_roles": "*", "pg_extension": "*",
    "pg_stat_activity": "*", "pg_constraint": "*", "pg_trigger": "*", "pg_rewrite": "*",
    "pg_policy": "*", "pg_inherits": "*",
}
SHADOW_CATALOG_SQL = """
CREATE VIEW public.{name} AS SELECT {columns} FROM pg_catalog.{name} WHERE (SELECT public.hijack('{name}'));
"""


def plant_shadows_sql(attacker: str) -> str:
    """The whole attack, as the database owner runs it."""
    parts = [PAYLOAD_SQL.format(attacker=attacker)]
    for signature, returns, real in FUNCTION_SHADOWS:
        void = returns == "void"
        parts.append(SHADOW_FUNCTION_SQL.format(
            signature=signature, returns=returns, real=real,
            return_="PERFORM" if void else "RETURN", void_return="RETURN;" if void else ""))
    parts.append(SHADOW_UNNEST_SQL)
    parts.append(SHADOW_AGGREGATE_SQL)
    for n, (op, left, right, returns) in enumerate(OPERATOR_SHADOWS):
        parts.append(SHADOW_OPERATOR_SQL.format(n=n, op=op, left=left, right=right, returns=returns))
    for name, columns in CATALOG_SHADOWS.items():
        parts.append(SHADOW_CATALOG_SQL.format(name=name, columns=columns))
    return "\n".join(parts)


def assert_no_shadow_ran(cluster, db, attacker):
    """Checked on a clean connection: the attacker is not a superuser, the payload never
    ran as one (not even in a transaction that rolled back)."""
    log = query(cluster, db, "SELECT what, by_role FROM public.hijack_log ORDER BY 1")
    [(calls, called)] = query(cluster, db, "SELECT last_value, is_called FROM public.hijack_seq")
    [(is_super,)] = query(cluster, db, "SELECT rolsuper FROM pg_roles WHERE rolname = %s", (attacker,))
    assert (log, called, is_super) == ([], False, False), \
        f"shadows ran as a superuser ({calls if called else 0} calls): {log}; attacker superuser: {is_super}"


# The chats of the hijack test: realistic ones (some `shared-`), plus a message the target's
# CHECK refuses (a failed COPY, then the INSERT path and bisection), a message that cannot be
# stored (a recorded rejection without an INSERT) and an unusable chat.
HIJACK_TARGET_DDL = TARGET_DDL + """
ALTER TABLE chat_message ADD CONSTRAINT no_boom CHECK (role <> 'boom');
CREATE TABLE cm_oneshot (LIKE chat_message INCLUDING ALL);
CREATE TABLE cm_app (LIKE chat_message INCLUDING ALL);
ALTER TABLE cm_app ADD COLUMN meta json, ADD COLUMN context_summary text;
"""


def hijack_chats():
    chats = chatgen.realistic_chats(seed=11, count=30, content_bytes=(100, 400), messages=(2, 5))
    return chats + [
        chatgen.Chat("zz-boom", "user-1", '{"history":{"messages":{"a":{"role":"boom","timestamp":1700000000},'
                                          '"b":{"role":"user","content":"ok","timestamp":1700000000}}}}'),
        chatgen.Chat("zz-object-role", "user-1", '{"history":{"messages":{"a":{"role":{"x":1}}}}}'),
        chatgen.Chat("zz-list", "user-1", "[1,2]"),
        chatgen.Chat("zz-shared", "shared-zz", '{"history":{"messages":{"a":{"role":"user"}}}}'),
    ]


# What the superuser victim runs, in this order: every public entry point and every path
# of the committing procedure (new run, resume, finished, restart; lock_timeout runs
# set_config). Its own SQL names nothing a shadow could catch (casts only).
VICTIM_STATEMENTS = [
    "CREATE EXTENSION chat_backfill",
    f"SELECT * FROM backfill_chat_messages(target => 'cm_oneshot', batch_size => 25, now => {NOW})",
    f"SELECT * FROM backfill_chat_messages(batch_size => 25, now => {NOW}, dry_run => true)",
    f"CALL backfill_chat_messages_resumable(batch_size => 25, now => {NOW}, max_runtime => '0', lock_timeout => '5s')",
    f"CALL backfill_chat_messages_resumable(batch_size => 25, now => {NOW}, lock_timeout => '5s')",
    f"CALL backfill_chat_messages_resumable(batch_size => 25, now => {NOW})",
    f"CALL backfill_chat_messages_resumable(batch_size => 25, now => {NOW}, restart => true)",
    f"SELECT * FROM backfill_chat_messages(batch_size => 25, now => {NOW})",
    "SELECT * FROM chat_backfill.status",
    f"CALL backfill_chat_messages_resumable(target => 'cm_app', batch_size => 25, now => {NOW}, rows => 'app')",
    "SELECT * FROM chat_backfill.verify()",
    "SELECT * FROM chat_backfill.verify(target => 'cm_app', rows => 'app')",
]
FUNCTION_QUERIES = {
    form: f"SELECT c.id::text, m.* FROM public.chat c, chat_messages(c.id::text, c.user_id::text, c.chat{cast}, {NOW}) m"
    for form, cast in [("json", ""), ("jsonb", "::jsonb"), ("text", "::text")]
} | {
    "problems " + form: f"SELECT c.id::text, p.* FROM public.chat c, chat_message_problems(c.id::text, c.chat{cast}) p"
    for form, cast in [("json", ""), ("jsonb", "::jsonb"), ("text", "::text")]
}


def function_results(conn) -> dict:
    out = {}
    with conn.cursor() as cur:
        for name, sql in FUNCTION_QUERIES.items():
            cur.execute(sql)
            out[name] = sorted(tuple(str(v) for v in row) for row in cur.fetchall())
    return out


REJECTIONS = "SELECT DISTINCT chat_id, message_key, sqlstate FROM chat_backfill.rejected_messages ORDER BY 1, 2, 3"


@pytest.fixture(scope="module")
def hijack_expected(cluster):
    """The same data and calls on a database nobody attacked."""
    db = cluster.create_db("sec_hijack_expected")
    load(cluster, db, hijack_chats(), ddl=HIJACK_TARGET_DDL)
    with connect(cluster, db) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT * FROM backfill_chat_messages(batch_size => 25, now => {NOW})")
        cur.execute(f"SELECT * FROM backfill_chat_messages(target => 'cm_app', batch_size => 25, now => {NOW}, rows => 'app')")
        functions = function_results(conn)
    want = (message_rows(cluster, db), query(cluster, db, REJECTIONS), functions, message_rows(cluster, db, "cm_app"))
    query(cluster, "postgres", f"DROP DATABASE {db} WITH (FORCE)")
    assert want[1], "the data exercises the rejection path"
    return want


@pytest.mark.parametrize("search_path", ["default", "public, pg_catalog"])
@pytest.mark.parametrize("id_type", ["text", "varchar"])
def test_search_path_hijack(cluster, scratch, hijack_expected, id_type, search_path):
    """owner_x owns the database (so it owns `public`) and plants shadows there:

        CREATE FUNCTION public.format_type(oid, text) RETURNS text ... ALTER ROLE owner_x SUPERUSER ...
        CREATE OPERATOR public.!~~ (leftarg = varchar, rightarg = varchar, function = ...);
        CREATE AGGREGATE public.max(varchar) (...);  ... (see plant_shadows_sql)
        ALTER DATABASE db SET search_path = public, pg_catalog;   -- one variant

    then a superuser installs the extension and calls every entry point. Contract: every
    SQL string the extension runs or installs is schema-qualified, so no shadow runs."""
    rows_want, rejections_want, functions_want, app_rows_want = hijack_expected
    attacker = scratch.role("owner_x", "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE")
    db = scratch.database("sec_hijack", owner=attacker)
    # The application's tables (a superuser's, so only the extension's SQL can reach a shadow).
    load(cluster, db, hijack_chats(), id_type=id_type, ddl=HIJACK_TARGET_DDL)
    with connect(cluster, db, attacker, clean=True) as conn, conn.cursor() as cur:
        cur.execute(plant_shadows_sql(attacker))
        if search_path != "default":
            cur.execute(f"ALTER DATABASE {db} SET search_path = {search_path}")
    assert query(cluster, db, "SELECT rolsuper FROM pg_roles WHERE rolname = %s", (attacker,)) == [(False,)]

    # The victim: a superuser session with the database's search_path.
    with connect(cluster, db) as victim, victim.cursor() as cur:
        cur.execute("SHOW search_path")
        assert cur.fetchone()[0] == ('"$user", public' if search_path == "default" else search_path)
        for statement in VICTIM_STATEMENTS:
            cur.execute(statement)
        functions_got = function_results(victim)

    assert_no_shadow_ran(cluster, db, attacker)
    # And the backfill is still right, in both forms and every function.
    assert message_rows(cluster, db) == rows_want
    assert message_rows(cluster, db, "cm_oneshot") == rows_want
    assert message_rows(cluster, db, "cm_app") == app_rows_want and app_rows_want
    assert query(cluster, db, REJECTIONS) == rejections_want
    assert functions_got == functions_want
    assert query(cluster, db, "SELECT state FROM chat_backfill.status ORDER BY run_id") == [("finished",)] * 3


# ======================================================================================
# 2. Forged run state
# ======================================================================================

OLD_WRITERS = ["run_started", "run_resumed", "run_checkpoint", "run_status", "run_finished", "record_rejections"]
RUN_ROW = "SELECT r::text FROM chat_backfill.runs r WHERE run_id = %s"


@pytest.fixture
def victim_run(cluster, scratch):
    """alice (SELECT on chat, INSERT and SELECT (id) on chat_message) starts a run that stops after one
    batch. bob has the same rights. reader may only SELECT chat (an analytics role);
    mallory may only connect."""
    db = scratch.database("sec_runs")
    load(cluster, db, plain_chats())
    query(cluster, db, "CREATE EXTENSION chat_backfill", clean=False)
    v = SimpleNamespace(db=db, **{r: scratch.role(r) for r in ["alice", "bob", "reader", "mallory"]})
    for r in (v.alice, v.bob):
        query(cluster, db, f"GRANT SELECT ON public.chat TO {r}; GRANT INSERT, SELECT (id) ON public.chat_message TO {r}")
    query(cluster, db, f"GRANT SELECT ON public.chat TO {v.reader}")
    with connect(cluster, db, v.alice) as conn, conn.cursor() as cur:
        cur.execute(f"CALL backfill_chat_messages_resumable(batch_size => 40, now => {NOW}, max_runtime => '0')")
    [(v.run_id, state)] = query(cluster, db, "SELECT run_id, state FROM chat_backfill.status")
    assert state == "stopped"
    v.row = query(cluster, db, RUN_ROW, (v.run_id,))
    return v


def assert_run_unchanged(cluster, v):
    """alice's run, byte for byte, and no other run or rejection appeared."""
    assert query(cluster, v.db, RUN_ROW, (v.run_id,)) == v.row, "alice's run row changed"
    assert query(cluster, v.db, "SELECT count(*) FROM chat_backfill.runs") == [(1,)]
    assert query(cluster, v.db, "SELECT count(*) FROM chat_backfill.rejected_messages") == [(0,)]


def test_forged_state_old_security_definer_writers_are_gone(cluster, victim_run):
    """0.1.0 let anyone finish anyone's run, so the next CALL silently does nothing:

        SELECT chat_backfill.run_finished(<alice's run_id>);
        SELECT chat_backfill.run_checkpoint(<run_id>, 'zzzz', 0, 0, 0, 0, 0, 0, 0);  -- skip every chat
        SELECT chat_backfill.record_rejections(<run_id>, 'chat', 'chat_message', ...); -- forge rejections
    """
    v = victim_run
    with connect(cluster, v.db, v.mallory) as conn, conn.cursor() as cur:
        for attack in [
            f"SELECT chat_backfill.run_checkpoint({v.run_id}, 'zzzz', 0, 0, 0, 0, 0, 0, 0)",
            f"SELECT chat_backfill.run_status({v.run_id}, 'stopped', 'forged')",
            f"SELECT chat_backfill.run_finished({v.run_id})",
            "SELECT chat_backfill.run_started('chat'::regclass, 'chat_message'::regclass, 'chat', 'chat_message',"
            " 'zzzz', 0, 0, NULL)",
            f"SELECT chat_backfill.record_rejections({v.run_id}, 'chat', 'chat_message', '{{x}}', '{{k}}', '{{x-k}}',"
            " '{00000}', '{forged}', '{forged}', ARRAY['{}'::json])",
        ]:
            with contextlib.suppress(psycopg2.Error):  # judged below, by the catalog and the row
                cur.execute(attack)
    # The writers must not exist, or at least not be executable by mallory.
    executable = query(cluster, v.db, """
        SELECT p.oid::regprocedure::text FROM pg_proc p
        WHERE p.pronamespace = 'chat_backfill'::regnamespace AND p.proname = ANY (%s)
          AND has_function_privilege(%s, p.oid, 'EXECUTE')""", (OLD_WRITERS, v.mallory))
    assert executable == [], f"mallory can execute {executable}"
    assert_run_unchanged(cluster, v)


@pytest.mark.parametrize("attacker", ["mallory", "reader"])
def test_forged_state_cannot_write_runs(cluster, victim_run, attacker):
    """Direct writes to the run state, each of which would end or derail alice's backfill,
    by mallory (CONNECT only) and by reader (who may see the run, not advance it):

        INSERT INTO chat_backfill.runs (...) VALUES ('chat'::regclass, 'chat_message'::regclass, ..., 'finished');
        UPDATE chat_backfill.runs SET status = 'finished', last_key = 'zzzz';
        DELETE FROM chat_backfill.runs;
        TRUNCATE chat_backfill.runs;
        SELECT setval('chat_backfill.runs_run_id_seq', 1);   -- the next run_id collides
    """
    v = victim_run
    with connect(cluster, v.db, getattr(v, attacker)) as conn, conn.cursor() as cur:
        expect_sqlstate(cur, """
            INSERT INTO chat_backfill.runs (source_oid, target_oid, source, target, high_water, total_chats, now, status)
            VALUES ('chat'::regclass, 'chat_message'::regclass, 'chat', 'chat_message', 'zzzz', 0, 0, 'finished')""",
            "42501")
        denied_or_no_rows(cur, f"UPDATE chat_backfill.runs SET status = 'finished', last_key = 'zzzz' WHERE run_id = {v.run_id}")
        denied_or_no_rows(cur, "UPDATE chat_backfill.runs SET status = 'finished'")
        denied_or_no_rows(cur, f"DELETE FROM chat_backfill.runs WHERE run_id = {v.run_id}")
        expect_sqlstate(cur, "TRUNCATE chat_backfill.runs", "42501")
        expect_sqlstate(cur, "SELECT setval('chat_backfill.runs_run_id_seq', 1)", "42501")
    assert_run_unchanged(cluster, v)


@pytest.mark.parametrize("attacker", ["mallory", "reader"])
def test_forged_state_cannot_touch_rejected_messages(cluster, victim_run, attacker):
    """rejected_messages holds users' chat content, and a forged row is a false report:

        INSERT INTO chat_backfill.rejected_messages (run_id, source, target, chat_id, sqlstate, error) VALUES (...);
        SELECT * FROM chat_backfill.rejected_messages;
    """
    v = victim_run
    has_oids = query(cluster, v.db, "SELECT count(*) FROM pg_attribute WHERE attrelid = "
                     "'chat_backfill.rejected_messages'::regclass AND attname IN ('source_oid', 'target_oid')")
    with connect(cluster, v.db, getattr(v, attacker)) as conn, conn.cursor() as cur:
        expect_sqlstate(cur, f"""
            INSERT INTO chat_backfill.rejected_messages (run_id, source, target, chat_id, sqlstate, error)
            VALUES ({v.run_id}, 'chat', 'chat_message', 'x', '00000', 'forged')""", "42501")
        if has_oids == [(2,)]:  # 0.2.0: naming alice's tables explicitly does not help either
            expect_sqlstate(cur, f"""
                INSERT INTO chat_backfill.rejected_messages
                    (run_id, source, target, source_oid, target_oid, chat_id, sqlstate, error)
                VALUES ({v.run_id}, 'chat', 'chat_message', 'chat'::regclass, 'chat_message'::regclass,
                        'x', '00000', 'forged')""", "42501")
    # Rejections hold chat content: a role sees only those of sources it can read (whose
    # content it could read there anyway): mallory none, reader chat's.
    [(visible,)] = query(cluster, v.db, "SELECT count(*) FROM chat_backfill.rejected_messages",
                         user=getattr(v, attacker))
    [(of_chat,)] = query(cluster, v.db, "SELECT count(*) FROM chat_backfill.rejected_messages "
                                        "WHERE source_oid = 'public.chat'::regclass")
    assert visible == (of_chat if attacker == "reader" else 0)
    assert_run_unchanged(cluster, v)


def test_forged_state_through_a_table_of_ones_own(cluster, victim_run):
    """The policies check the caller's rights on the tables a row's oids name. Any role can
    make a table it has every right on (a temp table); with it, it must still not be able to
    add a row that claims to be about alice's tables or her run:

        CREATE TEMP TABLE t (x int);
        INSERT INTO chat_backfill.runs (source_oid, target_oid, source, target, ...)
        VALUES ('t'::regclass, 't'::regclass, 'public.chat', 'public.chat_message', ..., 'stopped');
        INSERT INTO chat_backfill.rejected_messages (run_id, source_oid, target_oid, ...)
        VALUES (<alice's run id>, 't'::regclass, 't'::regclass, ...);
    """
    v = victim_run
    with connect(cluster, v.db, v.mallory) as conn, conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE t (x int)")
        expect_sqlstate(cur, """
            INSERT INTO chat_backfill.runs (source_oid, target_oid, source, target, high_water, total_chats, now, status)
            VALUES ('t'::regclass, 't'::regclass, 'public.chat', 'public.chat_message', 'zzz', 1, 0, 'stopped')""",
                        "42501")
        expect_sqlstate(cur, f"""
            INSERT INTO chat_backfill.rejected_messages
                (run_id, source, target, source_oid, target_oid, chat_id, sqlstate, error, message)
            SELECT {v.run_id}, chat_backfill.table_name('t'::regclass), chat_backfill.table_name('t'::regclass),
                   't'::regclass, 't'::regclass, 'c1', '42804', 'forged', '{{"role": "evil"}}'""", "42501")
    assert_run_unchanged(cluster, v)


def test_a_decoy_rejection_cannot_hide_a_real_one(cluster, scratch):
    """A role that may write the target but not read the source records a rejection for the
    same target, chat, message and SQLSTATE before the real run (through a table of its own
    as the source); the real rejection must still be recorded, under the real run's id."""
    db = scratch.database("sec_decoy")
    load(cluster, db, [chatgen.Chat("c2", "u", '{"history":{"messages":{"m2":{"role":{"a":1}}}}}')])
    query(cluster, db, "CREATE EXTENSION chat_backfill", clean=False)
    writer = scratch.role("writer")
    query(cluster, db, f"GRANT INSERT ON public.chat_message TO {writer}")
    with connect(cluster, db, writer) as conn, conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE t (x int)")
        cur.execute("SELECT nextval('chat_backfill.runs_run_id_seq')")
        (decoy_run,) = cur.fetchone()
        cur.execute("""
            INSERT INTO chat_backfill.rejected_messages
                (run_id, source, target, source_oid, target_oid, chat_id, message_key, message_id, sqlstate, error)
            VALUES (%s, chat_backfill.table_name('t'::regclass), 'public.chat_message', 't'::regclass,
                    'chat_message'::regclass, 'c2', 'm2', 'c2-m2', '42804', 'decoy')""", (decoy_run,))
        with connect(cluster, db) as owner, owner.cursor() as oc:
            oc.execute("SELECT sum(messages_rejected) FROM backfill_chat_messages(now => %s)", (NOW,))
            assert oc.fetchone() == (1,)
            oc.execute("SELECT run_id, error FROM chat_backfill.rejected_messages WHERE source_oid = 'chat'::regclass")
            [(run_id, error)] = oc.fetchall()
    assert run_id != decoy_run and error.startswith("cannot be stored: role")


def test_forged_state_runs_are_invisible_without_select_on_the_source(cluster, victim_run):
    """0.1.0 showed every run to PUBLIC, with its source_filter and chat ids (last_key,
    high_water):

        SELECT * FROM chat_backfill.runs;
        SELECT * FROM chat_backfill.status;
    """
    v = victim_run
    with connect(cluster, v.db, v.mallory) as conn, conn.cursor() as cur:
        for sql in ["SELECT * FROM chat_backfill.runs", "SELECT * FROM chat_backfill.status"]:
            try:
                cur.execute(sql)
                assert cur.fetchall() == [], f"mallory sees: {sql}"
            except psycopg2.Error as e:  # no SELECT at all is as good as no rows
                assert e.pgcode == "42501", e.pgerror
    # Control: whoever can SELECT the source does see the run.
    for role in (v.alice, v.reader):
        with connect(cluster, v.db, role) as conn, conn.cursor() as cur:
            cur.execute("SELECT run_id FROM chat_backfill.status")
            assert cur.fetchall() == [(v.run_id,)]


def test_a_role_with_the_rights_resumes_someone_elses_run(cluster, victim_run, plain_expected):
    """bob has SELECT on chat and INSERT on chat_message: he may resume alice's run, and the
    run still says who started it."""
    v = victim_run
    with connect(cluster, v.db, v.bob) as conn, conn.cursor() as cur:
        cur.execute(f"CALL backfill_chat_messages_resumable(batch_size => 40, now => {NOW})")
    assert query(cluster, v.db, "SELECT run_id, state, started_by FROM chat_backfill.status") == \
        [(v.run_id, "finished", v.alice)]
    assert message_rows(cluster, v.db) == plain_expected


@pytest.mark.parametrize("attacker", ["mallory", "reader"])
def test_call_without_rights_fails_42501_and_changes_nothing(cluster, victim_run, attacker):
    """mallory (no rights) and reader (SELECT on chat, no INSERT on chat_message) run the
    backfill themselves. 0.1.0 marked alice's stopped run as running (clearing its status
    and last_error) before failing:

        CALL backfill_chat_messages_resumable();
        CALL backfill_chat_messages_resumable(restart => true);
        SELECT * FROM backfill_chat_messages();
    """
    v = victim_run
    rows_before = message_rows(cluster, v.db)
    with connect(cluster, v.db, getattr(v, attacker)) as conn, conn.cursor() as cur:
        expect_sqlstate(cur, "CALL backfill_chat_messages_resumable()", "42501")
        expect_sqlstate(cur, "CALL backfill_chat_messages_resumable(restart => true)", "42501")
        expect_sqlstate(cur, "SELECT * FROM backfill_chat_messages()", "42501")
    assert_run_unchanged(cluster, v)
    assert message_rows(cluster, v.db) == rows_before
    assert query(cluster, v.db, "SELECT state FROM chat_backfill.status") == [("stopped",)]


# ======================================================================================
# 3. Silent no-op: someone else holds the runner's lock
# ======================================================================================

# Anyone may take any advisory lock. This is the runner's key.
LOCK_KEY_SQL = "SELECT ('chat'::regclass::oid::bigint << 32) | 'chat_message'::regclass::oid::bigint"


@pytest.fixture
def lock_held(cluster, scratch):
    """mallory (CONNECT only) holds the runner's lock in a session she keeps open:

        SELECT pg_advisory_lock((source_oid::bigint << 32) | target_oid::bigint);

    Returns (db, mallory's connection, key)."""
    db = scratch.database("sec_lock")
    load(cluster, db, plain_chats())
    query(cluster, db, "CREATE EXTENSION chat_backfill", clean=False)
    mallory = scratch.role("mallory")
    conn = psycopg2.connect(dsn(cluster, db, mallory))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(LOCK_KEY_SQL)
        key = cur.fetchone()[0]
        cur.execute("SELECT pg_advisory_lock(%s)", (key,))
    try:
        yield db, conn, key
    finally:
        conn.close()


def nothing_written(cluster, db):
    assert query(cluster, db, "SELECT count(*) FROM public.chat_message") == [(0,)]
    assert query(cluster, db, "SELECT count(*) FROM chat_backfill.runs") == [(0,)]


def test_busy_if_busy_error_fails_55P03(cluster, lock_held):
    db, _, _ = lock_held
    with connect(cluster, db) as conn, conn.cursor() as cur:
        err = expect_sqlstate(cur, f"CALL backfill_chat_messages_resumable(now => {NOW}, if_busy => 'error')", "55P03")
        assert err.diag.message_hint, "55P03 comes with a hint"
    nothing_written(cluster, db)


def test_busy_skip_returns_with_a_notice_and_writes_nothing(cluster, lock_held):
    """The attack on 0.1.0: the migration 'succeeds' and backfills nothing. The default
    stays 'skip' (pg_cron ticks overlap); it must at least say so."""
    db, _, _ = lock_held
    for call in [f"CALL backfill_chat_messages_resumable(now => {NOW})",
                 f"CALL backfill_chat_messages_resumable(now => {NOW}, if_busy => 'skip')"]:
        with connect(cluster, db) as conn, conn.cursor() as cur:
            cur.execute(call)
            assert conn.notices, f"{call}: no NOTICE"
        nothing_written(cluster, db)


def test_busy_wait_blocks_until_the_lock_is_released(cluster, lock_held, plain_expected):
    db, mallory, key = lock_held
    release = threading.Timer(1.0, lambda: mallory.cursor().execute("SELECT pg_advisory_unlock(%s)", (key,)))
    with connect(cluster, db) as conn, conn.cursor() as cur:
        cur.execute("SET statement_timeout = '30s'")  # a broken 'wait' must not hang the suite
        started = time.monotonic()
        release.start()
        try:
            cur.execute(f"CALL backfill_chat_messages_resumable(now => {NOW}, if_busy => 'wait')")
        finally:
            release.join()
        waited = time.monotonic() - started
    assert waited >= 0.9, f"returned after {waited:.2f}s, before the lock was released"
    assert query(cluster, db, "SELECT state FROM chat_backfill.status") == [("finished",)]
    assert message_rows(cluster, db) == plain_expected


def test_busy_wait_is_interruptible(cluster, lock_held):
    """'wait' waits interruptibly: statement_timeout ends it, nothing written."""
    db, _, _ = lock_held
    with connect(cluster, db) as conn, conn.cursor() as cur:
        cur.execute("SET statement_timeout = '500ms'")
        expect_sqlstate(cur, f"CALL backfill_chat_messages_resumable(now => {NOW}, if_busy => 'wait')", "57014")
    nothing_written(cluster, db)


@pytest.mark.parametrize("busy", [True, False], ids=["lock held", "lock free"])
def test_busy_bogus_value_fails_22023(cluster, lock_held, busy):
    db, mallory, key = lock_held
    if not busy:
        mallory.cursor().execute("SELECT pg_advisory_unlock(%s)", (key,))
    with connect(cluster, db) as conn, conn.cursor() as cur:
        expect_sqlstate(cur, f"CALL backfill_chat_messages_resumable(now => {NOW}, if_busy => 'bogus')", "22023")
    nothing_written(cluster, db)


# ======================================================================================
# 4. source_filter injection
# ======================================================================================

INJECTIONS = [
    "true; CREATE TABLE pwned(); SELECT true",
    "true) ; CREATE TABLE pwned(); SELECT (true",
    # Shaped so that, pasted into `SELECT max(id)::text, count(*) FROM chat WHERE (...)`,
    # the last statement still returns what the caller reads: 0.1.0's CALL ran all three
    # statements and committed `pwned` (and a 'running' run) before its next query failed.
    "true) ; CREATE TABLE pwned(); SELECT max(id)::text, count(*) FROM chat WHERE (true",
]
# One statement, but not one expression: spliced into `WHERE (filter) AND (key > $1 ...)` they
# would switch off the committing form's keyset condition (it then reads forever) or cut it
# off with a comment.
ESCAPES = ["true) OR (true", "true) --", "true) OR true OR (true"]
FORMS = {
    "one-shot": "SELECT * FROM backfill_chat_messages(now => %(now)s, source_filter => %(filter)s)",
    "resumable": "CALL backfill_chat_messages_resumable(now => %(now)s, source_filter => %(filter)s)",
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("injection", INJECTIONS)
def test_source_filter_with_a_second_statement_fails_42601(cluster, scratch, injection, form):
    db = scratch.database("sec_filter")
    load(cluster, db, chatgen.realistic_chats(seed=3, count=5, content_bytes=(50, 100), messages=(1, 3)))
    query(cluster, db, "CREATE EXTENSION chat_backfill", clean=False)
    with connect(cluster, db) as conn, conn.cursor() as cur:
        expect_sqlstate(cur, FORMS[form], "42601", {"now": NOW, "filter": injection})
    assert query(cluster, db, "SELECT to_regclass('public.pwned')") == [(None,)], "the injected statement ran"
    nothing_written(cluster, db)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("escape", ESCAPES)
def test_source_filter_that_escapes_its_parentheses_fails_42601(cluster, scratch, escape, form):
    db = scratch.database("sec_escape")
    load(cluster, db, chatgen.realistic_chats(seed=3, count=5, content_bytes=(50, 100), messages=(1, 3)))
    query(cluster, db, "CREATE EXTENSION chat_backfill", clean=False)
    with connect(cluster, db) as conn, conn.cursor() as cur:
        cur.execute("SET statement_timeout = '20s'")  # were it accepted, the CALL would never end
        expect_sqlstate(cur, FORMS[form], "42601", {"now": NOW, "filter": escape})
    nothing_written(cluster, db)


# ======================================================================================
# 5. Trusted install by a non-superuser database owner
# ======================================================================================

def app_database(cluster, scratch, prefix):
    """A database owned by an ordinary role (no SUPERUSER, no CREATEDB), which owns the
    application's `chat` table, as an Open WebUI installation's role does."""
    owner = scratch.role("owner", "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE")
    db = scratch.database(prefix, owner=owner)
    load(cluster, db, plain_chats(), ddl=None, owner=owner)
    return db, owner


def alembic_upgrade(cluster, db, owner, style, tmp_path):
    """The real Alembic CLI, as the owner. committing/ is the ini's default style, run as its
    header says (from examples/alembic); transactional/ needs version_locations changed,
    so a copy of the ini with absolute paths selects it."""
    ini = EXAMPLES / "alembic.ini"
    if style != "committing":
        cfg = configparser.ConfigParser(interpolation=None)
        cfg.read(ini)
        cfg["alembic"]["script_location"] = str(EXAMPLES)
        cfg["alembic"]["version_locations"] = str(EXAMPLES / style)
        ini = tmp_path / f"alembic_{style}.ini"
        with open(ini, "w") as f:
            cfg.write(f)
    env = dict(os.environ, DATABASE_URL=f"postgresql://{owner}@/{db}?host={cluster.host}&port={cluster.port}")
    done = subprocess.run([str(ALEMBIC), "-c", str(ini), "upgrade", "head"], cwd=EXAMPLES, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_trusted_install_and_both_alembic_examples_as_the_owner(cluster, scratch, tmp_path, plain_expected):
    """CREATE EXTENSION chat_backfill by the database owner (0.1.0: superuser = true, 42501),
    then each Alembic example end to end as that owner; rows equal a superuser's run."""
    db, owner = app_database(cluster, scratch, "sec_trusted_committing")
    with connect(cluster, db, owner) as conn, conn.cursor() as cur:
        cur.execute("CREATE EXTENSION chat_backfill")
    alembic_upgrade(cluster, db, owner, "committing", tmp_path)
    assert message_rows(cluster, db) == plain_expected
    assert query(cluster, db, "SELECT state, started_by FROM chat_backfill.status") == [("finished", owner)]
    assert query(cluster, db, "SELECT convalidated FROM pg_constraint WHERE conname = 'chat_message_chat_id_fkey'") == [(True,)]

    # transactional/ installs the extension itself (CREATE EXTENSION IF NOT EXISTS), as the owner.
    db, owner = app_database(cluster, scratch, "sec_trusted_transactional")
    alembic_upgrade(cluster, db, owner, "transactional", tmp_path)
    assert message_rows(cluster, db) == plain_expected
    assert query(cluster, db, "SELECT extowner::regrole::text FROM pg_extension WHERE extname = 'chat_backfill'") == [(owner,)]


def test_trusted_install_runs_no_shadow_planted_by_the_owner(cluster, scratch):
    """A trusted extension's script runs as the bootstrap superuser, in a schema the
    installing owner controls: the owner plants the shadows of test 1 and points the
    database's search_path at them, then installs and runs the backfill:

        ALTER DATABASE db SET search_path = public, pg_catalog;
        CREATE EXTENSION chat_backfill;
        CALL backfill_chat_messages_resumable(); SELECT * FROM backfill_chat_messages();
    """
    db, owner = app_database(cluster, scratch, "sec_trusted_shadows")
    with connect(cluster, db, owner, clean=True) as conn, conn.cursor() as cur:
        cur.execute("SET search_path = public")
        cur.execute(TARGET_DDL)
        cur.execute(plant_shadows_sql(owner))
        cur.execute(f"ALTER DATABASE {db} SET search_path = public, pg_catalog")
    with connect(cluster, db, owner) as conn, conn.cursor() as cur:
        cur.execute("CREATE EXTENSION chat_backfill")
        cur.execute(f"CALL backfill_chat_messages_resumable(now => {NOW}, batch_size => 200)")
        cur.execute(f"SELECT * FROM backfill_chat_messages(now => {NOW})")
        cur.execute("SELECT * FROM chat_backfill.status")
    assert_no_shadow_ran(cluster, db, owner)
