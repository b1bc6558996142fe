"""Whose code and whose runs the run state trusts (issue 20, the attack review of 0.7.0's
first cut). Each test runs the attack as the review did, against a real server, and fails on
that cut (noted per test):

1. A role plants a rejection naming a table of its own whose policy calls its function; a
   reader under row-level security reads `chat_backfill.rejected_messages` and runs it.
2. A CALL adopts the newest run of its source and target, whoever started it: a tenant's run
   over the chats its policies show it, or a run with another source_filter, leaves the
   rest unwritten under `finished`.
3. A view over a table with row-level security counted as unrestricted: a tenant read other
   tenants' rejections through it.
4. A role whose defaults are SERIALIZABLE READ ONLY DEFERRABLE: its workers waited for a
   safe snapshot while the CALL held the server-wide worker-cap lock.
5. A role that may read the source records a decoy rejection first; the real run's one is
   dropped by ON CONFLICT DO NOTHING.
6. The state tables' owner (the extension's owner, not a superuser) attaches code to them
   (trigger, default, CHECK, index expression, policy): it ran with the rights of whoever
   backfilled, a superuser included.
7. Errors never carry a Rust backtrace, though this suite's server runs with
   RUST_BACKTRACE=1 (conftest).
"""

from __future__ import annotations

import threading

import psycopg2
import pytest

import chatgen
from conftest import PG_MAJOR
from test_backups import rls_database
from test_parallel import wait_until
from test_security import connect, expect_sqlstate, load, message_rows, query, scratch  # noqa: F401 (fixture)

NOW = chatgen.NOW
GOOD = '{"history":{"messages":{"m1":{"role":"user","content":"hello","timestamp":1}}}}'
BAD = '{"history":{"messages":{"m1":{"role":"user","content":"hi","timestamp":1},' \
      '"m2":{"role":{"not":"text"},"content":"private","timestamp":2}}}}'
SPIED = "spy ran as"
TARGET = """CREATE TABLE public.{name} (id text PRIMARY KEY, chat_id text NOT NULL, user_id text, role text NOT NULL,
    parent_id text, content json, output json, model_id text, files json, sources json, embeds json, done boolean,
    status_history json, error json, usage json, created_at bigint, updated_at bigint)"""


def reference(cluster, db):
    """The rows of the superuser's one-transaction run over every chat, in a table of their own."""
    query(cluster, db, TARGET.format(name="ref_message"))
    query(cluster, db, "SELECT count(*) FROM backfill_chat_messages('public.chat', 'public.ref_message', now => %s, "
                       "source_filter => NULL)", (NOW,), clean=False)
    return message_rows(cluster, db, "ref_message")


def spied(notices) -> list[str]:
    return [n.strip() for n in notices if SPIED in n]


# 1 ------------------------------------------------------------------------------------------

def test_reading_rejections_never_runs_a_planted_sources_policy(cluster, scratch):
    """mallory backfills from a table of her own whose policy calls her function, leaving a
    rejection that names it; she lets everyone read the table. A reader the table's policy
    applies to (any role but mallory) reads the rejections:

        SELECT * FROM chat_backfill.rejected_messages;   -- as bob: ran mallory's spy() as bob

    The first cut looked the chat up in mallory's table to decide, running her policy as
    bob. Now bob sees only rejections he or a trusted role recorded, and spy() never runs.
    """
    db, _, bob = rls_database(cluster, scratch)
    mallory = scratch.role("mallory")
    query(cluster, db, f"GRANT CREATE ON SCHEMA public TO {mallory}")
    with connect(cluster, db, mallory) as conn, conn.cursor() as cur:
        cur.execute(f"""
            CREATE FUNCTION public.spy() RETURNS boolean LANGUAGE plpgsql AS $$
            BEGIN RAISE NOTICE '{SPIED} %', current_user; RETURN true; END $$;""")
        cur.execute(f"""
            CREATE TABLE public.trap (id text PRIMARY KEY, user_id text, chat json);
            INSERT INTO public.trap VALUES ('t1', 'u', %s);
            {TARGET.format(name="trap_message")};
            ALTER TABLE public.trap ENABLE ROW LEVEL SECURITY;
            CREATE POLICY spying ON public.trap USING (public.spy());
            GRANT SELECT ON public.trap TO PUBLIC;""", (BAD,))
        cur.execute("SELECT sum(messages_rejected) FROM backfill_chat_messages('public.trap', 'public.trap_message', "
                    f"now => {NOW})")
        assert cur.fetchone() == (1,)
    with connect(cluster, db, bob) as conn, conn.cursor() as cur:
        cur.execute("SELECT chat_id FROM chat_backfill.rejected_messages")
        assert cur.fetchall() == [] and spied(conn.notices) == [], conn.notices
        # Control: bob reading mallory's table himself does run her policy.
        cur.execute("SELECT count(*) FROM public.trap")
        assert spied(conn.notices), "the spy never fires: this test could not fail"
    # mallory sees her own rejection (her table, her policy, her rights).
    assert query(cluster, db, "SELECT chat_id FROM chat_backfill.rejected_messages", user=mallory) == [("t1",)]


# 2 ------------------------------------------------------------------------------------------

def test_a_call_goes_on_only_with_a_run_that_covered_what_it_covers(cluster, scratch):
    """The first cut: alice (her policy shows her 3 of 6 chats) runs the CALL to the end;
    the owner's CALL then said "already complete" and wrote nothing for bob's chats. The
    same with a run under another source_filter, and with a run row alice inserted herself
    claiming to have seen the whole source."""
    db, alice, bob = rls_database(cluster, scratch)
    want = reference(cluster, db)
    with connect(cluster, db, alice) as conn, conn.cursor() as cur:
        cur.execute(f"CALL backfill_chat_messages_resumable(now => {NOW}, source_filter => NULL)")
        # A forged run that claims the source's policies did not limit her: refused.
        expect_sqlstate(cur, """
            INSERT INTO chat_backfill.runs (source_oid, target_oid, source, target, source_filter, high_water,
                                            total_chats, now, status, rows, id_column, restricted)
            VALUES ('public.chat'::regclass, 'public.chat_message'::regclass, 'public.chat', 'public.chat_message',
                    NULL, 'zzz', 0, 1, 'finished', 'migration', 'id', false)""", "42501")
        # One that says nothing of it (as a 0.6.0 run): hers only.
        cur.execute("""
            INSERT INTO chat_backfill.runs (source_oid, target_oid, source, target, source_filter, high_water,
                                            total_chats, now, status, rows, id_column)
            VALUES ('public.chat'::regclass, 'public.chat_message'::regclass, 'public.chat', 'public.chat_message',
                    NULL, 'zzz', 0, 1, 'finished', 'migration', 'id')""")
    assert query(cluster, db, "SELECT count(*) FROM public.chat_message") == [(3,)]
    # The owner, first with another filter (bob's chats only), then with none.
    with connect(cluster, db) as conn, conn.cursor() as cur:
        cur.execute(f"CALL backfill_chat_messages_resumable(now => {NOW}, source_filter => $$user_id = '{bob}'$$)")
        assert not any("already complete" in n for n in conn.notices), conn.notices
        cur.execute(f"CALL backfill_chat_messages_resumable(now => {NOW}, source_filter => NULL)")
        assert any("is not resumed" in n for n in conn.notices), conn.notices
        assert not any("already complete" in n for n in conn.notices), conn.notices
        # Its own run, finished, is the one the next CALL finds.
        cur.execute(f"CALL backfill_chat_messages_resumable(now => {NOW}, source_filter => NULL)")
        assert any("already complete" in n for n in conn.notices[-2:]), conn.notices
    assert message_rows(cluster, db) == want


