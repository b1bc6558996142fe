"""The run state in a database that is backed up, restored and shared (issue 20, items 1-3):

1. The database owner installs the extension (trusted) and backs up the whole database the
   way it does every night, with no extra flags, then restores it into new databases:

       pg_dump -d app -f app.sql;  pg_dump -Fc -d app -f app.dump            -- as the owner
       pg_restore --exit-on-error -d new app.dump;  psql -v ON_ERROR_STOP=1 -f app.sql new

   0.6.0: "permission denied for sequence rejected_messages_id_seq", and the state tables
   needed --enable-row-security. Every step must succeed, and the restored run resume where
   it stopped (its oids are new).
2. A restore does not keep oids. The run state names its tables; an object that merely has
   a recorded oid (here: a hostile role's temp table, given the recorded oids as a restore
   into a cluster where that role burned oids up to them would) gains nothing.
3. The source's own row-level security: a role the source shows a chat to sees state about
   that chat; one it hides the chat from sees no rejection, key or run about it.
"""

from __future__ import annotations

import subprocess

import chatgen
from conftest import pg_config
from test_security import connect, load, message_rows, query, scratch  # noqa: F401 (fixture)

NOW = chatgen.NOW
BIN = pg_config("--bindir")
RUN = "SELECT run_id, status, last_key, chats_read, messages_inserted, messages_rejected, high_water, now FROM chat_backfill.runs"
REJECTED = "SELECT run_id, chat_id, message_key, sqlstate, error FROM chat_backfill.rejected_messages ORDER BY 2, 3"


def chats():
    """Good chats and, every seventh, one message that cannot be stored (a rejection)."""
    out = chatgen.realistic_chats(seed=5, count=42, content_bytes=(100, 400), messages=(2, 5))
    for i in range(0, len(out), 7):
        out[i] = chatgen.Chat(out[i].id, out[i].user_id,
                              '{"history":{"messages":{"m1":{"role":"user","content":"hi","timestamp":1},'
                              '"m2":{"role":{"not":"text"},"content":"x","timestamp":2}}}}')
    return out


def tool(cluster, *args, user):
    """A PostgreSQL client program of the major under test, as `user`; (returncode, stderr)."""
    done = subprocess.run([f"{BIN}/{args[0]}", "-h", cluster.host, "-p", str(cluster.port), "-U", user, *args[1:]],
                          capture_output=True, text=True, timeout=300)
    return done.returncode, done.stderr


def owners_database(cluster, scratch, prefix):
    """A database owned by an ordinary role that installs the extension itself (trusted) and
    runs the backfill part way: one batch, then max_runtime stops it."""
    owner = scratch.role("owner", "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE")
    db = scratch.database(prefix, owner=owner)
    load(cluster, db, chats(), owner=owner)
    with connect(cluster, db, owner) as conn, conn.cursor() as cur:
        cur.execute("CREATE EXTENSION chat_backfill")
        cur.execute(f"CALL backfill_chat_messages_resumable(now => {NOW}, batch_size => 60, max_runtime => '0')")
    return db, owner


def finished_rows(cluster, db, owner):
    """The owner resumes the run: it must go on after its last key, read nothing twice, and
    end with the rows of one uninterrupted run."""
    [(run_id, _, last_key, *_)] = query(cluster, db, RUN)
    with connect(cluster, db, owner) as conn, conn.cursor() as cur:
        cur.execute(f"CALL backfill_chat_messages_resumable(now => {NOW}, batch_size => 60)")
        assert any(f"resuming run {run_id} after key {last_key}" in n for n in conn.notices), conn.notices
    [(state, existing)] = query(cluster, db, "SELECT state, messages_existing FROM chat_backfill.status")
    assert (state, existing) == ("finished", 0)
    cache = query(cluster, db, "SELECT source_oid = 'public.chat'::regclass, target_oid = 'public.chat_message'::regclass "
                               "FROM chat_backfill.runs")
    assert cache == [(True, True)], "the resumed run's oid cache names the tables it found by name"
    return message_rows(cluster, db)


def reference_rows(cluster, scratch):
    db = scratch.database("bk_reference")
    load(cluster, db, chats())
    query(cluster, db, "CREATE EXTENSION chat_backfill", clean=False)
    query(cluster, db, "SELECT count(*) FROM backfill_chat_messages(now => %s)", (NOW,), clean=False)
    return message_rows(cluster, db)


