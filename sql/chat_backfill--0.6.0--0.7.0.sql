-- chat_backfill 0.6.0 -> 0.7.0: checkpoints that go on inside a chat bigger than a batch, so
-- every CALL moves a run on however small its max_runtime (runs and key ranges keep the chat
-- a batch left unfinished, how many of its messages are handled, and its text's fingerprint);
-- rows a BEFORE trigger drops counted (messages_dropped); run state identified by table names,
-- which a restore keeps, instead of oids, which it does not; the source's row-level security
-- honoured by the state; the state owned by the extension's owner, so that role's pg_dump and
-- pg_restore of its database work. The definitions are the install script's, word for word
-- (the upgrade test compares them).

-- 0. Recorded names resolved without errors (the install script says why).
-- A recorded table name's table, or NULL. to_regclass raises 42501 for a schema the caller may
-- not use (another session's pg_temp_N among them): one row naming such a table would make the
-- state, and every backfill that reads it, fail for everyone else. This looks the schema up first,
-- and finds nothing for a name other than one or two parts spelled as %I quotes them (the
-- spelling the backfill records): parse_ident, lenient, stops at the first character it cannot
-- take (a "-"), where to_regclass would read on, e.g. to a third part whose schema it would not
-- look up.
CREATE FUNCTION chat_backfill.regclass_of(name pg_catalog.text) RETURNS pg_catalog.regclass LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT CASE pg_catalog.array_length(p.parts, 1)
           WHEN 1 THEN CASE WHEN name OPERATOR(pg_catalog.=) pg_catalog.format('%I'::pg_catalog.text, p.parts[1])
                            THEN pg_catalog.to_regclass(name) END
           WHEN 2 THEN CASE WHEN name OPERATOR(pg_catalog.=) pg_catalog.format('%I.%I'::pg_catalog.text, p.parts[1], p.parts[2])
                             AND EXISTS (SELECT FROM pg_catalog.pg_namespace n
                                          WHERE n.nspname OPERATOR(pg_catalog.=) p.parts[1]
                                            AND pg_catalog.has_schema_privilege(n.oid, 'USAGE'::pg_catalog.text))
                            THEN pg_catalog.to_regclass(name) END END
      FROM (SELECT pg_catalog.parse_ident(name, false) AS parts) p;
END;

-- 1. Checkpoints inside a chat.
ALTER TABLE chat_backfill.runs
    ADD COLUMN partial_key pg_catalog.text,
    ADD COLUMN partial_done pg_catalog.int8,
    ADD COLUMN partial_fingerprint pg_catalog.int8;
GRANT UPDATE (partial_key, partial_done, partial_fingerprint) ON chat_backfill.runs TO PUBLIC;
ALTER TABLE chat_backfill.run_ranges
    ADD COLUMN partial_key pg_catalog.text,
    ADD COLUMN partial_done pg_catalog.int8,
    ADD COLUMN partial_fingerprint pg_catalog.int8;
GRANT UPDATE (partial_key, partial_done, partial_fingerprint) ON chat_backfill.run_ranges TO PUBLIC;

-- 2. Rows a BEFORE trigger on the target dropped: a run's count; and how its last batch went
--    in (write_path); both shown last in the status view.
ALTER TABLE chat_backfill.runs ADD COLUMN messages_dropped pg_catalog.int8 NOT NULL DEFAULT 0;
GRANT UPDATE (messages_dropped) ON chat_backfill.runs TO PUBLIC;
ALTER TABLE chat_backfill.runs ADD COLUMN write_path pg_catalog.text;
GRANT UPDATE (write_path) ON chat_backfill.runs TO PUBLIC;
CREATE FUNCTION chat_backfill.status_rows()
RETURNS TABLE (
    run_id pg_catalog.int8, source pg_catalog.text, target pg_catalog.text, state pg_catalog.text,
    chats_done pg_catalog.int8, total_chats pg_catalog.int8, percent_done pg_catalog.numeric,
    messages_inserted pg_catalog.int8, messages_rejected pg_catalog.int8,
    messages_existing pg_catalog.int8, messages_skipped pg_catalog.int8,
    chats_skipped pg_catalog.int8, chats_vanished pg_catalog.int8, batches pg_catalog.int4,
    messages_per_second pg_catalog.numeric, estimated_time_left pg_catalog.interval,
    runner_pid pg_catalog.int4, last_key pg_catalog.text, high_water pg_catalog.text,
    started_at pg_catalog.timestamptz, updated_at pg_catalog.timestamptz,
    finished_at pg_catalog.timestamptz, last_error pg_catalog.text, started_by pg_catalog.text,
    replica_lag_bytes pg_catalog.int8, workers pg_catalog.int4, batch_size pg_catalog.int4,
    rows pg_catalog.text, messages_dropped pg_catalog.int8, write_path pg_catalog.text)
LANGUAGE sql STABLE
BEGIN ATOMIC
-- The lock table is read once (materialized), not once per run: read per run, its row
-- estimates priced a few hundred runs above jit_above_cost, and JIT compilation made every
-- read of the view take seconds.
WITH advisory AS MATERIALIZED (
    SELECT l.pid, l.database, l.classid, l.objid, l.objsubid
    FROM pg_catalog.pg_locks l
    WHERE l.locktype OPERATOR(pg_catalog.=) 'advisory'::pg_catalog.text AND l.granted
), held AS MATERIALIZED (
    SELECT l.pid, l.classid, l.objid, l.objsubid
    FROM advisory l
    WHERE l.database OPERATOR(pg_catalog.=) (SELECT d.oid FROM pg_catalog.pg_database d
                                             WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database())
      AND (l.objsubid OPERATOR(pg_catalog.=) 1::pg_catalog.int2
        OR (l.objsubid OPERATOR(pg_catalog.=) 2::pg_catalog.int2
            AND l.classid OPERATOR(pg_catalog.=) 1667329894::pg_catalog.oid
            AND EXISTS (SELECT FROM advisory m
                        WHERE m.pid OPERATOR(pg_catalog.=) l.pid
                          AND m.objsubid OPERATOR(pg_catalog.=) 2::pg_catalog.int2
                          AND m.classid OPERATOR(pg_catalog.=) 1667329894::pg_catalog.oid
                          AND m.objid OPERATOR(pg_catalog.=) 0::pg_catalog.oid)
            AND NOT EXISTS (SELECT FROM pg_catalog.pg_stat_activity a
                            WHERE a.pid OPERATOR(pg_catalog.=) l.pid
                              AND a.backend_type OPERATOR(pg_catalog.<>) 'chat_backfill worker'::pg_catalog.text)))
)
SELECT r.run_id, r.source, r.target,
       CASE WHEN r.status OPERATOR(pg_catalog.=) 'finished'::pg_catalog.text THEN 'finished'::pg_catalog.text
            WHEN h.pid IS NOT NULL AND r.status OPERATOR(pg_catalog.=) 'throttled'::pg_catalog.text
            THEN 'throttled'::pg_catalog.text
            WHEN h.pid IS NOT NULL THEN 'running'::pg_catalog.text
            WHEN r.status OPERATOR(pg_catalog.=) ANY ('{running,throttled}'::pg_catalog.text[])
            THEN 'interrupted'::pg_catalog.text
            ELSE r.status END AS state,
       r.chats_read AS chats_done, r.total_chats,
       CASE WHEN r.total_chats OPERATOR(pg_catalog.>) 0::pg_catalog.int8
            THEN pg_catalog.round(100.0::pg_catalog.numeric OPERATOR(pg_catalog.*) r.chats_read::pg_catalog.numeric
                                  OPERATOR(pg_catalog./) r.total_chats::pg_catalog.numeric, 1)
       END AS percent_done,
       r.messages_inserted, r.messages_rejected, r.messages_existing, r.messages_skipped, r.chats_skipped,
       r.chats_vanished, r.batches,
       CASE WHEN r.active_ms OPERATOR(pg_catalog.>) 0::pg_catalog.float8
            THEN pg_catalog.round((r.messages_inserted::pg_catalog.float8 OPERATOR(pg_catalog./)
                                   (r.active_ms OPERATOR(pg_catalog./) 1000::pg_catalog.float8))::pg_catalog.numeric, 1)
       END AS messages_per_second,
       CASE WHEN r.status OPERATOR(pg_catalog.<>) 'finished'::pg_catalog.text AND r.chats_read OPERATOR(pg_catalog.>) 0::pg_catalog.int8
            THEN pg_catalog.make_interval(secs => (r.total_chats OPERATOR(pg_catalog.-) r.chats_read)::pg_catalog.float8
                 OPERATOR(pg_catalog.*) (r.active_ms OPERATOR(pg_catalog./) 1000::pg_catalog.float8)
                 OPERATOR(pg_catalog./) r.chats_read::pg_catalog.float8)
       END AS estimated_time_left,
       h.pid AS runner_pid, r.last_key, r.high_water,
       r.started_at, r.updated_at, r.finished_at, r.last_error, r.started_by,
       CASE WHEN h.pid IS NOT NULL AND r.status OPERATOR(pg_catalog.=) 'throttled'::pg_catalog.text
            THEN r.replica_lag_bytes END AS replica_lag_bytes,
       CASE WHEN h.workers OPERATOR(pg_catalog.>) 0::pg_catalog.int4 THEN h.workers END AS workers, r.batch_size, r.rows,
       r.messages_dropped, r.write_path
FROM chat_backfill.runs r
LEFT JOIN LATERAL (
    SELECT COALESCE(pg_catalog.min(l.pid) FILTER (WHERE l.objsubid OPERATOR(pg_catalog.=) 1::pg_catalog.int2),
                               pg_catalog.min(l.pid)) AS pid,
           (pg_catalog.count(DISTINCT l.pid) FILTER (WHERE l.objsubid OPERATOR(pg_catalog.=) 2::pg_catalog.int2))::pg_catalog.int4
               AS workers
    FROM held l
    WHERE (l.objsubid OPERATOR(pg_catalog.=) 1::pg_catalog.int2
           AND l.classid OPERATOR(pg_catalog.=) chat_backfill.regclass_of(r.source)::pg_catalog.oid
           AND l.objid OPERATOR(pg_catalog.=) chat_backfill.regclass_of(r.target)::pg_catalog.oid)
       OR (l.objsubid OPERATOR(pg_catalog.=) 2::pg_catalog.int2
           AND l.objid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT g.range_id::pg_catalog.oid FROM chat_backfill.run_ranges g
                                                         WHERE g.run_id OPERATOR(pg_catalog.=) r.run_id)))
) h ON true;
END;
CREATE OR REPLACE VIEW chat_backfill.status AS SELECT * FROM chat_backfill.status_rows();
-- The function checks as the reader now; the view keeps no option of its own, as when installed.
ALTER VIEW chat_backfill.status RESET (security_invoker);