# 3 ------------------------------------------------------------------------------------------

def test_a_view_source_shows_each_reader_only_the_rejections_of_chats_it_shows_them(cluster, scratch):
    """A view that shows each role its own chats (a WHERE on current_user: a view's rows may
    depend on its reader; row_security_active says nothing of views). The owner backfills
    through it... it shows the owner nothing of the tenants', so here the view is over the
    table with a policy and the backfill runs as the superuser, who sees every chat through
    the view. The first cut counted a view as unrestricted: alice read bob's rejection."""
    db, alice, bob = rls_database(cluster, scratch)
    query(cluster, db, "CREATE VIEW public.chat_v AS SELECT * FROM public.chat "
                       "WHERE user_id = current_user OR current_user = 'postgres'")
    query(cluster, db, f"GRANT SELECT ON public.chat_v TO {alice}, {bob}")
    query(cluster, db, f"SELECT count(*) FROM backfill_chat_messages('public.chat_v', now => {NOW})", clean=False)
    assert query(cluster, db, "SELECT chat_id FROM chat_backfill.rejected_messages") == [("b1",)]
    assert query(cluster, db, "SELECT chat_id FROM chat_backfill.rejected_messages", user=alice) == []
    assert query(cluster, db, "SELECT chat_id FROM chat_backfill.rejected_messages", user=bob) == [("b1",)]


# 4 ------------------------------------------------------------------------------------------

def test_workers_start_whatever_the_roles_transaction_defaults(cluster, scratch):
    """ALTER ROLE ... SET default_transaction_isolation = serializable,
    default_transaction_read_only = on, default_transaction_deferrable = on; the session turns
    read_only off to run the CALL with workers while another session keeps a serializable
    read-write transaction open. The first cut's workers waited for a safe snapshot (as long
    as that transaction lived) while the CALL held the server-wide cap lock: every other
    CALL with workers waited too. statement_timeout only keeps a regression from hanging."""
    runner = scratch.role("runner")
    db = scratch.database("trust_serial")
    data = chatgen.realistic_chats(seed=11, count=60, content_bytes=(100, 300), messages=(2, 4))
    load(cluster, db, data)
    query(cluster, db, "CREATE EXTENSION chat_backfill", clean=False)
    query(cluster, db, f"GRANT SELECT ON public.chat TO {runner}; GRANT INSERT, SELECT ON public.chat_message TO {runner}")
    for setting, value in [("default_transaction_isolation", "serializable"), ("default_transaction_read_only", "on"),
                           ("default_transaction_deferrable", "on")]:
        query(cluster, db, f"ALTER ROLE {runner} SET {setting} = '{value}'")
    query(cluster, db, "CREATE TABLE public.other (x int)")
    with connect(cluster, db) as holder, holder.cursor() as hc:
        holder.autocommit = False
        hc.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        hc.execute("INSERT INTO public.other VALUES (1)")
        with connect(cluster, db, runner) as conn, conn.cursor() as cur:
            cur.execute("SET default_transaction_read_only = off")
            cur.execute("SET statement_timeout = '120s'")
            cur.execute(f"CALL backfill_chat_messages_resumable(now => {NOW}, batch_size => 10, workers => 2)")
            assert any("2 workers started" in n for n in conn.notices), conn.notices
            cur.execute("SELECT state FROM chat_backfill.status")
            assert cur.fetchall() == [("finished",)]
        holder.rollback()
    assert query(cluster, db, "SELECT count(*) > 0 FROM public.chat_message") == [(True,)]


# 5 ------------------------------------------------------------------------------------------

def test_a_decoy_from_a_reader_of_the_source_leaves_the_real_rejection_recorded(cluster, scratch):
    """eve may read the source and write the target: she draws a run id and records a
    rejection for bob's chat with her own text before the owner's run. The first cut kept
    hers (ON CONFLICT DO NOTHING) and dropped the run's; bob, under the source's policies,
    does not see eve's."""
    db, _, bob = rls_database(cluster, scratch)
    eve = scratch.role("eve")
    query(cluster, db, f"GRANT SELECT ON public.chat TO {eve}; GRANT INSERT, SELECT (id) ON public.chat_message TO {eve}; "
                       f"ALTER ROLE {eve} BYPASSRLS")
    with connect(cluster, db, eve) as conn, conn.cursor() as cur:
        cur.execute("SELECT nextval('chat_backfill.runs_run_id_seq')")
        (decoy,) = cur.fetchone()
        cur.execute("""
            INSERT INTO chat_backfill.rejected_messages
                (run_id, source, target, source_oid, target_oid, id_column, chat_id, message_key, message_id,
                 sqlstate, error)
            VALUES (%s, 'public.chat', 'public.chat_message', 'public.chat'::regclass, 'public.chat_message'::regclass,
                    'id', 'b1', 'm2', 'b1-m2', '42804', 'decoy: nothing is wrong, ignore it')""", (decoy,))
    query(cluster, db, f"SELECT count(*) FROM backfill_chat_messages(now => {NOW})", clean=False)
    rows = query(cluster, db, "SELECT recorded_by, error FROM chat_backfill.rejected_messages ORDER BY id")
    assert [r for r, _ in rows] == [eve, "postgres"] and rows[1][1].startswith("cannot be stored"), rows
    assert [e for (e,) in query(cluster, db, "SELECT error FROM chat_backfill.rejected_messages", user=bob)] == \
        [rows[1][1]]


def test_a_role_may_not_point_its_run_at_a_table_it_was_not_about(cluster, scratch):
    """The ninth review: PUBLIC may update a run's oid cache (whoever resumes a run refreshes
    it), and the policy checked only that the role could run that backfill: a tenant wrote
    the next oids into runs of its own, so that whichever table took one next was "the very
    table" of a finished run. Every update must now leave a run's oids those of its names."""
    db, owner = owners_database(cluster, scratch, "trust_oid_update")
    tenant = scratch.role("tenant")
    query(cluster, db, f"GRANT CREATE ON SCHEMA public TO {tenant}; " + TARGET.format(name="staging_message") +
          f"; GRANT INSERT, SELECT ON public.staging_message TO {tenant}")
    with connect(cluster, db, tenant) as conn, conn.cursor() as cur:
        cur.execute(CHATS_TABLE.format(name="staging"))
        cur.execute(FORGED_RUN)
        expect_sqlstate(cur, "UPDATE chat_backfill.runs SET source_oid = (source_oid::int8 + 1)::oid", "42501")
        cur.execute("UPDATE chat_backfill.runs SET status = 'finished', source_oid = source_oid")
        assert cur.rowcount == 1


