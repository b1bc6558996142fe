"""chat_backfill.plan(), admission control of the one-transaction form, and the
chat_backfill.* settings, against a real server.

plan()'s estimates come from a trial run over a sample whose rows go to a temporary table
made like the target, never to the target (rolled back either way): here they are compared
with what the real run then measured (rows, target growth, WAL), as ranges (within 2x,
the issue's bar), never as timings. The golden output of its checks is in
tests/pg_regress/sql/plan.sql.
"""

from __future__ import annotations

import json
import math
import re

import psycopg2
import pytest

import chatgen
from conftest import CHAT_DDL
from load_sample import TARGET_DDL, copy_chats

NOW = chatgen.NOW


def make_db(cluster, chats, prefix) -> str:
    db = cluster.create_db(prefix)
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(CHAT_DDL)
        copy_chats(conn, chats)
        cur.execute(TARGET_DDL)
        cur.execute("ANALYZE chat")
    return db


def plan(cur, args="") -> dict[str, tuple]:
    cur.execute(f"SELECT item, status, value, detail, advice FROM chat_backfill.plan({args})")
    return {item: (status, None if value is None else float(value), detail, advice)
            for item, status, value, detail, advice in cur.fetchall()}


def state(cur) -> tuple:
    cur.execute("SELECT (SELECT count(*) FROM chat_message), (SELECT count(*) FROM chat_backfill.rejected_messages), "
                "(SELECT count(*) FROM chat_backfill.runs)")
    return cur.fetchone()


@pytest.fixture(scope="module")
def big_db(cluster):
    """Several MB of realistic chats: a 1 MB sample reads only part of it."""
    chats = chatgen.realistic_chats(seed=21, count=700, content_bytes=(300, 5000), messages=(2, 24))
    return make_db(cluster, chats + chatgen.hostile_chats(), "plan_big")


def run_and_measure(cur, args="") -> dict[str, float]:
    """The one-transaction run with `args`, and what it cost, under plan()'s item names."""
    cur.execute("SELECT pg_total_relation_size('chat_message'), pg_current_wal_lsn()")
    size_before, lsn_before = cur.fetchone()
    cur.execute("SELECT sum(messages_inserted + messages_rejected + messages_existing), sum(chats_read), count(*) "
                f"FROM backfill_chat_messages(now => {NOW}, force => true{args})")
    messages, chats, batches = cur.fetchone()
    cur.execute("SELECT pg_total_relation_size('chat_message') - %s, pg_wal_lsn_diff(pg_current_wal_lsn(), %s)",
                (size_before, lsn_before))
    grown, wal = cur.fetchone()
    return {"chats": chats, "estimated_messages": messages, "estimated_target_bytes": grown,
            "estimated_wal_bytes": wal, "batches": batches}


def planned_batches(p) -> float:
    detail = p["estimated_seconds_resumable"][2]
    return float(re.search(r"about (\d+) batches", detail).group(1))


def assert_within_2x(p, measured):
    ratios = {item: (planned_batches(p) if item == "batches" else p[item][1]) / float(actual)
              for item, actual in measured.items()}
    assert all(0.5 <= r <= 2.0 for r in ratios.values()), f"estimated / measured: {ratios}"


def test_estimates_from_a_sample_are_within_2x_of_the_run(cluster, big_db):
    with cluster.connect(big_db) as conn, conn.cursor() as cur:
        cur.execute("SET chat_backfill.plan_sample_size = '1MB'")
        # Small batches, so that the batch count is an estimate too, not one batch.
        p = plan(cur, "batch_size => 200")
        assert 0 < p["sample"][1] < 100, "the sample must be part of the source for this test"
        assert state(cur) == (0, 0, 0), "plan() wrote nothing"
        measured = run_and_measure(cur, ", batch_size => 200")
        assert measured["batches"] > 5
    assert_within_2x(p, measured)
    assert p["estimated_seconds"][1] > 0 and p["estimated_seconds_resumable"][1] >= p["estimated_seconds"][1]


def test_a_sample_that_draws_no_row_grows_until_it_does(cluster, big_db):
    """Toasted chats leave few heap pages: a share of the source's bytes can draw none of
    them. The estimate must not then be zero (admission would let anything through)."""
    with cluster.connect(big_db) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_total_relation_size('chat')")
        (total,) = cur.fetchone()
        empty = []
        for kb in (64, 128, 256):
            cur.execute("SELECT count(*) FROM chat TABLESAMPLE SYSTEM (%s) REPEATABLE (0)", (100.0 * kb * 1024 / total,))
            if cur.fetchone()[0] == 0:
                empty.append(kb)
        assert empty, "some small share must draw no row for this test"
        cur.execute(f"SET chat_backfill.plan_sample_size = '{empty[0]}kB'")
        p = plan(cur)
        assert 100.0 * empty[0] * 1024 / total < p["sample"][1] < 100
        assert p["chats"][1] > 0 and p["estimated_messages"][1] > 0 and p["estimated_wal_bytes"][1] > 0