-- 3. The one-transaction form: messages_dropped and write_path, appended last to its result. A new result
--    type is a new function: the old one goes first, and the new one gets the default
--    privileges (EXECUTE for PUBLIC): a REVOKE made on the old one must be made again.
DROP FUNCTION @extschema@.backfill_chat_messages(pg_catalog.regclass, pg_catalog.regclass, pg_catalog.int4,
    pg_catalog.int8, pg_catalog.text, pg_catalog.text, pg_catalog.text, pg_catalog.text, pg_catalog.bool,
    pg_catalog.bool, pg_catalog.interval, pg_catalog.text);
CREATE FUNCTION backfill_chat_messages(
	"source" regclass DEFAULT NULL,
	"target" regclass DEFAULT NULL,
	"batch_size" INT DEFAULT NULL,
	"now" bigint DEFAULT NULL,
	"source_filter" TEXT DEFAULT $$user_id OPERATOR(pg_catalog.!~~) 'shared-%'::pg_catalog.text$$,
	"id_column" TEXT DEFAULT 'id',
	"user_id_column" TEXT DEFAULT 'user_id',
	"chat_column" TEXT DEFAULT 'chat',
	"dry_run" bool DEFAULT false,
	"force" bool DEFAULT false,
	"batch_time" interval DEFAULT NULL,
	"rows" TEXT DEFAULT 'migration'
) RETURNS TABLE (
	"batch" INT,
	"chats_read" bigint,
	"messages_inserted" bigint,
	"messages_rejected" bigint,
	"messages_existing" bigint,
	"last_chat_id" TEXT,
	"elapsed_ms" double precision,
	"messages_skipped" bigint,
	"chats_skipped" bigint,
	"chats_vanished" bigint,
	"batch_size" INT,
	"messages_dropped" bigint,
	"write_path" TEXT
)
VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'backfill_chat_messages_wrapper';