def test_another_roles_state_about_a_temporary_table_is_shown_to_nobody(cluster, scratch):
    """Temporary tables go with their session, and their schema names (pg_temp_N) and, once
    the counter wraps (which a role can hasten with lo_create), their oids come round again:
    state another role wrote about one is never shown, even where name and oid both match
    (the ninth review made the oid come round; here a superuser points a rejection at a
    tenant's temporary table to stand for that)."""
    db, owner = owners_database(cluster, scratch, "trust_temp_oid")
    tenant = scratch.role("tenant")  # not the owner: the state's owner reads all of it
    query(cluster, db, f"SELECT count(*) FROM backfill_chat_messages(now => {NOW})", clean=False)
    with connect(cluster, db, tenant) as conn, conn.cursor() as cur:
        cur.execute(CHATS_TABLE.format(name="x").replace("public.x", "pg_temp.staging"))
        cur.execute("SELECT chat_backfill.table_name('pg_temp.staging'::regclass), 'pg_temp.staging'::regclass::oid")
        name, oid = cur.fetchone()
        with connect(cluster, db) as su, su.cursor() as sc:
            sc.execute("UPDATE chat_backfill.rejected_messages SET source = %s, source_oid = %s", (name, oid))
            assert sc.rowcount > 0, "no rejection to point: this test could not fail"
        cur.execute("SELECT count(*) FROM chat_backfill.rejected_messages")
        assert cur.fetchone() == (0,)


def test_state_naming_another_sessions_temp_table_blocks_nobody(cluster, scratch):
    """A role backfills from and into temp tables of its own, leaving a run and a rejection
    that name pg_temp_N, and disconnects. The first cut's policies resolved those names with
    to_regclass, which raises 42501 for a schema the reader may not use: every other role's
    reads of the state, and its backfills, failed from then on."""
    db, alice, bob = rls_database(cluster, scratch)
    query(cluster, db, f"GRANT TEMP ON DATABASE {db} TO {alice}")
    with connect(cluster, db, alice) as conn, conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE chat (id text PRIMARY KEY, user_id text, title text, chat json); " +
                    TARGET.format(name="x").replace("public.x", "pg_temp.chat_message").replace("CREATE TABLE", "CREATE TEMP TABLE"))
        cur.execute("INSERT INTO pg_temp.chat VALUES ('t1', 'u', 't', %s)", (BAD,))
        cur.execute(f"SELECT count(*) FROM backfill_chat_messages('pg_temp.chat', 'pg_temp.chat_message', now => {NOW})")
        cur.execute(f"CALL backfill_chat_messages_resumable('pg_temp.chat', 'pg_temp.chat_message', now => {NOW})")
    with connect(cluster, db, bob) as conn, conn.cursor() as cur:
        cur.execute("SELECT chat_id FROM chat_backfill.rejected_messages")
        cur.execute("SELECT count(*) FROM chat_backfill.status")
        cur.execute(f"CALL backfill_chat_messages_resumable(now => {NOW})")
        cur.execute("SELECT chat_id FROM chat_backfill.rejected_messages")
        assert cur.fetchall() == [("b1",)]


# 6 ------------------------------------------------------------------------------------------

SPY = f"""
CREATE FUNCTION public.spy() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN RAISE NOTICE '{SPIED} %', current_user; RETURN true; END $$;
CREATE FUNCTION public.spy_ts() RETURNS timestamptz LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spy(); RETURN clock_timestamp(); END $$;
CREATE FUNCTION public.spy_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spy(); RETURN NEW; END $$;
CREATE FUNCTION public.spy_immutable(int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN PERFORM public.spy(); RETURN $1; END $$;
"""

ATTACHED = {
    "trigger": "CREATE TRIGGER spying BEFORE INSERT ON chat_backfill.{table} FOR EACH ROW EXECUTE FUNCTION public.spy_trigger()",
    "default": "ALTER TABLE chat_backfill.{table} ALTER COLUMN {column} SET DEFAULT public.spy_ts()",
    "check": "ALTER TABLE chat_backfill.{table} ADD CONSTRAINT spying CHECK (public.spy()) NOT VALID",
    "policy": "ALTER POLICY rejections_by_runners ON chat_backfill.{table} WITH CHECK (public.spy())",
    # A pg_catalog function that runs SQL from a string: no dependency names public.spy().
    "sql in a string": "ALTER TABLE chat_backfill.{table} ADD CONSTRAINT spying "
                       "CHECK (pg_catalog.query_to_xml('SELECT public.spy()', true, false, '') IS NOT NULL) NOT VALID",
    # The extension's owner may add its own function to the extension.
    "member": "ALTER EXTENSION chat_backfill ADD FUNCTION public.spy(); "
              "ALTER TABLE chat_backfill.{table} ADD CONSTRAINT spying CHECK (public.spy()) NOT VALID",
    # A parent: the state table as a partition of the owner's table, whose partition key (an
    # "immutable" function of the owner's) every write to the partition evaluates.
    "parent": "CREATE FUNCTION public.spy_key(bigint) RETURNS int LANGUAGE plpgsql IMMUTABLE AS "
              "$$ BEGIN PERFORM public.spy(); RETURN 1; END $$; "
              "CREATE TABLE public.{table}_parent (LIKE chat_backfill.{table}) PARTITION BY LIST (public.spy_key(run_id)); "
              "ALTER TABLE public.{table}_parent ATTACH PARTITION chat_backfill.{table} FOR VALUES IN (1)",
    # A child table: statements on the state table without ONLY reach its rows and triggers.
    "child": "CREATE TABLE public.{table}_child () INHERITS (chat_backfill.{table}); "
             "CREATE TRIGGER spying BEFORE INSERT OR UPDATE ON public.{table}_child FOR EACH ROW "
             "EXECUTE FUNCTION public.spy_trigger()",
    # Extended statistics (the fifth review): the planner folds an immutable call of its
    # expression with constant arguments whenever it plans a query on the table, as the
    # role whose query it is, reads included.
    "statistics": "CREATE STATISTICS public.spying ON (public.spy_immutable(1) + {key}) FROM chat_backfill.{table}",
}
COLUMN = {"rejected_messages": "rejected_at", "runs": "updated_at"}
KEY = {"rejected_messages": "id", "runs": "run_id"}


TWO_CHATS = [chatgen.Chat("c1", "u", BAD), chatgen.Chat("c2", "u", GOOD)]


EVENT_TRIGGERS = ("chat_backfill_state_before", "chat_backfill_state_after")


def owners_database(cluster, scratch, prefix, chats=TWO_CHATS, event_triggers=False):
    """A database whose non-superuser owner installs the extension (so owns the state tables)
    and has the spy functions; the chats are in the superuser's own tables.

    The install's event triggers refuse the owner's DDL on the state tables outright; the
    state guard that the backfill runs is the layer under them, for when a superuser turned
    them off (ALTER EVENT TRIGGER ... DISABLE, event_triggers = off on 17 and later). The
    guard's tests turn them off, as such a superuser would, unless `event_triggers`."""
    owner = scratch.role("owner", "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE")
    db = scratch.database(prefix, owner=owner)
    load(cluster, db, chats)
    with connect(cluster, db, owner) as conn, conn.cursor() as cur:
        cur.execute("CREATE EXTENSION chat_backfill")
        cur.execute(SPY)
    if not event_triggers:
        query(cluster, db, "; ".join(f"ALTER EVENT TRIGGER {t} DISABLE" for t in EVENT_TRIGGERS))
    return db, owner


def in_background(cluster, db, sql):
    """Runs `sql` as the superuser in a thread; the box gets its error (if any) and notices."""
    box = {}

    def run():
        with connect(cluster, db) as conn, conn.cursor() as cur:
            try:
                cur.execute(sql)
            except psycopg2.Error as e:
                box["error"] = e
            box["notices"] = list(conn.notices)

    t = threading.Thread(target=run)
    t.start()
    return t, box