def test_a_filter_that_passes_nothing_does_not_make_the_sample_read_the_source(cluster):
    """A sample with no chat passing source_filter is read once more, ten times bigger, and
    no more: the trial stays bounded whatever the filter. (Short chats, many heap pages: a
    sample of a few pages already holds rows.)"""
    db = make_db(cluster, chatgen.realistic_chats(seed=23, count=2500, content_bytes=(100, 1500), messages=(2, 12)),
                 "plan_filter")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SET chat_backfill.plan_sample_size = '64kB'")
        first = plan(cur)["sample"][1]
        assert first < 10, "the source must be over ten samples big for this test"
        p = plan(cur, "source_filter => $$id = 'no such chat'$$")
        assert p["sample"][1] == pytest.approx(10 * first, rel=1e-3)
        assert p["estimated_messages"][1] == 0 and p["chats"][1] == 0
        assert "no sampled chat passes source_filter" in p["sample"][2]


SHAPES = {
    # A partitioned table: the parent has no storage of its own; the sample is of its partitions.
    "partitioned": """
        ALTER TABLE chat RENAME TO chat_load;
        CREATE TABLE chat (id text, user_id text, title text, chat json) PARTITION BY HASH (id);
        CREATE TABLE chat_p0 PARTITION OF chat FOR VALUES WITH (MODULUS 3, REMAINDER 0);
        CREATE TABLE chat_p1 PARTITION OF chat FOR VALUES WITH (MODULUS 3, REMAINDER 1);
        CREATE TABLE chat_p2 PARTITION OF chat FOR VALUES WITH (MODULUS 3, REMAINDER 2);
        INSERT INTO chat SELECT * FROM chat_load; DROP TABLE chat_load;""",
    # An inheritance parent holding some rows itself, with two children holding the rest
    # (each row written where it lives, as an application would: no dead rows to count).
    "inheritance": """
        ALTER TABLE chat RENAME TO chat_load;
        CREATE TABLE chat (id text, user_id text, title text, chat json);
        CREATE TABLE chat_old () INHERITS (chat);
        CREATE TABLE chat_new () INHERITS (chat);
        INSERT INTO chat_old SELECT * FROM chat_load WHERE id < '5';
        INSERT INTO chat_new SELECT * FROM chat_load WHERE id > 'b';
        INSERT INTO chat SELECT * FROM chat_load WHERE id BETWEEN '5' AND 'b';
        DROP TABLE chat_load;""",
    # A view: no pages at all; its first rows are read, scaled by the planner's row count.
    "view": """
        ALTER TABLE chat RENAME TO chat_data;
        CREATE VIEW chat AS SELECT id, user_id, title, chat FROM chat_data;""",
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_source_without_pages_of_its_own_is_sampled_not_read_whole(cluster, shape):
    db = cluster.create_db(f"plan_{shape}")
    # Short chats, many to a page: each table under a parent has pages enough to sample.
    chats = chatgen.realistic_chats(seed=23, count=2500, content_bytes=(100, 1500), messages=(2, 12))
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE chat (id text, user_id text, title text, chat json)")
        copy_chats(conn, chats)
        cur.execute(SHAPES[shape])
        cur.execute("SELECT count(*) FROM chat")
        assert cur.fetchone() == (len(chats),)
        # Rows of any of these shapes cannot be checked by a foreign key to "chat".
        cur.execute(TARGET_DDL.replace(" REFERENCES chat(id) ON DELETE CASCADE", ""))
        cur.execute("ANALYZE")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SET chat_backfill.plan_sample_size = '1MB'")
        p = plan(cur, "batch_size => 200")
        assert 0 < p["sample"][1] < 50, f"{shape}: the trial read part of the source: {p['sample'][2]}"
        assert p["source_bytes"][1] > (0 if shape == "view" else 4 * 1024 * 1024)
        assert state(cur) == (0, 0, 0)
        measured = run_and_measure(cur, ", batch_size => 200")
    assert_within_2x(p, measured)


def test_stale_statistics_that_say_empty_do_not_scale_the_estimates_to_zero(cluster):
    """VACUUM of an emptied table records 0 rows over its pages; rows written since fill those
    pages. Density from those statistics would make every estimate 0."""
    db = cluster.create_db("plan_stale")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE chat (id text PRIMARY KEY, user_id text, title text, chat json) "
                    "WITH (vacuum_truncate = false, autovacuum_enabled = false)")
        copy_chats(conn, chatgen.realistic_chats(seed=24, count=600, content_bytes=(300, 5000), messages=(2, 24)))
        cur.execute("DELETE FROM chat")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        conn.autocommit = True
        cur.execute("VACUUM chat")
        cur.execute("SELECT reltuples, relpages > 0 FROM pg_class WHERE oid = 'chat'::regclass")
        assert cur.fetchone() == (0.0, True)
        copy_chats(conn, chatgen.realistic_chats(seed=25, count=600, content_bytes=(300, 5000), messages=(2, 24)))
        cur.execute(TARGET_DDL)
        cur.execute("SET chat_backfill.plan_sample_size = '1MB'")
        p = plan(cur)
        assert 0 < p["sample"][1] < 100
        measured = run_and_measure(cur)
    measured.pop("batches")
    assert_within_2x(p, measured)