-- 3b. verify() takes the backfill's source_filter and column names (rows stays third, where
--     0.6.0 had it): a new signature is a new function, with the default privileges again.
DROP FUNCTION chat_backfill.verify(pg_catalog.regclass, pg_catalog.regclass, pg_catalog.text);
CREATE FUNCTION chat_backfill.verify(
    source regclass DEFAULT NULL,
    target regclass DEFAULT NULL,
    "rows" text DEFAULT 'migration',
    source_filter text DEFAULT $$user_id OPERATOR(pg_catalog.!~~) 'shared-%'::pg_catalog.text$$,
    id_column text DEFAULT 'id',
    user_id_column text DEFAULT 'user_id',
    chat_column text DEFAULT 'chat')
RETURNS TABLE (chat_id text, message_key text, kind text, columns text[])
VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', 'verify_wrapper';

-- 3c. plan() plans either row mode (rows, last, as in the backfill).
DROP FUNCTION chat_backfill.plan(pg_catalog.regclass, pg_catalog.regclass, pg_catalog.int4, pg_catalog.text, pg_catalog.text,
                                 pg_catalog.text, pg_catalog.text);
CREATE FUNCTION chat_backfill.plan(
    source regclass DEFAULT NULL,
    target regclass DEFAULT NULL,
    batch_size integer DEFAULT NULL,
    source_filter text DEFAULT $$user_id OPERATOR(pg_catalog.!~~) 'shared-%'::pg_catalog.text$$,
    id_column text DEFAULT 'id',
    user_id_column text DEFAULT 'user_id',
    chat_column text DEFAULT 'chat',
    "rows" text DEFAULT 'migration')
RETURNS TABLE (item text, status text, value numeric, unit text, detail text, advice text)
VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', 'plan_wrapper';