@pytest.mark.parametrize("table,kind", [("rejected_messages", "trigger"), ("rejected_messages", "default"),
                                        ("rejected_messages", "policy"), ("rejected_messages", "sql in a string"),
                                        ("rejected_messages", "parent"),
                                        ("runs", "trigger"), ("runs", "check"), ("runs", "member"),
                                        ("runs", "child"), ("runs", "statistics"), ("rejected_messages", "statistics")])
def test_code_the_state_owner_attaches_never_runs_as_the_caller(cluster, scratch, table, kind):
    """The database owner installs the extension (trusted) and so owns the state tables; it
    attaches a function of its own to one (not through an index expression: CREATE INDEX
    needs CREATE on the schema, which only its superuser owner has). A superuser then backfills tables of its own in
    that database (a tenant, for a policy: superusers bypass policies). The first cut ran the
    owner's function as the caller, a superuser included. Now the backfill refuses with
    42501 before it writes, naming what it found; the owner's own backfill (whom the owner's
    code cannot escalate) goes on and runs it, which shows the spy would have fired."""
    db, owner = owners_database(cluster, scratch, "trust_owner")
    tenant = scratch.role("tenant")
    query(cluster, db, f"GRANT SELECT ON public.chat TO {tenant}; GRANT INSERT, SELECT ON public.chat_message TO {tenant}")
    query(cluster, db, ATTACHED[kind].format(table=table, column=COLUMN[table], key=KEY[table]), user=owner)
    query(cluster, db, "CREATE TABLE public.own_chat AS SELECT * FROM public.chat; "
                       "ALTER TABLE public.own_chat ADD PRIMARY KEY (id); " + TARGET.format(name="own_message") +
                       f"; ALTER TABLE public.own_chat OWNER TO {owner}; ALTER TABLE public.own_message OWNER TO {owner}")
    caller = tenant if kind == "policy" else "postgres"
    form = ("SELECT count(*) FROM backfill_chat_messages(now => %s)" if table == "rejected_messages"
            else "CALL backfill_chat_messages_resumable(now => %s)")
    with connect(cluster, db, caller) as conn, conn.cursor() as cur:
        err = expect_sqlstate(cur, form % NOW, "42501")
        assert "not as its install or update made them" in err.pgerror, err.pgerror
        assert spied(conn.notices) == [], conn.notices
    assert query(cluster, db, "SELECT count(*) FROM public.chat_message") == [(0,)]
    # Control: a role the owner can act as anyway (here one granted to the owner; the owner
    # itself for all but a policy, which the table's owner bypasses) is not refused, and the
    # owner's code runs, as that role.
    helper = owner
    if kind == "policy":
        helper = scratch.role("helper")
        query(cluster, db, f"GRANT {helper} TO {owner}; GRANT SELECT ON public.own_chat TO {helper}; "
                           f"GRANT INSERT, SELECT ON public.own_message TO {helper}")
    with connect(cluster, db, helper) as conn, conn.cursor() as cur:
        cur.execute(form.replace("now => %s", "'public.own_chat', 'public.own_message', now => %s") % NOW)
        if kind == "statistics":
            # Statistics run when a query on the table is planned: a write of rejections
            # plans none on rejected_messages, a read does.
            cur.execute(f"SELECT count(*) FROM chat_backfill.{table}")
        # A child's trigger fires only for rows in the child, which no backfill puts there.
        assert spied(conn.notices) or kind == "child", f"{kind} on {table} never ran: this test could not fail"


def test_code_attached_while_a_run_is_under_way_stops_it_at_its_next_transaction(cluster, scratch):
    """The check is made in every transaction of a CALL (and holds the tables' ROW EXCLUSIVE
    lock, which a new trigger must wait for): a trigger added between two batches of a
    superuser's run ends it at the next batch, with 42501, before the trigger runs."""
    data = chatgen.realistic_chats(seed=3, count=40, content_bytes=(100, 300), messages=(2, 4))
    db, owner = owners_database(cluster, scratch, "trust_mid", data)
    t, box = in_background(cluster, db, f"CALL backfill_chat_messages_resumable(now => {NOW}, batch_size => 5, "
                                        "pause => '200 milliseconds')")
    try:
        wait_until(lambda: query(cluster, db, "SELECT coalesce(max(batches), 0) FROM chat_backfill.runs") >= [(2,)])
        query(cluster, db, "CREATE TRIGGER spying BEFORE UPDATE ON chat_backfill.runs FOR EACH ROW "
                           "EXECUTE FUNCTION public.spy_trigger()", user=owner)
    finally:
        t.join()
    assert getattr(box.get("error"), "pgcode", None) == "42501", box
    assert spied(box["notices"]) == [], box["notices"]


# What the fourth review did on 15: empty the three state tables of keys, indexes and
# policies, then turn each into a view over a table of the owner's whose trigger, and whose
# view's query, call its function.
EMPTIED = """
    DO $$ DECLARE t text; r record; BEGIN
      FOREACH t IN ARRAY ARRAY['run_ranges', 'rejected_messages', 'runs'] LOOP
        FOR r IN SELECT conname FROM pg_constraint
                  WHERE conrelid = ('chat_backfill.' || t)::regclass AND contype IN ('p', 'f', 'u') LOOP
          EXECUTE format('ALTER TABLE chat_backfill.%I DROP CONSTRAINT IF EXISTS %I CASCADE', t, r.conname);
        END LOOP;
        FOR r IN SELECT indexrelid::regclass::text AS i FROM pg_index
                  WHERE indrelid = ('chat_backfill.' || t)::regclass LOOP
          EXECUTE 'DROP INDEX ' || r.i;
        END LOOP;
        FOR r IN SELECT polname FROM pg_policy WHERE polrelid = ('chat_backfill.' || t)::regclass LOOP
          EXECUTE format('DROP POLICY %I ON chat_backfill.%I', r.polname, t);
        END LOOP;
        EXECUTE format('ALTER TABLE chat_backfill.%I DISABLE ROW LEVEL SECURITY', t);
        EXECUTE format('DELETE FROM chat_backfill.%I', t);
      END LOOP;
    END $$"""
VIEW_OVER_SHADOW = """
    CREATE TABLE public.shadow_{t} (LIKE chat_backfill.{t} INCLUDING DEFAULTS);
    CREATE TRIGGER spying BEFORE INSERT OR UPDATE ON public.shadow_{t}
        FOR EACH ROW EXECUTE FUNCTION public.spy_trigger();
    CREATE RULE "_RETURN" AS ON SELECT TO chat_backfill.{t} DO INSTEAD
        SELECT s.* FROM (SELECT public.spy() AS ok) x LEFT JOIN public.shadow_{t} s ON x.ok"""


def turn_state_into_views(cur):
    cur.execute(EMPTIED)
    for t in ("run_ranges", "rejected_messages", "runs"):
        cur.execute("VACUUM chat_backfill." + t)
        cur.execute(VIEW_OVER_SHADOW.format(t=t))