def test_the_owner_backs_up_and_restores_its_database_with_the_run_state(cluster, scratch, tmp_path):
    db, owner = owners_database(cluster, scratch, "bk_owner")
    run, rejected = query(cluster, db, RUN), query(cluster, db, REJECTED)
    assert run[0][1] == "stopped" and rejected, "a stopped run with rejections to carry"

    plain, custom = tmp_path / "app.sql", tmp_path / "app.dump"
    assert tool(cluster, "pg_dump", "-d", db, "-f", str(plain), user=owner) == (0, "")
    assert tool(cluster, "pg_dump", "-Fc", "-d", db, "-f", str(custom), user=owner) == (0, "")

    expected = reference_rows(cluster, scratch)
    # Into new databases of the same owner: pg_restore, and psql for the plain dump.
    restored = []
    for how in ("pg_restore", "psql"):
        new = scratch.database(f"bk_{how}", owner=owner)
        if how == "pg_restore":
            code, err = tool(cluster, "pg_restore", "--exit-on-error", "-d", new, str(custom), user=owner)
        else:
            code, err = tool(cluster, "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", new, "-f", str(plain), user=owner)
        assert (code, err) == (0, ""), f"{how}: {err[-2000:]}"
        assert query(cluster, new, RUN) == run and query(cluster, new, REJECTED) == rejected, how
        restored.append(new)
    for new in restored:
        assert finished_rows(cluster, new, owner) == expected
        # The sequences came along: the next run id is a new one.
        [(next_id,)] = query(cluster, new, "SELECT nextval('chat_backfill.runs_run_id_seq')")
        assert next_id > run[0][0]


def test_a_superusers_dump_is_restored_by_the_owner(cluster, scratch, tmp_path):
    """The other way round: a superuser's whole-database dump (as a provider's backup
    takes it), restored by the database owner into its new database."""
    db, owner = owners_database(cluster, scratch, "bk_super")
    run = query(cluster, db, RUN)
    custom = tmp_path / "super.dump"
    assert tool(cluster, "pg_dump", "-Fc", "-d", db, "-f", str(custom), user="postgres") == (0, "")
    new = scratch.database("bk_super_restored", owner=owner)
    code, err = tool(cluster, "pg_restore", "--exit-on-error", "--no-owner", "-d", new, str(custom), user=owner)
    assert (code, err) == (0, ""), err[-2000:]
    assert query(cluster, new, RUN) == run
    assert finished_rows(cluster, new, owner) == reference_rows(cluster, scratch)


def test_a_table_that_merely_has_a_recorded_oid_gains_nothing(cluster, scratch, tmp_path):
    """After a restore the recorded oids belong to whatever the new cluster gave them to. A
    role with no rights on chat makes a table of its own (a temp table: PUBLIC may) and the
    state is made to record that table's oid for both source and target, as a restore into a
    cluster where that role had burned oids (lo_create) up to the old ones would leave it.
    0.6.0 judged rights by the oid, so that role read the rejected messages' content and
    chat ids and could advance or delete the run. Now it sees and changes nothing, and the
    owner's run resumes by name."""
    db, owner = owners_database(cluster, scratch, "bk_oids")
    custom = tmp_path / "app.dump"
    assert tool(cluster, "pg_dump", "-Fc", "-d", db, "-f", str(custom), user=owner) == (0, "")
    new = scratch.database("bk_oids_restored", owner=owner)
    assert tool(cluster, "pg_restore", "--exit-on-error", "-d", new, str(custom), user=owner) == (0, "")
    mallory = scratch.role("mallory")
    with connect(cluster, new, mallory) as conn, conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE chat (id text, user_id text, chat json)")
        cur.execute("SELECT 'pg_temp.chat'::regclass::oid")
        [(hers,)] = cur.fetchall()
        for table in ("runs", "rejected_messages"):
            query(cluster, new, f"UPDATE chat_backfill.{table} SET source_oid = %s, target_oid = %s", (hers, hers))
        for sql in ["SELECT * FROM chat_backfill.runs", "SELECT * FROM chat_backfill.rejected_messages",
                    "SELECT * FROM chat_backfill.status", "SELECT * FROM chat_backfill.run_ranges"]:
            cur.execute(sql)
            assert cur.fetchall() == [], f"mallory sees: {sql}"
        for sql in ["UPDATE chat_backfill.runs SET status = 'finished', last_key = 'zzzz'",
                    "DELETE FROM chat_backfill.runs", "DELETE FROM chat_backfill.rejected_messages"]:
            cur.execute(sql)
            assert cur.rowcount == 0, sql
        # Rows claiming the owner's tables with her table's oid are refused.
        try:
            cur.execute("INSERT INTO chat_backfill.runs (source_oid, target_oid, source, target, high_water, total_chats, "
                        "now, status) VALUES (%s, %s, 'public.chat', 'public.chat_message', 'zzzz', 1, 0, 'finished')",
                        (hers, hers))
            raise AssertionError("mallory added a run")
        except Exception as e:  # noqa: BLE001 (psycopg2.Error, judged by its code)
            assert getattr(e, "pgcode", None) == "42501", e
        assert finished_rows(cluster, new, owner) == reference_rows(cluster, scratch)