@pytest.mark.parametrize("shape", ["table", "view"])
def test_a_source_read_whole_gives_exact_counts_and_nothing_stays(cluster, shape):
    """Hostile chats included: skipped chats count once, as the run counts them, and the
    batches are the run's, from a table or from a view read to its end."""
    db = make_db(cluster, chatgen.realistic_chats(seed=3, count=40, content_bytes=(100, 400), messages=(1, 6))
                 + chatgen.hostile_chats(), f"plan_small_{shape}")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        if shape == "view":
            cur.execute("ALTER TABLE chat RENAME TO chat_data; CREATE VIEW chat AS SELECT * FROM chat_data")
        cur.execute("SELECT nextval('chat_backfill.runs_run_id_seq')")
        (run_seq,) = cur.fetchone()
        p = plan(cur, "batch_size => 20")
        assert p["sample"][1] == 100.0
        assert state(cur) == (0, 0, 0), "the trial's rows and rejections were rolled back"
        assert not [n for n in conn.notices if "chat_backfill" in n], "the trial says nothing"
        cur.execute("SELECT nextval('chat_backfill.runs_run_id_seq')")
        assert cur.fetchone() == (run_seq + 1,), "plan() takes no run id"
        cur.execute("SELECT sum(messages_inserted + messages_rejected), sum(chats_read), sum(chats_skipped), count(*) "
                    "FROM backfill_chat_messages(now => %s, batch_size => 20)", (NOW,))
        messages, chats, skipped, batches = cur.fetchone()
    assert skipped > 0, "the hostile chats include skipped ones"
    assert (p["estimated_messages"][1], p["chats"][1], planned_batches(p)) == (messages, chats, batches)


def test_plan_and_admission_write_nothing_into_the_target(cluster):
    """Issue 23: the estimate's trial used to write its sample into the target and roll it
    back, leaving dead tuples and grown files, firing the target's triggers and advancing the
    sequences its defaults draw from. Its rows now go to a temporary table made like the
    target."""
    db = make_db(cluster, chatgen.realistic_chats(seed=23, count=200, content_bytes=(300, 3000), messages=(2, 12)),
                 "plan_no_writes")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("ALTER TABLE chat_message ADD COLUMN n bigserial; "
                    "CREATE FUNCTION public.noisy() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE NOTICE 'noisy trigger ran'; RETURN NEW; END $$; "
                    "CREATE TRIGGER noisy BEFORE INSERT ON chat_message FOR EACH ROW EXECUTE FUNCTION public.noisy()")
        files = ("SELECT sum(pg_relation_size(c.oid)) FROM pg_class c WHERE c.oid = 'chat_message'::regclass "
                 "OR c.oid = (SELECT reltoastrelid FROM pg_class WHERE oid = 'chat_message'::regclass) "
                 "OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = 'chat_message'::regclass)")
        cur.execute(files)
        (before,) = cur.fetchone()
        p = plan(cur)
        assert p["estimated_messages"][1] > 0 and p["estimated_target_bytes"][1] > 0 and p["estimated_wal_bytes"][1] > 0
        cur.execute("SET chat_backfill.max_atomic_wal = '1kB'")
        with pytest.raises(psycopg2.Error) as e:
            cur.execute("SELECT * FROM backfill_chat_messages(now => %s)", (NOW,))
        assert e.value.pgcode == "53400", "admission ran its trial"
        cur.execute(files)
        assert cur.fetchone() == (before,), "the target's files did not grow"
        assert not [n for n in conn.notices if "noisy" in n], conn.notices
        cur.execute("SELECT last_value, is_called FROM chat_message_n_seq")
        assert cur.fetchone() == (1, False), "no default of the target was drawn"
        cur.execute("SELECT pg_stat_force_next_flush()")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT n_tup_ins, n_dead_tup FROM pg_stat_user_tables WHERE relid = 'chat_message'::regclass")
        assert cur.fetchone() == (0, 0)
        # Control: the run itself fires the trigger and grows the files.
        cur.execute("SELECT sum(messages_inserted) FROM backfill_chat_messages(now => %s, force => true)", (NOW,))
        assert [n for n in conn.notices if "noisy" in n]
        cur.execute(files)
        assert cur.fetchone()[0] > before