@pytest.mark.skipif(PG_MAJOR != "15", reason="16 removed turning a table into a view with a _RETURN rule")
def test_a_state_table_turned_into_a_view_is_refused_too(cluster, scratch):
    """The owner empties the three state tables it owns of keys, indexes and policies and
    turns each into a view (CREATE RULE "_RETURN", still possible on 15) over a table of its
    own whose trigger calls its function (event triggers off: the guard alone). The first guard looked only at plain tables the owner owned: with none left it checked
    nothing, and the superuser's backfill wrote through the views into the trigger."""
    db, owner = owners_database(cluster, scratch, "trust_view_rule")
    with connect(cluster, db, owner) as conn, conn.cursor() as cur:
        turn_state_into_views(cur)
        cur.execute("SELECT count(*) FROM pg_class WHERE relnamespace = 'chat_backfill'::regnamespace AND relkind = 'v'")
        assert cur.fetchone() == (4,)  # the three, and chat_backfill.status
    with connect(cluster, db) as conn, conn.cursor() as cur:
        err = expect_sqlstate(cur, f"SELECT count(*) FROM backfill_chat_messages(now => {NOW})", "42501")
        assert "not as its install or update made them" in err.pgerror, err.pgerror
        assert spied(conn.notices) == [], conn.notices



def test_code_attached_while_the_guard_waits_for_its_lock_is_seen(cluster, scratch):
    """The owner adds a CHECK calling its function in a transaction that holds the state
    table's lock while a superuser's backfill starts; the guard waits for the lock, then
    must look with a snapshot taken after it (the first cut looked with the statement's,
    taken before: the CHECK ran as superuser)."""
    db, owner = owners_database(cluster, scratch, "trust_race")
    with connect(cluster, db, owner) as holder, holder.cursor() as hc:
        holder.autocommit = False
        hc.execute("ALTER TABLE chat_backfill.rejected_messages ADD CONSTRAINT raced CHECK (public.spy()) NOT VALID")
        t, box = in_background(cluster, db, f"SELECT count(*) FROM backfill_chat_messages(now => {NOW})")
        # Until the backfill waits for the lock the owner holds.
        wait_until(lambda: query(cluster, db, "SELECT count(*) FROM pg_locks WHERE NOT granted "
                                              "AND relation = 'chat_backfill.rejected_messages'::regclass") == [(1,)])
        holder.commit()
        t.join()
    assert getattr(box.get("error"), "pgcode", None) == "42501", box
    assert spied(box["notices"]) == [], box["notices"]


# 8 ------------------------------------------------------------------------------------------
# The fourth review: with the guard only in the backfill, what the owner changed still ran
# for a superuser reading the state directly (as the NOTICEs suggest), and a cascade from
# runs reached the superuser's launches. The install's event triggers now refuse the owner's
# DDL on the state tables.

DIFFERENCES = """SELECT (SELECT count(*) FROM (SELECT chat_backfill.state_definition()
                                         EXCEPT SELECT part FROM chat_backfill.state_recorded) d),
                        (SELECT count(*) FROM (SELECT part FROM chat_backfill.state_recorded
                                         EXCEPT SELECT chat_backfill.state_definition()) r)"""


def test_the_owners_ddl_on_the_state_tables_is_refused(cluster, scratch):
    """Every attachment of the guard's tests, on either table, and the cascade that dropped
    the foreign key of the superuser's launches: each refused with 42501 as the owner runs
    it, and the state's definition is still the recorded one."""
    db, owner = owners_database(cluster, scratch, "trust_ddl", event_triggers=True)
    attempts = [(kind, ddl.format(table=table, column=COLUMN[table], key=KEY[table]))
                for kind, ddl in ATTACHED.items() for table in ("runs", "rejected_messages")
                if kind not in ("policy", "parent") or table == "rejected_messages"]
    attempts.append(("cascade", "ALTER TABLE chat_backfill.runs DROP CONSTRAINT runs_pkey CASCADE"))
    attempts.append(("drop policy", "DROP POLICY rejections_by_runners ON chat_backfill.rejected_messages"))
    # The fifth review: a sequence's options, and taking a state table out of the extension.
    attempts.append(("sequence", "ALTER SEQUENCE chat_backfill.runs_run_id_seq MAXVALUE 3"))
    attempts.append(("membership", "ALTER EXTENSION chat_backfill DROP TABLE chat_backfill.runs"))
    # The sixth: replica identity (with a publication of the table, every update of it fails),
    # and a trusted extension put into the schema.
    attempts.append(("replica identity", "ALTER TABLE chat_backfill.runs REPLICA IDENTITY NOTHING"))
    attempts.append(("extension in the schema", "CREATE EXTENSION citext SCHEMA chat_backfill"))
    # The seventh: DROP INDEX CONCURRENTLY commits the index dead before its end is refused;
    # a publication's row filter or column list makes every UPDATE of the table fail.
    index = query(cluster, db, "SELECT indexrelid::regclass::text FROM pg_index "
                               "WHERE indrelid = 'chat_backfill.rejected_messages'::regclass AND indisunique "
                               "AND NOT indisprimary")[0][0]
    attempts.append(("drop index concurrently", f"DROP INDEX CONCURRENTLY {index}"))
    attempts.append(("publication", "CREATE PUBLICATION spying FOR TABLE chat_backfill.runs"))
    attempts.append(("cast", "CREATE FUNCTION public.run_text(chat_backfill.runs) RETURNS text LANGUAGE sql "
                             "AS 'SELECT public.spy()::text'; "
                             "CREATE CAST (chat_backfill.runs AS text) WITH FUNCTION public.run_text(chat_backfill.runs)"))
    with connect(cluster, db, owner) as conn, conn.cursor() as cur:
        for kind, ddl in attempts:
            err = expect_sqlstate(cur, ddl, "42501")
            assert ("only a superuser may change what the extension's state tables are made of" in err.pgerror
                    or "only a superuser may drop an index of the extension's state tables" in err.pgerror), (kind, err)
            assert err.diag.message_hint and "record_state_definition" in err.diag.message_hint
    assert query(cluster, db, DIFFERENCES) == [(0, 0)]
    assert query(cluster, db, "SELECT count(*) FROM pg_constraint WHERE conname = 'launches_run_id_fkey'") == [(1,)]
    assert query(cluster, db, "SELECT count(*) FROM pg_index WHERE indrelid::regclass::text LIKE 'chat_backfill.%' "
                              "AND NOT (indisvalid AND indisready AND indislive)") == [(0,)]
    assert spied(conn.notices) == [], conn.notices


STATISTICS = ("CREATE STATISTICS public.spying_runs ON (public.spy_immutable(1) + run_id) FROM chat_backfill.runs; "
              "CREATE STATISTICS public.spying_rejections ON (public.spy_immutable(2) + id) "
              "FROM chat_backfill.rejected_messages")