def rls_database(cluster, scratch):
    """chat with row-level security: each role sees the chats whose user_id is its name.
    alice's and bob's chats; one of bob's has a message that is rejected; bob's chats have
    the greatest keys, so a run over all chats has one of his as its high-water mark."""
    db = scratch.database("bk_rls")
    alice, bob = scratch.role("alice"), scratch.role("bob")
    bad = '{"history":{"messages":{"m1":{"role":"user","content":"secret of bob","timestamp":1},' \
          '"m2":{"role":{"not":"text"},"content":"bob private","timestamp":2}}}}'
    good = '{"history":{"messages":{"m1":{"role":"user","content":"hello","timestamp":1}}}}'
    data = [chatgen.Chat(f"a{i}", alice, good) for i in range(3)] + \
           [chatgen.Chat("b0", bob, good), chatgen.Chat("b1", bob, bad), chatgen.Chat("b2", bob, good)]
    load(cluster, db, data)
    query(cluster, db, "CREATE EXTENSION chat_backfill", clean=False)
    for r in (alice, bob):
        query(cluster, db, f"GRANT SELECT ON public.chat TO {r}; GRANT INSERT, SELECT (id) ON public.chat_message TO {r}")
    query(cluster, db, "ALTER TABLE public.chat ENABLE ROW LEVEL SECURITY; "
                       "CREATE POLICY own ON public.chat USING (user_id = current_user)")
    return db, alice, bob


def seen(cluster, db, role):
    return {
        "runs": query(cluster, db, "SELECT run_id, high_water, last_key FROM chat_backfill.runs ORDER BY 1", user=role),
        "status": query(cluster, db, "SELECT run_id, chats_done FROM chat_backfill.status ORDER BY 1", user=role),
        "rejected": query(cluster, db, "SELECT chat_id, message::text FROM chat_backfill.rejected_messages", user=role),
    }


def test_the_sources_row_level_security_decides_who_sees_the_state(cluster, scratch):
    """The table owner (a superuser here) runs the backfill over every chat. 0.6.0 showed
    its run (high_water: bob's chat id) and bob's rejected message to alice, whom the
    source shows only her own chats:

        SELECT * FROM chat_backfill.rejected_messages;  -- as alice: bob's message text
        SELECT last_key, high_water FROM chat_backfill.runs;
    """
    db, alice, bob = rls_database(cluster, scratch)
    query(cluster, db, f"CALL backfill_chat_messages_resumable(now => {NOW})", clean=False)
    [(owners_run,)] = query(cluster, db, "SELECT run_id FROM chat_backfill.runs")
    assert seen(cluster, db, alice) == {"runs": [], "status": [], "rejected": []}
    # bob sees the rejection of his chat, not the owner's run (he did not start it).
    bobs = seen(cluster, db, bob)
    assert [c for c, _ in bobs["rejected"]] == ["b1"] and bobs["runs"] == [] and bobs["status"] == []

    # Nor can she change or remove what she cannot see (no WHERE: no SELECT policy is asked).
    with connect(cluster, db, alice) as conn, conn.cursor() as cur:
        for sql in ["UPDATE chat_backfill.runs SET status = 'finished'", "DELETE FROM chat_backfill.runs",
                    "DELETE FROM chat_backfill.rejected_messages"]:
            cur.execute(sql)
            assert cur.rowcount == 0, sql
    # alice's own run covers her chats: she sees it, with her keys; bob does not.
    with connect(cluster, db, alice) as conn, conn.cursor() as cur:
        cur.execute(f"CALL backfill_chat_messages_resumable(now => {NOW})")
    hers = seen(cluster, db, alice)
    assert [(h, k) for _, h, k in hers["runs"]] == [("a2", "a2")] and hers["rejected"] == []
    assert hers["runs"][0][0] != owners_run
    assert seen(cluster, db, bob)["runs"] == []
    # The one-transaction form's rejections follow the same rule.
    with connect(cluster, db, bob) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM chat_backfill.rejected_messages")
        cur.execute(f"SELECT count(*) FROM backfill_chat_messages(now => {NOW})")
    assert [c for c, _ in seen(cluster, db, bob)["rejected"]] == ["b1"]
    assert seen(cluster, db, alice)["rejected"] == []
    # The owner, whom the source's policies do not restrict, sees everything.
    assert len(query(cluster, db, "SELECT * FROM chat_backfill.runs")) == 2