def test_plan_plans_either_row_mode(cluster):
    """Issue 23: plan() takes rows => 'app' as the backfill does; over a source read whole its
    counts are the app-mode run's, and they differ from the migration's on these chats."""
    db = make_db(cluster, chatgen.realistic_chats(seed=24, count=40, content_bytes=(100, 400), messages=(1, 6))
                 + chatgen.hostile_chats(), "plan_app")
    counts = {}
    with cluster.connect(db) as conn, conn.cursor() as cur:
        # Open WebUI's head schema, which rows => 'app' writes (the migration's columns and two).
        cur.execute("ALTER TABLE chat_message ADD COLUMN meta json, ADD COLUMN context_summary text")
        for rows in ("migration", "app"):
            p = plan(cur, f"rows => '{rows}'")
            assert p["sample"][1] == 100.0
            cur.execute("SELECT sum(messages_inserted + messages_rejected), sum(chats_read) "
                        "FROM backfill_chat_messages(now => %s, dry_run => true, rows => %s)", (NOW, rows))
            messages, chats = cur.fetchone()
            assert (p["estimated_messages"][1], p["chats"][1]) == (messages, chats), rows
            counts[rows] = messages
    assert counts["app"] != counts["migration"], "the modes agree here: this test could not tell them apart"


def test_plan_compares_lz4_where_the_target_compresses_with_pglz(cluster):
    """Issue 23: plan() says how the target compresses what the backfill writes; where that is
    pglz on a server with lz4 it compares the two on the trial's rows and advises, and the
    backfill leaves the columns' settings as they are."""
    # Messages of prose that compresses, as real chats' does (the generator's text does not).
    chats = [chatgen.Chat(f"c{i}", "u", json.dumps({"history": {"messages": {
        f"m{i}-{j}": {"id": f"m{i}-{j}", "role": "user", "timestamp": 1700000000 + j,
                      "content": f"message {j} of chat {i}: " + "the quick brown fox jumps over the lazy dog " * 120}
        for j in range(6)}}})) for i in range(60)]
    db = make_db(cluster, chats, "plan_lz4")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'")
        if not cur.fetchone()[0]:
            pytest.skip("this server was built without lz4")
        cur.execute("SET default_toast_compression = pglz")
        status, value, detail, advice = plan(cur)["compression"]
        assert status == "info" and value is not None, detail
        assert detail.startswith("pglz compresses content"), detail
        assert "ALTER TABLE public.chat_message ALTER COLUMN content SET COMPRESSION lz4" in advice, advice
        # A column set to lz4 is not named; with lz4 as the default, nothing is left to advise.
        cur.execute("ALTER TABLE chat_message ALTER COLUMN content SET COMPRESSION lz4")
        assert "content" not in plan(cur)["compression"][2].split(";")[0]
        cur.execute("SET default_toast_compression = lz4")
        assert plan(cur)["compression"][0] == "ok"
        cur.execute("SELECT attname, attcompression FROM pg_attribute WHERE attrelid = 'chat_message'::regclass "
                    "AND attnum > 0 ORDER BY attnum")
        before = cur.fetchall()
        cur.execute("SELECT count(*) FROM backfill_chat_messages(now => %s)", (NOW,))
        cur.execute("SELECT attname, attcompression FROM pg_attribute WHERE attrelid = 'chat_message'::regclass "
                    "AND attnum > 0 ORDER BY attnum")
        assert cur.fetchall() == before, "the backfill changed no column's compression"


SPY_INDEX = """
CREATE SEQUENCE public.spied;
CREATE FUNCTION public.spy_index(j json) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
  IF j::text = '"boom"' THEN RAISE EXCEPTION 'boom'; END IF;
  PERFORM nextval('public.spied');
  RETURN 'x';
END $$;
"""


def spied(cur) -> tuple:
    cur.execute("SELECT last_value, is_called FROM public.spied")
    return cur.fetchone()