@pytest.mark.parametrize("attack", ["view", "statistics"])
@pytest.mark.parametrize("event_triggers", [True, False])
def test_a_superuser_reading_the_state_runs_nothing_of_the_owners(cluster, scratch, attack, event_triggers):
    """The fourth review's high, on 15: the owner turns the state tables into views whose
    query calls its function (14 and 15 still allow it); the fifth's, on every major: the
    owner adds extended statistics whose expression calls it, which the planner evaluates.
    A superuser's SELECT from chat_backfill.status or rejected_messages then ran it as
    superuser. With the install's event triggers the owner's DDL is refused and the reads run
    nothing of the owner's. Without them (a superuser turned them off) the attack goes
    through: this test could fail."""
    if attack == "view" and PG_MAJOR not in ("14", "15"):
        pytest.skip("16 removed turning a table into a view with a _RETURN rule")
    db, owner = owners_database(cluster, scratch, "trust_read", event_triggers=event_triggers)
    with connect(cluster, db, owner) as conn, conn.cursor() as cur:
        if event_triggers:
            expect_sqlstate(cur, EMPTIED if attack == "view" else STATISTICS, "42501")
        elif attack == "view":
            turn_state_into_views(cur)
        else:
            cur.execute(STATISTICS)
    with connect(cluster, db) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM chat_backfill.status")
        cur.execute("SELECT count(*) FROM chat_backfill.rejected_messages")
        if event_triggers:
            assert spied(conn.notices) == [], conn.notices
            cur.execute("SELECT relname, relkind FROM pg_class WHERE relnamespace = 'chat_backfill'::regnamespace "
                        "AND relname IN ('runs', 'rejected_messages', 'run_ranges') ORDER BY 1")
            assert cur.fetchall() == [("rejected_messages", "r"), ("run_ranges", "r"), ("runs", "r")]
        else:
            assert spied(conn.notices) and all(n.endswith("postgres") for n in spied(conn.notices)), conn.notices


def test_reindex_concurrently_leaves_the_state_as_recorded(cluster, scratch):
    """REINDEX fires no event trigger before 17, and CONCURRENTLY gives each index a new oid:
    with indexes recorded by oid (the fifth review) the owner's, or a superuser's routine,
    REINDEX CONCURRENTLY refused every other role's backfill until a superuser recorded the
    state again. Indexes are recorded by name."""
    db, owner = owners_database(cluster, scratch, "trust_reindex", event_triggers=True)
    before = query(cluster, db, "SELECT array_agg(indexrelid ORDER BY indexrelid) FROM pg_index "
                                "WHERE indrelid = 'chat_backfill.runs'::regclass")
    with connect(cluster, db, owner) as conn, conn.cursor() as cur:
        cur.execute("REINDEX TABLE CONCURRENTLY chat_backfill.runs")
    assert query(cluster, db, "SELECT array_agg(indexrelid ORDER BY indexrelid) FROM pg_index "
                              "WHERE indrelid = 'chat_backfill.runs'::regclass") != before
    assert query(cluster, db, DIFFERENCES) == [(0, 0)]
    query(cluster, db, f"CALL backfill_chat_messages_resumable(now => {NOW})", clean=False)
    assert query(cluster, db, "SELECT count(*) FROM public.chat_message") == [(2,)]


def test_an_interrupted_reindex_concurrently_blocks_no_backfill(cluster, scratch):
    """REINDEX CONCURRENTLY cancelled while it waits for an older snapshot leaves an invalid
    copy of the index (`..._ccnew`) behind, and fires no event trigger before 17: recorded by
    name, the copy refused every other role's backfill (the sixth review). An invalid copy of
    a valid index is the same index; another invalid index is still a difference."""
    db, owner = owners_database(cluster, scratch, "trust_ccnew", event_triggers=True)
    index = query(cluster, db, "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = "
                               "'chat_backfill.runs'::regclass AND NOT indisprimary")[0][0]
    with connect(cluster, db, owner) as holder, holder.cursor() as hc:
        holder.autocommit = False
        hc.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        hc.execute("SELECT 1")  # the transaction's snapshot, which the reindex must wait out
        with connect(cluster, db, owner) as conn, conn.cursor() as cur:
            cur.execute("SET statement_timeout = '1s'")
            expect_sqlstate(cur, f"REINDEX INDEX CONCURRENTLY {index}", "57014")
        holder.rollback()
    assert query(cluster, db, "SELECT count(*) FROM pg_index WHERE indrelid = 'chat_backfill.runs'::regclass "
                              "AND NOT indisvalid") == [(1,)], "the cancel left no invalid copy: this test could not fail"
    assert query(cluster, db, DIFFERENCES) == [(0, 0)]
    query(cluster, db, f"CALL backfill_chat_messages_resumable(now => {NOW})", clean=False)
    assert query(cluster, db, "SELECT count(*) FROM public.chat_message") == [(2,)]


def test_the_event_triggers_leave_other_ddl_alone(cluster, scratch):
    """What the event triggers must not refuse: the owner's DDL on its own tables, a
    superuser's change of the state (recorded or not; an unrecorded one, like a pg_upgrade's
    changed node trees, must not block the database's other DDL, the commands that commit
    part way included), dropping and re-creating
    the extension. And what they must still refuse after a command that failed in a
    savepoint left its start unmatched."""
    db, owner = owners_database(cluster, scratch, "trust_ddl_ok", event_triggers=True)
    own = ("CREATE TABLE public.mine (a int PRIMARY KEY); ALTER TABLE public.mine ADD COLUMN b text; "
           "CREATE INDEX ON public.mine (b); DROP TABLE public.mine")
    query(cluster, db, own, user=owner)
    query(cluster, db, "ALTER TABLE chat_backfill.runs ADD COLUMN note text")
    assert query(cluster, db, DIFFERENCES) == [(1, 0)]
    query(cluster, db, own, user=owner)
    # The commands that commit part way (the sixth review: their end found nothing noted and
    # compared with the stale record).
    query(cluster, db, "CREATE TABLE public.later (a int)", user=owner)
    for concurrent in ["CREATE INDEX CONCURRENTLY later_a ON public.later (a)", "DROP INDEX CONCURRENTLY public.later_a"]:
        query(cluster, db, concurrent, user=owner)
    with connect(cluster, db, owner) as conn, conn.cursor() as cur:
        expect_sqlstate(cur, "ALTER TABLE chat_backfill.runs DROP COLUMN note", "42501")
    query(cluster, db, "SELECT chat_backfill.record_state_definition()")
    assert query(cluster, db, DIFFERENCES) == [(0, 0)]
    with connect(cluster, db, owner) as conn, conn.cursor() as cur:
        conn.autocommit = False
        cur.execute("SAVEPOINT a")
        expect_sqlstate(cur, "ALTER TABLE chat_backfill.runs ADD CONSTRAINT never CHECK (1 / 0 = 1)", "22012")
        cur.execute("ROLLBACK TO a")
        expect_sqlstate(cur, "ALTER TABLE chat_backfill.runs ADD CONSTRAINT spying CHECK (public.spy()) NOT VALID",
                        "42501")
        conn.rollback()
        cur.execute("CREATE TABLE public.after_rollback (a int)")
        conn.commit()
        cur.execute("DROP EXTENSION chat_backfill")
        cur.execute("CREATE EXTENSION chat_backfill")
        conn.commit()
        expect_sqlstate(cur, "ALTER TABLE chat_backfill.runs ADD COLUMN note text", "42501")
    assert query(cluster, db, "SELECT evtname, evtenabled, evtowner::regrole::text FROM pg_event_trigger ORDER BY 1") == \
        [("chat_backfill_state_after", "A", "postgres"), ("chat_backfill_state_before", "A", "postgres")]


# 9 ------------------------------------------------------------------------------------------
# The eighth review: the policies and run adoption trusted a row's recorded source name, which
# can come to mean another table: a later session's pg_temp_N, or a source dropped and made
# again by another role. State another role wrote now counts only while the name still finds
# the table it was written about (the oid checked when the row was added).

CHATS_TABLE = "CREATE TABLE public.{name} (id text PRIMARY KEY, user_id text, chat json)"