-- 4. State identified by names (a restore keeps them; oids become a cache), shown only to who
--    could read the chats it is about (the source's row-level security included).
ALTER TABLE chat_backfill.runs ADD COLUMN id_column pg_catalog.text;
GRANT INSERT (id_column) ON chat_backfill.runs TO PUBLIC;
GRANT UPDATE (source_oid, target_oid) ON chat_backfill.runs TO PUBLIC;
ALTER TABLE chat_backfill.rejected_messages ADD COLUMN id_column pg_catalog.text;
GRANT INSERT (id_column) ON chat_backfill.rejected_messages TO PUBLIC;
-- Who recorded a rejection (a reader under row-level security sees only its own and trusted
-- roles'; the run's own rejection is never taken for another role's): for rows already there,
-- the role that started their resumable run; a one-transaction run's stay NULL. Added without
-- its default first, which would stamp every old row with the role running this update.
ALTER TABLE chat_backfill.rejected_messages ADD COLUMN recorded_by pg_catalog.text;
UPDATE chat_backfill.rejected_messages m SET recorded_by = r.started_by
  FROM chat_backfill.runs r WHERE r.run_id OPERATOR(pg_catalog.=) m.run_id;
ALTER TABLE chat_backfill.rejected_messages ALTER COLUMN recorded_by SET DEFAULT CURRENT_USER;
-- Whether the source's row-level security applied to the role that started a run: unknown
-- (NULL) for the runs already there, which only their own role resumes from now on.
ALTER TABLE chat_backfill.runs ADD COLUMN restricted pg_catalog.bool;
GRANT INSERT (restricted) ON chat_backfill.runs TO PUBLIC;
-- A CALL goes on only with a run of its own source_filter, compared as text: 0.1.0's default
-- filter is 0.2.0's default spelt another way (the same chats), so its runs keep going on.
UPDATE chat_backfill.runs SET source_filter = $$user_id OPERATOR(pg_catalog.!~~) 'shared-%'::pg_catalog.text$$
 WHERE source_filter OPERATOR(pg_catalog.=) $$user_id NOT LIKE 'shared-%'$$;

-- Names become the key: each row gets its tables' names as the catalog spells them now (runs
-- of 0.1.0 recorded them as the caller's search_path showed them), while its oids are still
-- this database's own.
UPDATE chat_backfill.runs
   SET source = chat_backfill.table_name(source_oid), target = chat_backfill.table_name(target_oid)
 WHERE chat_backfill.table_name(source_oid) IS NOT NULL AND chat_backfill.table_name(target_oid) IS NOT NULL;
UPDATE chat_backfill.rejected_messages
   SET source = chat_backfill.table_name(source_oid), target = chat_backfill.table_name(target_oid)
 WHERE chat_backfill.table_name(source_oid) IS NOT NULL AND chat_backfill.table_name(target_oid) IS NOT NULL;

DROP INDEX chat_backfill.runs_source_oid_target_oid_run_id_idx;
CREATE INDEX ON chat_backfill.runs (source, target, run_id DESC);
-- A table dropped and made again under its name left the same rejection twice: keep the first.
DELETE FROM chat_backfill.rejected_messages a USING chat_backfill.rejected_messages b
 WHERE a.id OPERATOR(pg_catalog.>) b.id AND a.target OPERATOR(pg_catalog.=) b.target
   AND a.source OPERATOR(pg_catalog.=) b.source AND a.sqlstate OPERATOR(pg_catalog.=) b.sqlstate
   AND pg_catalog.hashtextextended(a.chat_id, 0::pg_catalog.int8)
       OPERATOR(pg_catalog.=) pg_catalog.hashtextextended(b.chat_id, 0::pg_catalog.int8)
   AND pg_catalog.hashtextextended(a.message_id, 0::pg_catalog.int8)
       IS NOT DISTINCT FROM pg_catalog.hashtextextended(b.message_id, 0::pg_catalog.int8);
DROP INDEX chat_backfill.rejected_messages_once;
CREATE UNIQUE INDEX rejected_messages_once ON chat_backfill.rejected_messages
    (target, source, sqlstate, pg_catalog.hashtextextended(chat_id, 0::pg_catalog.int8), (message_id IS NULL),
     coalesce(pg_catalog.hashtextextended(message_id, 0::pg_catalog.int8), 0::pg_catalog.int8), recorded_by);

CREATE FUNCTION chat_backfill.may_run(source pg_catalog.text, target pg_catalog.text)
RETURNS pg_catalog.bool LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT coalesce(pg_catalog.has_table_privilege(chat_backfill.regclass_of(source)::pg_catalog.oid, 'SELECT'::pg_catalog.text)
                    AND pg_catalog.has_table_privilege(chat_backfill.regclass_of(target)::pg_catalog.oid, 'INSERT'::pg_catalog.text),
                    false);
END;
CREATE OR REPLACE FUNCTION chat_backfill.may_add(source_oid pg_catalog.oid, target_oid pg_catalog.oid,
                                                 source pg_catalog.text, target pg_catalog.text)
RETURNS pg_catalog.bool LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT coalesce(chat_backfill.may_run(source, target)
                    AND source_oid OPERATOR(pg_catalog.=) chat_backfill.regclass_of(source)::pg_catalog.oid
                    AND target_oid OPERATOR(pg_catalog.=) chat_backfill.regclass_of(target)::pg_catalog.oid, false);
END;
CREATE FUNCTION chat_backfill.restricted(source pg_catalog.text)
RETURNS pg_catalog.bool LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT coalesce((SELECT CASE WHEN c.relkind OPERATOR(pg_catalog.=) ANY (ARRAY['r', 'p']::pg_catalog."char"[])
                                 THEN pg_catalog.row_security_active(c.oid)
                                 ELSE c.relkind OPERATOR(pg_catalog.<>) 'm'::pg_catalog."char" END
                     FROM pg_catalog.pg_class c
                     WHERE c.oid OPERATOR(pg_catalog.=) chat_backfill.regclass_of(source)::pg_catalog.oid), false);
END;
CREATE FUNCTION chat_backfill.chat_visible(source pg_catalog.oid, id_column pg_catalog.text, chat_id pg_catalog.text)
RETURNS pg_catalog.bool STRICT STABLE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'chat_visible_wrapper';
-- Whether code that `role` wrote may run with the calling role's rights while the caller's
-- reading of the state looks at a source: that role owns the state (its tables and their
-- policies, which already run as every reader), or it can act as the caller anyway.
CREATE FUNCTION chat_backfill.trusted(role pg_catalog.oid)
RETURNS pg_catalog.bool LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT coalesce(role OPERATOR(pg_catalog.=) (SELECT c.relowner FROM pg_catalog.pg_class c
                                                WHERE c.oid OPERATOR(pg_catalog.=)
                                                      'chat_backfill.rejected_messages'::pg_catalog.regclass::pg_catalog.oid)
                    OR pg_catalog.pg_has_role(role, CURRENT_USER, 'USAGE'::pg_catalog.text), false);
END;

-- Whether the calling role may see state that `author` wrote (a run it started, a rejection it
-- recorded) about one chat of a source: it may read the source; and where what the source
-- shows depends on the reader (chat_backfill.restricted), the state is its own or, where
-- `others` allows, written by a trusted role, the source (what its name finds now) is owned
-- by a trusted role, and the source shows it that chat (chat_backfill.chat_visible looks,
-- with the role's own rights). A NULL author (state from before 0.7.0) is another role's.
-- The order is the point: looking runs the source's policies (or a view's functions) as the
-- reader, so it happens only where that is code the reader ran itself or trusts, never for a
-- row another role planted to name its own table. State another role wrote counts only while
-- its name still finds the table it was written about (its oid, checked whenever it is
-- written) and that table is not a temporary one: a name can come to mean the reader's own
-- table (a later session's pg_temp_N, a source dropped and created again by someone else),
-- which would show the reader everything recorded under it, and an oid comes round again once
-- the counter wraps, which a role can hasten. After a restore, a role sees its own state by
-- name, others' once its author resumes.
CREATE FUNCTION chat_backfill.may_read(source pg_catalog.text, source_oid pg_catalog.oid, id_column pg_catalog.text,
                                       chat_id pg_catalog.text, author pg_catalog.text, others pg_catalog.bool)
RETURNS pg_catalog.bool LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT CASE WHEN NOT coalesce(pg_catalog.has_table_privilege(chat_backfill.regclass_of(source)::pg_catalog.oid,
                                                                 'SELECT'::pg_catalog.text), false)
                THEN false
                WHEN NOT coalesce(author OPERATOR(pg_catalog.=) CURRENT_USER::pg_catalog.text, false)
                 AND NOT coalesce((SELECT c.oid OPERATOR(pg_catalog.=) source_oid
                                          AND c.relpersistence OPERATOR(pg_catalog.<>) 't'::pg_catalog."char"
                                     FROM pg_catalog.pg_class c
                                    WHERE c.oid OPERATOR(pg_catalog.=) chat_backfill.regclass_of(source)::pg_catalog.oid),
                                  false)
                THEN false
                WHEN NOT chat_backfill.restricted(source) THEN true
                WHEN (author OPERATOR(pg_catalog.=) CURRENT_USER::pg_catalog.text
                      OR (others
                          AND coalesce((SELECT chat_backfill.trusted(a.oid) FROM pg_catalog.pg_roles a
                                        WHERE a.rolname OPERATOR(pg_catalog.=) author::pg_catalog.name), false)))
                 AND coalesce((SELECT chat_backfill.trusted(c.relowner) FROM pg_catalog.pg_class c
                                WHERE c.oid OPERATOR(pg_catalog.=) chat_backfill.regclass_of(source)::pg_catalog.oid),
                              false)
                THEN coalesce(chat_backfill.chat_visible(chat_backfill.regclass_of(source)::pg_catalog.oid, id_column, chat_id),
                              false)
                ELSE false END;
END;

-- A run shows its keys (chat ids) and counts: where the source's row-level security applies to
-- the role, only its own runs, and only while it can read the run's last chat.
CREATE FUNCTION chat_backfill.may_see_run(source pg_catalog.text, source_oid pg_catalog.oid, id_column pg_catalog.text,
                                          high_water pg_catalog.text, started_by pg_catalog.text)
RETURNS pg_catalog.bool LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT chat_backfill.may_read(source, source_oid, id_column, high_water, started_by, false);
END;

DROP POLICY runs_visible_to_readers ON chat_backfill.runs;
DROP POLICY runs_started_by_runners ON chat_backfill.runs;
DROP POLICY runs_advanced_by_runners ON chat_backfill.runs;
DROP POLICY runs_deleted_by_runners ON chat_backfill.runs;
DROP POLICY rejections_visible_to_readers ON chat_backfill.rejected_messages;
DROP POLICY rejections_by_runners ON chat_backfill.rejected_messages;
DROP POLICY rejections_deleted_by_runners ON chat_backfill.rejected_messages;
DROP POLICY ranges_made_by_runners ON chat_backfill.run_ranges;
DROP POLICY ranges_advanced_by_runners ON chat_backfill.run_ranges;
DROP POLICY launches_made_by_runners ON chat_backfill.launches;
CREATE POLICY runs_visible_to_readers ON chat_backfill.runs FOR SELECT
    USING (chat_backfill.may_see_run(source, source_oid, id_column, high_water, started_by));
CREATE POLICY runs_started_by_runners ON chat_backfill.runs FOR INSERT
    WITH CHECK (chat_backfill.may_add(source_oid, target_oid, source, target)
                AND (restricted IS NULL OR restricted OPERATOR(pg_catalog.=) chat_backfill.restricted(source)));
CREATE POLICY runs_advanced_by_runners ON chat_backfill.runs FOR UPDATE
    USING (chat_backfill.may_run(source, target) AND chat_backfill.may_see_run(source, source_oid, id_column, high_water, started_by))
    WITH CHECK (chat_backfill.may_add(source_oid, target_oid, source, target));
CREATE POLICY runs_deleted_by_runners ON chat_backfill.runs FOR DELETE
    USING (chat_backfill.may_run(source, target) AND chat_backfill.may_see_run(source, source_oid, id_column, high_water, started_by));
CREATE POLICY rejections_visible_to_readers ON chat_backfill.rejected_messages FOR SELECT
    USING (chat_backfill.may_read(source, source_oid, id_column, chat_id, recorded_by, true));
CREATE POLICY rejections_by_runners ON chat_backfill.rejected_messages FOR INSERT
    WITH CHECK (chat_backfill.may_add(source_oid, target_oid, source, target)
                AND CASE WHEN EXISTS (SELECT FROM chat_backfill.runs r
                                      WHERE r.run_id OPERATOR(pg_catalog.=) rejected_messages.run_id
                                        AND r.source OPERATOR(pg_catalog.=) rejected_messages.source
                                        AND r.target OPERATOR(pg_catalog.=) rejected_messages.target)
                         THEN true
                         ELSE run_id OPERATOR(pg_catalog.=)
                              pg_catalog.currval('chat_backfill.runs_run_id_seq'::pg_catalog.regclass) END);
CREATE POLICY rejections_deleted_by_runners ON chat_backfill.rejected_messages FOR DELETE
    USING (chat_backfill.may_run(source, target) AND chat_backfill.may_read(source, source_oid, id_column, chat_id, recorded_by, true));
CREATE POLICY ranges_made_by_runners ON chat_backfill.run_ranges FOR INSERT
    WITH CHECK (EXISTS (SELECT FROM chat_backfill.runs r WHERE r.run_id OPERATOR(pg_catalog.=) run_ranges.run_id
                          AND chat_backfill.may_run(r.source, r.target)));
CREATE POLICY ranges_advanced_by_runners ON chat_backfill.run_ranges FOR UPDATE
    USING (EXISTS (SELECT FROM chat_backfill.runs r WHERE r.run_id OPERATOR(pg_catalog.=) run_ranges.run_id
                     AND chat_backfill.may_run(r.source, r.target)))
    WITH CHECK (EXISTS (SELECT FROM chat_backfill.runs r WHERE r.run_id OPERATOR(pg_catalog.=) run_ranges.run_id
                          AND chat_backfill.may_run(r.source, r.target)));
CREATE POLICY launches_made_by_runners ON chat_backfill.launches FOR INSERT
    WITH CHECK (launched_by OPERATOR(pg_catalog.=) CURRENT_USER::pg_catalog.text
                AND EXISTS (SELECT FROM chat_backfill.runs r WHERE r.run_id OPERATOR(pg_catalog.=) launches.run_id
                              AND chat_backfill.may_run(r.source, r.target)));
DROP FUNCTION chat_backfill.may_run(pg_catalog.oid, pg_catalog.oid);

-- 5. The state belongs to the extension's owner (the install script says why). ALTER EXTENSION
--    UPDATE's @extowner@ would be whoever runs the update, so the owner is read instead.
DO $$
DECLARE
    owner pg_catalog.text := (SELECT e.extowner::pg_catalog.regrole::pg_catalog.text FROM pg_catalog.pg_extension e
                              WHERE e.extname OPERATOR(pg_catalog.=) 'chat_backfill'::pg_catalog.name);
BEGIN
    EXECUTE pg_catalog.format('ALTER TABLE chat_backfill.rejected_messages OWNER TO %s', owner);
    EXECUTE pg_catalog.format('ALTER TABLE chat_backfill.runs OWNER TO %s', owner);
    EXECUTE pg_catalog.format('ALTER TABLE chat_backfill.run_ranges OWNER TO %s', owner);
END
$$;

-- 6. What the state tables are made of, recorded (the install script says why). Until this
--    update they were the superuser's, so nothing their new owner attached is recorded here.
--    A later update must compare them with this record before it records again.
--    The event triggers' functions first (src/engine/state_guard.rs):
CREATE FUNCTION chat_backfill.state_ddl_start() RETURNS pg_catalog.event_trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'state_ddl_start_wrapper';
CREATE FUNCTION chat_backfill.state_ddl_end() RETURNS pg_catalog.event_trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'state_ddl_end_wrapper';
-- What the state tables are made of, one line per part that a write or a read of them could
-- run code through: every relation of the schema (a table the owner turned into a view is a
-- difference, not a table less to look at) with its kind, access method, row-level security
-- switches, replica identity and whether it belongs to the extension; every column (type,
-- NOT NULL, generated, identity, collation), default, constraint, index (by name: REINDEX
-- CONCURRENTLY, which fires no event trigger before 17, gives it a new oid; an invalid copy
-- of a valid index, which an interrupted one leaves, is the same index; whether it is valid,
-- ready and live: a refused DROP INDEX CONCURRENTLY leaves it none), publication membership
-- (a row filter or column list makes every UPDATE of the table fail), extended statistics object (the
-- planner evaluates its expressions for every query on the table), trigger, rule and policy,
-- each as its stored node tree (oids, not names a search_path could spell otherwise); a
-- sequence's options; the casts and operators on a table's row type; every table inheriting
-- from one and every table one inherits from or is a partition of (a parent's partition key
-- is checked on every write to its partition); and every function, type and operator in the
-- schema (a trusted extension created there by the owner adds some). The install and update scripts record it in a table the
-- bootstrap superuser owns, which the extension's owner cannot change; before each
-- transaction a backfill makes, a caller the state's owner cannot act as compares it with what
-- is there (src/engine/state_guard.rs).
CREATE FUNCTION chat_backfill.state_definition() RETURNS SETOF pg_catalog.text LANGUAGE sql STABLE
BEGIN ATOMIC
    WITH state AS (
        SELECT c.oid, c.relname FROM pg_catalog.pg_class c
         WHERE c.relnamespace OPERATOR(pg_catalog.=) 'chat_backfill'::pg_catalog.regnamespace::pg_catalog.oid
           AND c.relkind OPERATOR(pg_catalog.<>) ALL (ARRAY['i', 'I']::pg_catalog."char"[])
    ), row_types AS (
        SELECT s.relname, u.typ FROM state s JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) s.oid
          JOIN pg_catalog.pg_type t ON t.oid OPERATOR(pg_catalog.=) c.reltype,
          LATERAL pg_catalog.unnest(ARRAY[t.oid, t.typarray]) AS u (typ)
    )
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, s.relname, 'table', c.relkind, c.relam, c.relpersistence,
                                c.relrowsecurity, c.relforcerowsecurity, c.reloftype, c.relispartition,
                                c.relpartbound::pg_catalog.text, c.relreplident,
                                EXISTS (SELECT FROM pg_catalog.pg_depend d
                                         WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
                                           AND d.objid OPERATOR(pg_catalog.=) c.oid
                                           AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_extension'::pg_catalog.regclass
                                           AND d.deptype OPERATOR(pg_catalog.=) 'e'::pg_catalog."char"))
      FROM state s JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) s.oid
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, s.relname, 'column', a.attname, a.atttypid, a.attnotnull,
                                a.attgenerated, a.attidentity, a.attcollation, a.attisdropped)
      FROM state s JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) s.oid
     WHERE a.attnum OPERATOR(pg_catalog.>) 0::pg_catalog.int2
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, s.relname, 'default', a.attname, d.adbin::pg_catalog.text)
      FROM state s JOIN pg_catalog.pg_attrdef d ON d.adrelid OPERATOR(pg_catalog.=) s.oid
      JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) s.oid AND a.attnum OPERATOR(pg_catalog.=) d.adnum
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, s.relname, 'constraint', k.conname, k.contype, k.conkey::pg_catalog.text,
                                k.confrelid, k.confupdtype, k.confdeltype, k.conbin::pg_catalog.text)
      FROM state s JOIN pg_catalog.pg_constraint k ON k.conrelid OPERATOR(pg_catalog.=) s.oid
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, s.relname, 'index', x.relname, x.relam, i.indkey::pg_catalog.text,
                                i.indclass::pg_catalog.text, i.indcollation::pg_catalog.text, i.indexprs::pg_catalog.text,
                                i.indpred::pg_catalog.text, i.indisvalid, i.indisready, i.indislive)
      FROM state s JOIN pg_catalog.pg_index i ON i.indrelid OPERATOR(pg_catalog.=) s.oid
      JOIN pg_catalog.pg_class x ON x.oid OPERATOR(pg_catalog.=) i.indexrelid
     WHERE i.indisvalid OR NOT EXISTS (
               SELECT FROM pg_catalog.pg_index v
                WHERE v.indrelid OPERATOR(pg_catalog.=) i.indrelid AND v.indisvalid
                  AND v.indkey::pg_catalog.text OPERATOR(pg_catalog.=) i.indkey::pg_catalog.text
                  AND v.indclass::pg_catalog.text OPERATOR(pg_catalog.=) i.indclass::pg_catalog.text
                  AND v.indcollation::pg_catalog.text OPERATOR(pg_catalog.=) i.indcollation::pg_catalog.text
                  AND COALESCE(v.indexprs::pg_catalog.text, ''::pg_catalog.text)
                      OPERATOR(pg_catalog.=) COALESCE(i.indexprs::pg_catalog.text, ''::pg_catalog.text)
                  AND COALESCE(v.indpred::pg_catalog.text, ''::pg_catalog.text)
                      OPERATOR(pg_catalog.=) COALESCE(i.indpred::pg_catalog.text, ''::pg_catalog.text))
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, s.relname, 'publication', p.pubname,
                                (pg_catalog.to_jsonb(r) OPERATOR(pg_catalog.-) ARRAY['oid', 'prpubid']::pg_catalog.text[])::pg_catalog.text)
      FROM state s JOIN pg_catalog.pg_publication_rel r ON r.prrelid OPERATOR(pg_catalog.=) s.oid
      JOIN pg_catalog.pg_publication p ON p.oid OPERATOR(pg_catalog.=) r.prpubid
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, s.relname, 'statistics', n.nspname, x.stxname, x.stxkeys::pg_catalog.text,
                                x.stxkind::pg_catalog.text, x.stxexprs::pg_catalog.text)
      FROM state s JOIN pg_catalog.pg_statistic_ext x ON x.stxrelid OPERATOR(pg_catalog.=) s.oid
      JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) x.stxnamespace
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, s.relname, 'sequence', q.seqtypid, q.seqstart, q.seqincrement, q.seqmax,
                                q.seqmin, q.seqcache, q.seqcycle)
      FROM state s JOIN pg_catalog.pg_sequence q ON q.seqrelid OPERATOR(pg_catalog.=) s.oid
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, y.relname, 'cast from', k.castsource, k.casttarget, k.castfunc,
                                k.castcontext, k.castmethod)
      FROM row_types y JOIN pg_catalog.pg_cast k ON k.castsource OPERATOR(pg_catalog.=) y.typ
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, y.relname, 'cast to', k.castsource, k.casttarget, k.castfunc,
                                k.castcontext, k.castmethod)
      FROM row_types y JOIN pg_catalog.pg_cast k ON k.casttarget OPERATOR(pg_catalog.=) y.typ
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, y.relname, 'operator on the left', o.oprname, o.oprleft, o.oprright,
                                o.oprcode)
      FROM row_types y JOIN pg_catalog.pg_operator o ON o.oprleft OPERATOR(pg_catalog.=) y.typ
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, y.relname, 'operator on the right', o.oprname, o.oprleft, o.oprright,
                                o.oprcode)
      FROM row_types y JOIN pg_catalog.pg_operator o ON o.oprright OPERATOR(pg_catalog.=) y.typ
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, 'function', p.proname, p.proargtypes::pg_catalog.text, p.prorettype,
                                p.prokind)
      FROM pg_catalog.pg_proc p
     WHERE p.pronamespace OPERATOR(pg_catalog.=) 'chat_backfill'::pg_catalog.regnamespace::pg_catalog.oid
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, 'type', t.typname, t.typtype)
      FROM pg_catalog.pg_type t
     WHERE t.typnamespace OPERATOR(pg_catalog.=) 'chat_backfill'::pg_catalog.regnamespace::pg_catalog.oid
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, 'operator', o.oprname, o.oprleft, o.oprright)
      FROM pg_catalog.pg_operator o
     WHERE o.oprnamespace OPERATOR(pg_catalog.=) 'chat_backfill'::pg_catalog.regnamespace::pg_catalog.oid
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, s.relname, 'trigger', t.tgname, t.tgfoid, t.tgtype, t.tgenabled,
                                t.tgqual::pg_catalog.text)
      FROM state s JOIN pg_catalog.pg_trigger t ON t.tgrelid OPERATOR(pg_catalog.=) s.oid
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, s.relname, 'rule', r.rulename, r.ev_type, r.ev_action::pg_catalog.text)
      FROM state s JOIN pg_catalog.pg_rewrite r ON r.ev_class OPERATOR(pg_catalog.=) s.oid
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, s.relname, 'policy', p.polname, p.polcmd, p.polpermissive,
                                p.polroles::pg_catalog.text, p.polqual::pg_catalog.text, p.polwithcheck::pg_catalog.text)
      FROM state s JOIN pg_catalog.pg_policy p ON p.polrelid OPERATOR(pg_catalog.=) s.oid
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, s.relname, 'inherited by', n.nspname, c.relname)
      FROM state s JOIN pg_catalog.pg_inherits h ON h.inhparent OPERATOR(pg_catalog.=) s.oid
      JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) h.inhrelid
      JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, s.relname, 'inherits from', n.nspname, c.relname)
      FROM state s JOIN pg_catalog.pg_inherits h ON h.inhrelid OPERATOR(pg_catalog.=) s.oid
      JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) h.inhparent
      JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace;