def test_the_trial_evaluates_only_the_indexes_an_insert_would(cluster):
    """The fourteenth review (high): the trial copied every index of the target, also one a
    failed CREATE INDEX CONCURRENTLY left not ready and a partitioned table's ON ONLY index
    without its partitions' (an INSERT evaluates neither), so a target's owner had its
    index expression run as the caller of plan() or of the backfill."""
    db = make_db(cluster, chatgen.realistic_chats(seed=26, count=40, content_bytes=(100, 400), messages=(1, 4)),
                 "plan_ready")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(SPY_INDEX)
        cur.execute("INSERT INTO chat (id, user_id, chat) VALUES ('seed', 'u', '{}'); "
                    "INSERT INTO chat_message (id, chat_id, role, content, created_at, updated_at) "
                    "VALUES ('seed', 'seed', 'user', '\"boom\"', 0, 0)")
        with pytest.raises(psycopg2.Error):
            cur.execute("CREATE INDEX CONCURRENTLY spy ON chat_message ((public.spy_index(content)))")
        cur.execute("SELECT indisready, indisvalid FROM pg_index WHERE indexrelid = 'spy'::regclass")
        assert cur.fetchone() == (False, False)
        cur.execute("CREATE TABLE chat_message_p (LIKE chat_message INCLUDING DEFAULTS) PARTITION BY HASH (id); "
                    "ALTER TABLE chat_message_p ADD PRIMARY KEY (id); "
                    "CREATE TABLE chat_message_p0 PARTITION OF chat_message_p FOR VALUES WITH (MODULUS 1, REMAINDER 0); "
                    "CREATE INDEX spy_p ON ONLY chat_message_p ((public.spy_index(content)))")
        cur.execute("SELECT nextval('public.spied')")  # counts from 1 from here on
        for target in ("chat_message", "chat_message_p"):
            assert plan(cur, f"target => '{target}'")["estimated_messages"][1] > 0
            cur.execute("SET chat_backfill.max_atomic_wal = '1kB'")
            with pytest.raises(psycopg2.Error) as e:
                cur.execute(f"SELECT * FROM backfill_chat_messages(target => '{target}', now => {NOW})")
            assert e.value.pgcode == "53400"
            cur.execute("RESET chat_backfill.max_atomic_wal")
            assert spied(cur) == (1, True), target
        # Control: an index an INSERT does evaluate runs in the trial too.
        cur.execute("DROP INDEX spy; TRUNCATE chat_message; "
                    "CREATE INDEX spy ON chat_message ((public.spy_index(content)))")
        plan(cur)
        assert spied(cur)[0] > 1, "the trial evaluated no index: this test could not fail"


def test_generated_columns_and_an_unlogged_target_are_priced(cluster):
    """The fourteenth review (medium): the trial's table had only the columns the backfill
    writes, so a target's stored generated column (and its index) was not priced, and
    admission let a run through at three times the WAL it estimated. An unlogged target's
    rows write no WAL."""
    db = make_db(cluster, chatgen.realistic_chats(seed=27, count=150, content_bytes=(500, 3000), messages=(2, 10)),
                 "plan_generated")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        plain = plan(cur)
        cur.execute("ALTER TABLE chat_message ADD COLUMN body text GENERATED ALWAYS AS (content::text) STORED, "
                    "ADD COLUMN body_too text GENERATED ALWAYS AS (content::text || 'x') STORED")
        cur.execute("CREATE INDEX ON chat_message (md5(body))")
        generated = plan(cur)
        assert generated["estimated_target_bytes"][1] > 1.3 * plain["estimated_target_bytes"][1]
        assert generated["estimated_wal_bytes"][1] > 1.3 * plain["estimated_wal_bytes"][1]
        assert "not counted" not in generated["estimated_target_bytes"][2]
        measured = run_and_measure(cur)
        for item in ("estimated_target_bytes", "estimated_wal_bytes"):
            assert 0.5 <= generated[item][1] / float(measured[item]) <= 2.0, (item, generated[item][1], measured[item])
        cur.execute("TRUNCATE chat_message; ALTER TABLE chat_message SET UNLOGGED")
        unlogged = plan(cur)
        assert unlogged["estimated_wal_bytes"][1] == 0 and unlogged["estimated_target_bytes"][1] > 0