def test_a_name_taken_over_shows_nobody_the_state_of_the_old_table(cluster, scratch):
    """The owner backfills from a staging table whose chats include other tenants' messages
    (one rejected each, its text recorded), then drops it. A tenant that may create tables
    in public makes its own table of that name: it then read, and could delete, everything
    recorded under the name (the first cut). Now it sees and deletes none of it."""
    db, owner = owners_database(cluster, scratch, "trust_name")
    tenant = scratch.role("tenant")
    query(cluster, db, f"GRANT CREATE ON SCHEMA public TO {tenant}; GRANT INSERT, SELECT ON public.chat_message TO {tenant}; "
                       f"GRANT INSERT, SELECT ON public.chat_message TO {owner}")
    with connect(cluster, db, owner) as conn, conn.cursor() as cur:
        cur.execute(CHATS_TABLE.format(name="staging"))
        cur.execute("INSERT INTO public.staging VALUES ('s1', 'someone', %s), ('s2', 'someone else', %s)", (BAD, BAD))
        cur.execute(f"SELECT sum(messages_rejected)::int FROM backfill_chat_messages('public.staging', 'public.chat_message', "
                    f"now => {NOW})")
        rejected = cur.fetchone()[0]
        assert rejected >= 2
        cur.execute("DROP TABLE public.staging")
    with connect(cluster, db, tenant) as conn, conn.cursor() as cur:
        cur.execute(CHATS_TABLE.format(name="staging"))
        cur.execute("SELECT count(*) FROM chat_backfill.rejected_messages WHERE source = 'public.staging'")
        assert cur.fetchone() == (0,)
        cur.execute("DELETE FROM chat_backfill.rejected_messages WHERE source = 'public.staging'")
        assert cur.rowcount == 0
    assert query(cluster, db, "SELECT count(*) FROM chat_backfill.rejected_messages WHERE source = 'public.staging'") \
        == [(rejected,)], "the rows are there: this test could not fail"


FORGED_RUN = ("INSERT INTO chat_backfill.runs (source_oid, target_oid, source, target, source_filter, high_water, "
              "total_chats, now, status, rows, id_column, restricted) VALUES ('public.staging'::regclass, "
              "'public.staging_message'::regclass, 'public.staging', 'public.staging_message', "
              "$$user_id OPERATOR(pg_catalog.!~~) 'shared-%'::pg_catalog.text$$, '~', 0, 0, 'finished', 'migration', "
              "'id', false)")


@pytest.mark.parametrize("taken", ["source", "target"])
def test_a_run_about_a_table_that_had_the_name_is_not_adopted(cluster, scratch, taken):
    """A tenant records a finished run (INSERT, which the policy accepts: the tables are its
    own or ones it may use, and unrestricted) naming a table of its own, then drops it; the
    superuser later backfills with a table of its own of that name: the first cut adopted the
    tenant's run, said "already complete" and wrote nothing (the eighth review with the
    source, the ninth with the target, which the first fix did not compare). Now the run is
    passed over and every chat is written."""
    db, owner = owners_database(cluster, scratch, "trust_adopt")
    tenant = scratch.role("tenant")
    query(cluster, db, f"GRANT CREATE ON SCHEMA public TO {tenant}")
    mine, theirs = ("staging", "staging_message") if taken == "source" else ("staging_message", "staging")
    ddl = {"staging": CHATS_TABLE.format(name="staging"), "staging_message": TARGET.format(name="staging_message")}
    query(cluster, db, ddl[theirs] + f"; GRANT INSERT, SELECT ON public.{theirs} TO {tenant}")
    with connect(cluster, db, tenant) as conn, conn.cursor() as cur:
        cur.execute(ddl[mine])
        cur.execute(FORGED_RUN)
        cur.execute(f"DROP TABLE public.{mine}")
    query(cluster, db, ddl[mine])
    query(cluster, db, f"INSERT INTO public.staging VALUES ('a1', 'u', '{GOOD}'), ('a2', 'u', '{GOOD}')")
    with connect(cluster, db) as conn, conn.cursor() as cur:
        cur.execute(f"CALL backfill_chat_messages_resumable('public.staging', 'public.staging_message', now => {NOW})")
        notices = list(conn.notices)
    assert query(cluster, db, "SELECT count(*) FROM public.staging_message") == [(2,)], notices
    assert any("is not resumed" in n for n in notices), notices


def test_a_name_taken_over_by_a_view_runs_nothing_when_its_author_reads_its_own_state(cluster, scratch):
    """The tenth review: a role's own state counts by name, and where the source is restricted
    for it, reading it looks the chat up in whatever the name finds now: another tenant that
    took the name with a view (always restricted) ran its function as the first tenant. The
    lookup now happens only in a source a trusted role owns."""
    db, owner = owners_database(cluster, scratch, "trust_own_view")
    tenant, other = scratch.role("tenant"), scratch.role("other")
    query(cluster, db, f"CREATE SCHEMA staging; GRANT USAGE, CREATE ON SCHEMA staging TO {tenant}, {other}; "
                       f"GRANT INSERT, SELECT ON public.chat_message TO {tenant}; GRANT EXECUTE ON FUNCTION public.spy() "
                       f"TO {other}")
    with connect(cluster, db, tenant) as conn, conn.cursor() as cur:
        cur.execute(CHATS_TABLE.replace("public.", "staging.").format(name="tsrc"))
        cur.execute("INSERT INTO staging.tsrc VALUES ('c9', 'tenant', %s)", (BAD,))
        cur.execute(f"SELECT sum(messages_rejected)::int FROM backfill_chat_messages('staging.tsrc', 'public.chat_message', "
                    f"now => {NOW})")
        assert cur.fetchone()[0] >= 1
        cur.execute("DROP TABLE staging.tsrc")
    query(cluster, db, "CREATE VIEW staging.tsrc AS SELECT 'c9'::text AS id, 'x'::text AS user_id, NULL::json AS chat "
                       f"WHERE public.spy(); GRANT SELECT ON staging.tsrc TO {tenant}", user=other)
    with connect(cluster, db, tenant) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM chat_backfill.rejected_messages")
        cur.execute("SELECT count(*) FROM chat_backfill.status")
        assert spied(conn.notices) == [], conn.notices
    # Control: the view does run the spy for whoever reads it.
    with connect(cluster, db, tenant) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM staging.tsrc")
        assert spied(conn.notices), "the view ran nothing: this test could not fail"


def test_state_from_before_0_7_0_counts_as_another_roles(cluster, scratch):
    """The tenth review: rejections recorded before 0.7.0 have no author (NULL), and the test
    that another role's state still names its table compared NULL, which passed: a tenant that
    took the name of a dropped source read them. Here a superuser sets the author NULL to
    stand for such a row."""
    db, owner = owners_database(cluster, scratch, "trust_null_author")
    tenant = scratch.role("tenant")
    query(cluster, db, f"GRANT CREATE ON SCHEMA public TO {tenant}; GRANT INSERT, SELECT ON public.chat_message TO {owner}")
    with connect(cluster, db, owner) as conn, conn.cursor() as cur:
        cur.execute(CHATS_TABLE.format(name="staging"))
        cur.execute("INSERT INTO public.staging VALUES ('s1', 'someone', %s)", (BAD,))
        cur.execute(f"SELECT count(*) FROM backfill_chat_messages('public.staging', 'public.chat_message', now => {NOW})")
        cur.execute("DROP TABLE public.staging")
    assert query(cluster, db, "UPDATE chat_backfill.rejected_messages SET recorded_by = NULL "
                              "WHERE source = 'public.staging' RETURNING 1"), "no rejection: this test could not fail"
    with connect(cluster, db, tenant) as conn, conn.cursor() as cur:
        cur.execute(CHATS_TABLE.format(name="staging"))
        cur.execute("SELECT count(*) FROM chat_backfill.rejected_messages")
        assert cur.fetchone() == (0,)