END;

-- The definition as the install (or the latest update) left it; only a superuser changes it.
CREATE TABLE chat_backfill.state_recorded (part pg_catalog.text NOT NULL);
GRANT SELECT ON chat_backfill.state_recorded TO PUBLIC;

-- Records the state tables as they are now. A superuser's, after checking them: after a
-- pg_upgrade their stored node trees may read differently, and a backfill whose caller the
-- state's owner cannot act as then refuses until this is run.
CREATE FUNCTION chat_backfill.record_state_definition() RETURNS pg_catalog.int8 LANGUAGE sql VOLATILE
BEGIN ATOMIC
    DELETE FROM chat_backfill.state_recorded;
    INSERT INTO chat_backfill.state_recorded SELECT chat_backfill.state_definition();
    SELECT pg_catalog.count(*) FROM chat_backfill.state_recorded;
END;
REVOKE ALL ON FUNCTION chat_backfill.record_state_definition() FROM PUBLIC;
SELECT chat_backfill.record_state_definition();

-- A role that is not a superuser cannot change them at all: every DDL command of such a role
-- is bracketed, and one that changed the definition away from the record is refused
-- (src/engine/state_guard.rs). ALWAYS: session_replication_role does not turn them off.
CREATE EVENT TRIGGER chat_backfill_state_before ON ddl_command_start
    EXECUTE FUNCTION chat_backfill.state_ddl_start();