def test_a_cancel_while_the_trial_is_made_stops_it(cluster):
    """The fifteenth review: the trial made the target's indexes each in a subtransaction
    that caught every error, a cancel or a statement_timeout included, so a target with many
    indexes made plan() and the backfill run on past them. Only what a copy can fail with for
    what the target has is caught now. A superuser's event trigger raises 57014 here, as a
    cancel arriving during a CREATE INDEX would."""
    db = make_db(cluster, chatgen.realistic_chats(seed=29, count=20, content_bytes=(100, 400), messages=(1, 4)),
                 "plan_cancel")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("CREATE FUNCTION public.cancel_trial() RETURNS event_trigger LANGUAGE plpgsql AS $$ "
                    "BEGIN IF EXISTS (SELECT FROM pg_event_trigger_ddl_commands() "
                    "                 WHERE command_tag = 'CREATE INDEX' AND object_identity LIKE '%chat_backfill_trial%') "
                    "THEN RAISE EXCEPTION 'canceling statement due to user request' USING ERRCODE = 'query_canceled'; "
                    "END IF; END $$; "
                    "CREATE EVENT TRIGGER cancel_trial ON ddl_command_end EXECUTE FUNCTION public.cancel_trial()")
        try:
            with pytest.raises(psycopg2.Error) as e:
                plan(cur)
            assert e.value.pgcode == "57014"
            with pytest.raises(psycopg2.Error) as e:
                cur.execute("SELECT * FROM backfill_chat_messages(now => %s)", (NOW,))
            assert e.value.pgcode == "57014"
        finally:
            cur.execute("DROP EVENT TRIGGER cancel_trial")
        assert plan(cur)["estimated_messages"][1] > 0


def test_a_partitioned_target_is_priced_as_its_partitions_write(cluster):
    """The fifteenth review: an unlogged partitioned parent with logged partitions was priced
    at no WAL; indexes of a partition alone were neither priced nor named; and a partitioned
    target's generated column was made with the parent's expression, while from 16 on each
    partition may compute it with its own (which an INSERT runs): it is named, not made."""
    db = make_db(cluster, chatgen.realistic_chats(seed=30, count=60, content_bytes=(300, 2000), messages=(1, 6)),
                 "plan_partitions")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(SPY_INDEX)
        cur.execute("SELECT string_agg(format('%I %s', attname, format_type(atttypid, atttypmod)), ', ' ORDER BY attnum) "
                    "FROM pg_attribute WHERE attrelid = 'chat_message'::regclass AND attnum > 0 AND NOT attisdropped")
        columns = cur.fetchone()[0]
        cur.execute(f"CREATE UNLOGGED TABLE chat_message_p ({columns}, "
                    "g text GENERATED ALWAYS AS (public.spy_index(content)) STORED, PRIMARY KEY (id)) "
                    "PARTITION BY HASH (id); "
                    "CREATE TABLE chat_message_p0 PARTITION OF chat_message_p FOR VALUES WITH (MODULUS 1, REMAINDER 0); "
                    "CREATE INDEX own_index ON chat_message_p0 (chat_id)")
        cur.execute("SELECT relpersistence FROM pg_class WHERE oid = 'chat_message_p0'::regclass")
        assert cur.fetchone() == ("p",), "the partition is logged"
        cur.execute("SELECT nextval('public.spied')")
        p = plan(cur, "target => 'chat_message_p'")
        assert p["estimated_wal_bytes"][1] > 0
        detail = p["estimated_target_bytes"][2]
        assert "own_index (an index of a partition only)" in detail, detail
        assert "generated column g (computed by each partition)" in detail, detail
        assert spied(cur) == (1, True), "the parent's generation expression ran"


def test_a_chat_that_compresses_well_and_that_the_sample_misses_is_priced(cluster):
    """The sixteenth review (medium): the estimate scaled what the sample measured by the
    source's bytes as stored, so one giant chat that compresses 50x, missed by the page
    sample, counted for a fiftieth of its rows, and admission let a run through at 2.2x
    max_atomic_wal. It scales by the chat text decompressed now, whose size the heap holds."""
    db = cluster.create_db("plan_compressible")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(CHAT_DDL)
        cur.execute(TARGET_DDL)
        # Ordinary chats of text that hardly compresses, and one of 10,000 messages that does.
        cur.execute("INSERT INTO chat (id, user_id, chat) SELECT 'n' || lpad(c::text, 5, '0'), 'u', "
                    "json_build_object('history', json_build_object('messages', (SELECT json_object_agg('m' || m, "
                    "json_build_object('id', 'm' || m, 'role', 'user', 'timestamp', 1700000000 + m, 'content', "
                    "(SELECT string_agg(md5(c || '-' || m || '-' || k), '') FROM generate_series(1, 48) k))) "
                    "FROM generate_series(1, 2) m))) FROM generate_series(1, 4000) c")
        cur.execute("INSERT INTO chat (id, user_id, chat) SELECT 'g0001', 'u', json_build_object('history', "
                    "json_build_object('messages', (SELECT json_object_agg('m' || m, json_build_object('id', 'm' || m, "
                    "'role', 'user', 'timestamp', 1700000000 + m, 'content', repeat('abcdefgh', 230))) "
                    "FROM generate_series(1, 10000) m)))")
        cur.execute("ANALYZE chat")
        cur.execute("SET chat_backfill.plan_sample_size = '2MB'")
        p = plan(cur)
        assert 0 < p["sample"][1] < 100
        cur.execute("SELECT pg_column_size(chat), octet_length(chat::text) FROM chat WHERE id = 'g0001'")
        stored, raw = cur.fetchone()
        assert raw > 20 * stored, "the giant compresses well: otherwise this test could not fail"
        measured = run_and_measure(cur)
    for item in ("estimated_messages", "estimated_wal_bytes", "estimated_target_bytes"):
        assert 0.5 <= p[item][1] / float(measured[item]) <= 2.0, (item, p[item][1], measured[item])