def test_a_three_part_name_cannot_be_recorded(cluster, scratch):
    """The eleventh review: regclass_of looked the schema up only for two-part names, so a
    tenant recorded a run naming database.its_schema.its_table, and every other restricted
    role's read of the state failed with 42501. Such a name now finds nothing: the insert
    policy refuses it."""
    db, owner = owners_database(cluster, scratch, "trust_three_parts")
    tenant = scratch.role("tenant")
    query(cluster, db, f"CREATE SCHEMA ts AUTHORIZATION {tenant}; GRANT INSERT, SELECT ON public.chat_message TO {tenant}")
    with connect(cluster, db, tenant) as conn, conn.cursor() as cur:
        cur.execute(CHATS_TABLE.replace("public.", "ts.").format(name="chat"))
        expect_sqlstate(cur, "INSERT INTO chat_backfill.runs (source_oid, target_oid, source, target, high_water, "
                             "total_chats, now, status, id_column, restricted) VALUES ('ts.chat'::regclass, "
                             f"'public.chat_message'::regclass, '{db}.ts.chat', 'public.chat_message', 'x', 0, 0, "
                             "'finished', 'id', false)", "42501")


def test_a_name_parse_ident_stops_short_of_is_not_looked_up(cluster, scratch):
    """The twelfth review: regclass_of counted a name's parts with parse_ident, which, lenient,
    stops at a "-", while to_regclass reads on: 's-x.chat' counted as one part and went to
    to_regclass unchecked, which raised 42501 for every role without USAGE on "s-x" (the
    three-part fix bypassed: with a database named open-webui, any tenant could do it with its
    temp tables). Only the spelling %I gives is looked up now: the tenant cannot record such a
    name, and a row holding one (a superuser writes it here) blocks no reader."""
    db, owner = owners_database(cluster, scratch, "trust_dash")
    tenant, reader = scratch.role("tenant"), scratch.role("reader")
    query(cluster, db, f'CREATE SCHEMA "s-x" AUTHORIZATION {tenant}; '
                       f"GRANT INSERT, SELECT ON public.chat_message TO {tenant}")
    query(cluster, db, CHATS_TABLE.replace("public.", '"s-x".').format(name="chat"), user=tenant)
    insert = ("INSERT INTO chat_backfill.runs (source_oid, target_oid, source, target, high_water, total_chats, now, "
              "status, id_column, restricted) VALUES ('\"s-x\".chat'::regclass, 'public.chat_message'::regclass, "
              "'{source}', 'public.chat_message', 'x', 0, 0, 'finished', 'id', false)")
    with connect(cluster, db, tenant) as conn, conn.cursor() as cur:
        expect_sqlstate(cur, insert.format(source="s-x.chat"), "42501")
        # Control: the name as the backfill spells it is taken.
        cur.execute(insert.format(source='"s-x".chat'))
    query(cluster, db, insert.format(source="s-x.chat"))
    with connect(cluster, db, reader) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM chat_backfill.status")
        cur.execute("SELECT count(*) FROM chat_backfill.runs")


@pytest.mark.parametrize("key", ["domain", "array of the domain"])
def test_a_tenants_domain_on_the_key_runs_nothing_for_other_readers(cluster, scratch, key):
    """The eleventh review: the lookup behind the policies cast the recorded key to the key
    column's type, so a domain a tenant owns ran its CHECK (which it may add at any time) as
    every restricted reader. The cast is now to the domain's base type. The twelfth: an array
    of the domain is a plain base type, and its input ran each element's CHECK; an array is now
    compared as text."""
    db, owner = owners_database(cluster, scratch, "trust_domain" if key == "domain" else "trust_domain_array")
    array = key != "domain"
    tenant, reader = scratch.role("tenant"), scratch.role("reader")
    query(cluster, db, f"CREATE SCHEMA ts AUTHORIZATION {tenant}; GRANT USAGE ON SCHEMA ts TO PUBLIC")
    query(cluster, db, "CREATE DOMAIN ts.tkey AS text; ALTER DOMAIN ts.tkey OWNER TO " + tenant)
    query(cluster, db, f"CREATE TABLE public.chat2 (id ts.tkey{'[]' if array else ''} PRIMARY KEY, user_id text, "
                       "chat json); ALTER TABLE public.chat2 ENABLE ROW LEVEL SECURITY; "
                       "CREATE POLICY own ON public.chat2 USING (user_id = current_user); "
                       f"GRANT SELECT ON public.chat2 TO {reader}; " + TARGET.format(name="chat2_message") +
                       f"; INSERT INTO public.chat2 VALUES ('{'{k1}' if array else 'k1'}', '{reader}', '{BAD}')")
    query(cluster, db, f"CALL backfill_chat_messages_resumable('public.chat2', 'public.chat2_message', now => {NOW})",
          clean=False)
    query(cluster, db, "CREATE FUNCTION ts.spy_check(text) RETURNS boolean LANGUAGE plpgsql AS "
                       f"$$ BEGIN RAISE NOTICE '{SPIED} %', current_user; RETURN true; END $$; "
                       "ALTER DOMAIN ts.tkey ADD CONSTRAINT spying CHECK (ts.spy_check(VALUE)) NOT VALID", user=tenant)
    with connect(cluster, db, reader) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM chat_backfill.rejected_messages")
        assert cur.fetchone()[0] >= 1
        cur.execute("SELECT count(*) FROM chat_backfill.status")
        assert spied(conn.notices) == [], conn.notices
        # Control: a value becoming the domain runs the check.
        cur.execute("SELECT '{x}'::ts.tkey[]" if array else "SELECT 'x'::ts.tkey")
        assert spied(conn.notices), "the domain ran nothing: this test could not fail"


# 7 ------------------------------------------------------------------------------------------

def test_errors_carry_no_rust_backtrace(cluster, scratch):
    """The server runs with RUST_BACKTRACE=1 (conftest). pgrx then appends a captured Rust
    backtrace to the DETAIL of every error that crosses the extension's frames, a cancel
    included: the first cut showed one to the client of a cancelled CALL."""
    db = scratch.database("trust_bt")
    load(cluster, db, chatgen.realistic_chats(seed=2, count=30, content_bytes=(100, 300), messages=(2, 4)))
    query(cluster, db, "CREATE EXTENSION chat_backfill", clean=False)
    with connect(cluster, db) as conn, conn.cursor() as cur:
        errors = [expect_sqlstate(cur, "SELECT * FROM backfill_chat_messages(batch_size => 0)", "22023")]
        cur.execute("SET statement_timeout = '300ms'")
        errors.append(expect_sqlstate(cur, f"CALL backfill_chat_messages_resumable(now => {NOW}, batch_size => 1, "
                                           "pause => '1 second')", "57014"))
    for e in errors:
        detail = e.diag.message_detail or ""
        assert "backtrace" not in detail.lower() and "rust_begin_unwind" not in detail and " at /" not in detail, detail