CREATE EVENT TRIGGER chat_backfill_state_after ON ddl_command_end
    EXECUTE FUNCTION chat_backfill.state_ddl_end();
ALTER EVENT TRIGGER chat_backfill_state_before ENABLE ALWAYS;
ALTER EVENT TRIGGER chat_backfill_state_after ENABLE ALWAYS;

-- chat_messages(json) and chat_message_problems(json) are the C functions themselves (they
-- were SQL wrappers casting to text): a json column is passed as stored, so a chat still in
-- its TOAST table streams (issue 26) instead of being printed whole by the cast. The same
-- signatures, so CREATE OR REPLACE keeps their privileges.
CREATE OR REPLACE FUNCTION @extschema@.chat_messages(chat_id pg_catalog.text, user_id pg_catalog.text, chat pg_catalog.json,
                                          now pg_catalog.int8 DEFAULT NULL)
RETURNS TABLE (id pg_catalog.text, chat_id pg_catalog.text, user_id pg_catalog.text, role pg_catalog.text, parent_id pg_catalog.text, content pg_catalog.json,
               output pg_catalog.json, model_id pg_catalog.text, files pg_catalog.json, sources pg_catalog.json, embeds pg_catalog.json, done pg_catalog.bool,
               status_history pg_catalog.json, error pg_catalog.json, usage pg_catalog.json, created_at pg_catalog.int8, updated_at pg_catalog.int8)
STABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'chat_messages_text_wrapper';

CREATE OR REPLACE FUNCTION @extschema@.chat_message_problems(chat_id pg_catalog.text, chat pg_catalog.json)
RETURNS TABLE (message_key pg_catalog.text, reason pg_catalog.text)
IMMUTABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'chat_message_problems_text_wrapper';