def test_the_trial_needs_temporary_and_takes_a_free_name(cluster):
    """The fourteenth review (low): a role without TEMPORARY got the hint for it, as does any
    other failure of the temporary table now not; a temporary table of the caller's own with
    the name the trial would take made plan() fail once (42P07)."""
    db = make_db(cluster, chatgen.realistic_chats(seed=28, count=20, content_bytes=(100, 400), messages=(1, 4)),
                 "plan_temp")
    role = f"no_temp_{db[-10:]}"
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE ROLE {role}; GRANT SELECT ON chat TO {role}; "
                    f"GRANT SELECT, INSERT ON chat_message TO {role}; "
                    f'REVOKE TEMPORARY ON DATABASE "{db}" FROM PUBLIC')
        try:
            cur.execute(f"SET ROLE {role}")
            with pytest.raises(psycopg2.Error) as e:
                plan(cur)
            assert e.value.pgcode == "42501" and "GRANT TEMPORARY" in e.value.diag.message_hint
            cur.execute("RESET ROLE")
        finally:
            cur.execute(f'GRANT TEMPORARY ON DATABASE "{db}" TO PUBLIC; DROP OWNED BY {role}; DROP ROLE {role}')
        cur.execute("SELECT pg_backend_pid()")
        (pid,) = cur.fetchone()
        for n in range(8):
            cur.execute(f'CREATE TEMP TABLE "chat_backfill_trial_{pid}_{n}" ()')
        assert plan(cur)["estimated_messages"][1] > 0


def test_admission_looks_twice_only_near_its_limit(cluster):
    """Issue 23: admission's first look is a sample in proportion to the source (the full
    one cost up to 9% of a short run); it admits a run estimated at no more than half the
    limit. Nearer the limit, or over it, plan()'s own sample decides, so a refusal never rests
    on the small one."""
    db = make_db(cluster, chatgen.realistic_chats(seed=31, count=800, content_bytes=(300, 5000), messages=(2, 24)),
                 "plan_looks")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        wal = plan(cur)["estimated_wal_bytes"][1]
        assert wal > 8 << 20, "limits in whole MB need a bigger estimate: this test could not tell the looks apart"

        def admission(limit_mb):
            cur.execute(f"SET chat_backfill.max_atomic_wal = '{limit_mb}MB'")
            cur.execute("SET client_min_messages = debug1")
            conn.notices.clear()
            cur.execute("BEGIN")
            try:
                cur.execute("SELECT sum(messages_inserted) FROM backfill_chat_messages(now => %s)", (NOW,))
                refused = None
            except psycopg2.Error as e:
                refused = e.pgcode
            cur.execute("ROLLBACK")
            said = [n.split("admission: ")[1] for n in conn.notices if "chat_backfill admission:" in n]
            assert len(said) == 1, conn.notices
            return refused, said[0]

        mb = wal / (1 << 20)
        refused, said = admission(math.ceil(mb * 4))
        assert refused is None and "admitted at the first look" in said, said
        refused, said = admission(math.ceil(mb * 1.25))
        assert refused is None and "admitted at the second look" in said, said
        refused, said = admission(math.floor(mb * 0.8))
        assert refused == "53400" and "refused at the second look" in said, said
        cur.execute("SELECT count(*) FROM chat_message")
        assert cur.fetchone() == (0,)


def test_admission_refuses_over_max_atomic_wal_with_a_hint_and_force_runs(cluster):
    db = cluster.create_db("plan_admit")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(CHAT_DDL)
        copy_chats(conn, chatgen.realistic_chats(seed=22, count=300, content_bytes=(300, 5000), messages=(2, 24)))
        cur.execute(TARGET_DDL)
        # An operator's setting for every session of the database.
        cur.execute(f'ALTER DATABASE "{db}" SET chat_backfill.max_atomic_wal = \'1MB\'')
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SHOW chat_backfill.max_atomic_wal")
        assert cur.fetchone() == ("1MB",)
        with pytest.raises(psycopg2.Error) as e:
            cur.execute("SELECT * FROM backfill_chat_messages(now => %s)", (NOW,))
        err = e.value
        assert err.pgcode == "53400"
        assert "chat_backfill.max_atomic_wal" in err.pgerror and "of WAL in one transaction" in err.pgerror
        assert "CALL backfill_chat_messages_resumable()" in err.diag.message_hint
        assert "force => true" in err.diag.message_hint
        assert "temporary table" in err.diag.message_detail
        assert state(cur) == (0, 0, 0), "refused before writing anything"
        status = plan(cur)["admission"]
        assert status[0] == "warning" and "53400" in status[2]
        # A dry run writes nothing, so it is never refused.
        cur.execute("SELECT sum(messages_inserted) FROM backfill_chat_messages(now => %s, dry_run => true)", (NOW,))
        (would,) = cur.fetchone()
        cur.execute("SELECT sum(messages_inserted) FROM backfill_chat_messages(now => %s, force => true)", (NOW,))
        assert cur.fetchone() == (would,) and would > 0
        # The committing form is what the hint names: it is not subject to the limit.
        cur.execute("TRUNCATE chat_message")
        cur.execute("CALL backfill_chat_messages_resumable(now => %s)", (NOW,))
        cur.execute("SELECT count(*) FROM chat_message")
        assert cur.fetchone() == (would,)
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SET chat_backfill.max_atomic_wal = -1")  # max_wal_size (1GB by default)
        cur.execute("TRUNCATE chat_message")
        cur.execute("SELECT sum(messages_inserted) FROM backfill_chat_messages(now => %s)", (NOW,))
        assert cur.fetchone() == (would,)


def test_settings_fill_null_arguments_and_arguments_win(cluster):
    db = make_db(cluster, chatgen.realistic_chats(seed=8, count=30, content_bytes=(100, 300), messages=(3, 8)), "plan_guc")
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM backfill_chat_messages(now => %s, batch_size => 25, dry_run => true)", (NOW,))
        (batches_25,) = cur.fetchone()
        cur.execute("SET chat_backfill.batch_size = 25")
        cur.execute("SELECT count(*), max(messages_inserted) FROM backfill_chat_messages(now => %s, dry_run => true)", (NOW,))
        assert cur.fetchone() == (batches_25, 25)
        cur.execute("SELECT count(*) FROM backfill_chat_messages(now => %s, batch_size => 5000, dry_run => true)", (NOW,))
        assert cur.fetchone() == (1,), "an argument wins over the setting"
        cur.execute("CALL backfill_chat_messages_resumable(now => %s)", (NOW,))
        cur.execute("SELECT batches FROM chat_backfill.status")
        assert cur.fetchone() == (batches_25,)
        assert plan(cur)["estimated_seconds_resumable"][2].endswith(f"of up to 25 messages, each committed")


def test_throttle_settings_apply_when_the_arguments_are_null(cluster):
    """A lag limit set once for the server is a real limit: a caller who cannot see the
    standbys is refused (42501), as with the argument, never silently unthrottled."""
    db = make_db(cluster, chatgen.realistic_chats(seed=9, count=5), "plan_throttle")
    role = f"guc_runner_{db[-6:]}"
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE ROLE {role}")
        cur.execute(f"GRANT SELECT ON chat TO {role}; GRANT SELECT, INSERT ON chat_message TO {role}")
        cur.execute(f"SET ROLE {role}")
        cur.execute("SET chat_backfill.max_replica_lag = '64MB'")
        with pytest.raises(psycopg2.Error) as e:
            cur.execute("CALL backfill_chat_messages_resumable(now => %s)", (NOW,))
        assert e.value.pgcode == "42501" and "pg_monitor" in e.value.diag.message_hint
        cur.execute("RESET chat_backfill.max_replica_lag")
        cur.execute("SET chat_backfill.max_wal_rate = 0.001")
        with pytest.raises(psycopg2.Error) as e:
            cur.execute("CALL backfill_chat_messages_resumable(now => %s)", (NOW,))
        # The error names the setting it came from, not an argument the caller never passed.
        assert e.value.pgcode == "22023" and "chat_backfill.max_wal_rate must be at least" in e.value.pgerror
        cur.execute("SET chat_backfill.max_wal_rate = 100")
        cur.execute("CALL backfill_chat_messages_resumable(now => %s)", (NOW,))
        cur.execute("RESET ROLE")
        cur.execute("SELECT state FROM chat_backfill.status")
        assert cur.fetchone() == ("finished",)
