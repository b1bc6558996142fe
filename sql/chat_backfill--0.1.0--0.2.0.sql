-- chat_backfill 0.1.0 -> 0.2.0: the hardening release (see SECURITY.md).
-- Checked by hand against a fresh 0.2.0 install; tests/client/test_upgrade.py compares the two
-- extensions' members from the catalog after `ALTER EXTENSION chat_backfill UPDATE`, part way
-- through a resumable run. Every name is schema-qualified, as in the install script.

-- 1. The SECURITY DEFINER state writers, executable by PUBLIC, are gone: the engine writes its
--    state with the caller's own rights, under row-level security.
DROP FUNCTION chat_backfill.record_rejections(pg_catalog.int8, pg_catalog.text, pg_catalog.text, pg_catalog.text[],
    pg_catalog.text[], pg_catalog.text[], pg_catalog.text[], pg_catalog.text[], pg_catalog.text[], pg_catalog.json[]);
DROP FUNCTION chat_backfill.run_started(pg_catalog.oid, pg_catalog.oid, pg_catalog.text, pg_catalog.text, pg_catalog.text,
    pg_catalog.int8, pg_catalog.int8, pg_catalog.text);
DROP FUNCTION chat_backfill.run_resumed(pg_catalog.int8);
DROP FUNCTION chat_backfill.run_checkpoint(pg_catalog.int8, pg_catalog.text, pg_catalog.int8, pg_catalog.int8, pg_catalog.int8,
    pg_catalog.int8, pg_catalog.int8, pg_catalog.int8, pg_catalog.float8);
DROP FUNCTION chat_backfill.run_status(pg_catalog.int8, pg_catalog.text, pg_catalog.text);
DROP FUNCTION chat_backfill.run_finished(pg_catalog.int8);

-- 2. Who may write run state (used by the row-level security policies below).
-- A table's schema-qualified, quoted name: the one the backfill records and shows.
CREATE FUNCTION chat_backfill.table_name(relation pg_catalog.oid) RETURNS pg_catalog.text
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT pg_catalog.format('%I.%I'::pg_catalog.text, n.nspname, c.relname)
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
     WHERE c.oid OPERATOR(pg_catalog.=) relation;
END;


-- Who may write a run's state: a role that could run that backfill (read its source, write its
-- target). Rows it adds must also name the tables as the catalog does, so that no row can claim
-- to be about tables other than the ones its oids (which this checks) are. Parsed once, here.
CREATE FUNCTION chat_backfill.may_run(source_oid pg_catalog.oid, target_oid pg_catalog.oid)
RETURNS pg_catalog.bool LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT coalesce(pg_catalog.has_table_privilege(source_oid, 'SELECT'::pg_catalog.text)
                    AND pg_catalog.has_table_privilege(target_oid, 'INSERT'::pg_catalog.text), false);
END;

CREATE FUNCTION chat_backfill.may_add(source_oid pg_catalog.oid, target_oid pg_catalog.oid,
                                      source pg_catalog.text, target pg_catalog.text)
RETURNS pg_catalog.bool LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT coalesce(chat_backfill.may_run(source_oid, target_oid)
                    AND source OPERATOR(pg_catalog.=) chat_backfill.table_name(source_oid)
                    AND target OPERATOR(pg_catalog.=) chat_backfill.table_name(target_oid), false);
END;

-- 3. Rejections: the tables they belong to (for row-level security and dedupe). Rows of 0.1.0
--    runs get the oids of the tables their names still resolve to; a rejection recorded more
--    than once by 0.1.0's re-runs keeps its first row.
ALTER TABLE chat_backfill.rejected_messages ADD COLUMN source_oid pg_catalog.oid, ADD COLUMN target_oid pg_catalog.oid;
UPDATE chat_backfill.rejected_messages
   SET source_oid = pg_catalog.to_regclass(source)::pg_catalog.oid, target_oid = pg_catalog.to_regclass(target)::pg_catalog.oid;
DELETE FROM chat_backfill.rejected_messages r
 USING chat_backfill.rejected_messages first
 WHERE first.id OPERATOR(pg_catalog.<) r.id
   AND first.target_oid IS NOT DISTINCT FROM r.target_oid AND first.source_oid IS NOT DISTINCT FROM r.source_oid
   AND first.sqlstate OPERATOR(pg_catalog.=) r.sqlstate AND first.chat_id OPERATOR(pg_catalog.=) r.chat_id
   AND first.message_id IS NOT DISTINCT FROM r.message_id;
CREATE UNIQUE INDEX rejected_messages_once ON chat_backfill.rejected_messages
    (target_oid, source_oid, sqlstate, pg_catalog.hashtextextended(chat_id, 0::pg_catalog.int8),
     pg_catalog.hashtextextended(message_id, 0::pg_catalog.int8)) NULLS NOT DISTINCT;
REVOKE ALL ON chat_backfill.rejected_messages FROM PUBLIC;
GRANT SELECT, DELETE ON chat_backfill.rejected_messages TO PUBLIC;
GRANT INSERT (run_id, source, target, source_oid, target_oid, chat_id, message_key, message_id, sqlstate,
              error, detail, message) ON chat_backfill.rejected_messages TO PUBLIC;
GRANT USAGE ON SEQUENCE chat_backfill.rejected_messages_id_seq TO PUBLIC;
ALTER TABLE chat_backfill.rejected_messages ENABLE ROW LEVEL SECURITY;

-- 4. Runs: vanished chats, who started a run, and row-level security (as in sql/runs.sql). A run
--    in progress goes on after the update: its key, high-water mark and clock are kept.
DROP VIEW chat_backfill.status;
ALTER TABLE chat_backfill.runs
    ADD COLUMN chats_vanished pg_catalog.int8 NOT NULL DEFAULT 0,
    ADD COLUMN started_by pg_catalog.text NOT NULL DEFAULT CURRENT_USER;
-- Runs are written by the procedure with the caller's own rights. Row-level security lets a
-- role see a run only if it can read the run's source, and start, advance or delete one only
-- if it could run that backfill (chat_backfill.may_run, may_add). The columns a run is identified and
-- audited by cannot be changed.
REVOKE ALL ON chat_backfill.runs FROM PUBLIC;
GRANT SELECT, DELETE ON chat_backfill.runs TO PUBLIC;
GRANT INSERT (source_oid, target_oid, source, target, source_filter, high_water, total_chats, now, status)
    ON chat_backfill.runs TO PUBLIC;
GRANT UPDATE (last_key, chats_read, messages_inserted, messages_rejected, messages_existing, messages_skipped,
              chats_skipped, chats_vanished, batches, active_ms, status, updated_at, finished_at, last_error)
    ON chat_backfill.runs TO PUBLIC;
GRANT USAGE ON SEQUENCE chat_backfill.runs_run_id_seq TO PUBLIC;
ALTER TABLE chat_backfill.runs ENABLE ROW LEVEL SECURITY;
CREATE POLICY runs_visible_to_readers ON chat_backfill.runs FOR SELECT
    USING (pg_catalog.has_table_privilege(source_oid, 'SELECT'::pg_catalog.text));
CREATE POLICY runs_started_by_runners ON chat_backfill.runs FOR INSERT
    WITH CHECK (chat_backfill.may_add(source_oid, target_oid, source, target));
CREATE POLICY runs_advanced_by_runners ON chat_backfill.runs FOR UPDATE
    USING (chat_backfill.may_run(source_oid, target_oid))
    WITH CHECK (chat_backfill.may_run(source_oid, target_oid));
CREATE POLICY runs_deleted_by_runners ON chat_backfill.runs FOR DELETE
    USING (chat_backfill.may_run(source_oid, target_oid));

-- A rejection belongs to a run of the same tables: a resumable run in chat_backfill.runs, or the
-- one-transaction run that drew its id from the sequence in this very session.
CREATE POLICY rejections_visible_to_readers ON chat_backfill.rejected_messages FOR SELECT
    USING (pg_catalog.has_table_privilege(source_oid, 'SELECT'::pg_catalog.text));
CREATE POLICY rejections_by_runners ON chat_backfill.rejected_messages FOR INSERT
    WITH CHECK (chat_backfill.may_add(source_oid, target_oid, source, target)
                AND CASE WHEN EXISTS (SELECT FROM chat_backfill.runs r
                                      WHERE r.run_id OPERATOR(pg_catalog.=) rejected_messages.run_id
                                        AND r.source_oid OPERATOR(pg_catalog.=) rejected_messages.source_oid
                                        AND r.target_oid OPERATOR(pg_catalog.=) rejected_messages.target_oid)
                         THEN true
                         ELSE run_id OPERATOR(pg_catalog.=)
                              pg_catalog.currval('chat_backfill.runs_run_id_seq'::pg_catalog.regclass) END);
CREATE POLICY rejections_deleted_by_runners ON chat_backfill.rejected_messages FOR DELETE
    USING (chat_backfill.may_run(source_oid, target_oid));

-- The status view: as created by a fresh install (sql/runs.sql).
CREATE VIEW chat_backfill.status WITH (security_invoker = true) AS
SELECT r.run_id, r.source, r.target,
       CASE WHEN r.status OPERATOR(pg_catalog.=) 'finished'::pg_catalog.text THEN 'finished'::pg_catalog.text
            WHEN l.pid IS NOT NULL THEN 'running'::pg_catalog.text
            WHEN r.status OPERATOR(pg_catalog.=) 'running'::pg_catalog.text THEN 'interrupted'::pg_catalog.text
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
       l.pid AS runner_pid, r.last_key, r.high_water,
       r.started_at, r.updated_at, r.finished_at, r.last_error, r.started_by
FROM chat_backfill.runs r
LEFT JOIN pg_catalog.pg_locks l
       ON l.locktype OPERATOR(pg_catalog.=) 'advisory'::pg_catalog.text AND l.granted
      AND l.objsubid OPERATOR(pg_catalog.=) 1::pg_catalog.int2
      AND l.database OPERATOR(pg_catalog.=) (SELECT d.oid FROM pg_catalog.pg_database d
                                             WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database())
      AND l.classid OPERATOR(pg_catalog.=) r.source_oid AND l.objid OPERATOR(pg_catalog.=) r.target_oid;
GRANT SELECT ON chat_backfill.status TO PUBLIC;

-- 5. The SQL surface: a search-path-safe default filter, chats_vanished, if_busy.
DROP FUNCTION @extschema@.backfill_chat_messages(pg_catalog.regclass, pg_catalog.regclass, pg_catalog.int4, pg_catalog.int8,
    pg_catalog.text, pg_catalog.text, pg_catalog.text, pg_catalog.text, pg_catalog.bool);
CREATE  FUNCTION "backfill_chat_messages"(
	"source" regclass DEFAULT NULL, /* Option < PgRelation > */
	"target" regclass DEFAULT NULL, /* Option < PgRelation > */
	"batch_size" INT DEFAULT 5000, /* i32 */
	"now" bigint DEFAULT NULL, /* Option < i64 > */
	"source_filter" TEXT DEFAULT $$user_id OPERATOR(pg_catalog.!~~) 'shared-%'::pg_catalog.text$$, /* Option < & str > */
	"id_column" TEXT DEFAULT 'id', /* & str */
	"user_id_column" TEXT DEFAULT 'user_id', /* & str */
	"chat_column" TEXT DEFAULT 'chat', /* & str */
	"dry_run" bool DEFAULT false /* bool */
) RETURNS TABLE (
	"batch" INT,  /* i32 */
	"chats_read" bigint,  /* i64 */
	"messages_inserted" bigint,  /* i64 */
	"messages_rejected" bigint,  /* i64 */
	"messages_existing" bigint,  /* i64 */
	"last_chat_id" TEXT,  /* Option < String > */
	"elapsed_ms" double precision,  /* f64 */
	"messages_skipped" bigint,  /* i64 */
	"chats_skipped" bigint,  /* i64 */
	"chats_vanished" bigint  /* i64 */
)
VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'backfill_chat_messages_wrapper';

DROP PROCEDURE @extschema@.backfill_chat_messages_resumable(pg_catalog.regclass, pg_catalog.regclass, pg_catalog.int4,
    pg_catalog.int8, pg_catalog.interval, pg_catalog.interval, pg_catalog.text, pg_catalog.text, pg_catalog.text,
    pg_catalog.text, pg_catalog.interval, pg_catalog.bool);
CREATE PROCEDURE backfill_chat_messages_resumable(
    source regclass DEFAULT NULL,
    target regclass DEFAULT NULL,
    batch_size integer DEFAULT 5000,
    now bigint DEFAULT NULL,
    max_runtime interval DEFAULT NULL,
    pause interval DEFAULT '0',
    source_filter text DEFAULT $$user_id OPERATOR(pg_catalog.!~~) 'shared-%'::pg_catalog.text$$,
    id_column text DEFAULT 'id',
    user_id_column text DEFAULT 'user_id',
    chat_column text DEFAULT 'chat',
    lock_timeout interval DEFAULT NULL,
    restart boolean DEFAULT false,
    if_busy text DEFAULT 'skip')
LANGUAGE c AS 'MODULE_PATHNAME', 'backfill_chat_messages_resumable_wrapper';

-- 6. The json/jsonb wrappers are parsed at call time with the caller's search_path: qualify them.
CREATE OR REPLACE FUNCTION @extschema@.chat_messages(chat_id pg_catalog.text, user_id pg_catalog.text, chat pg_catalog.json,
                                          now pg_catalog.int8 DEFAULT NULL)
RETURNS TABLE (id pg_catalog.text, chat_id pg_catalog.text, user_id pg_catalog.text, role pg_catalog.text, parent_id pg_catalog.text, content pg_catalog.json,
               output pg_catalog.json, model_id pg_catalog.text, files pg_catalog.json, sources pg_catalog.json, embeds pg_catalog.json, done pg_catalog.bool,
               status_history pg_catalog.json, error pg_catalog.json, usage pg_catalog.json, created_at pg_catalog.int8, updated_at pg_catalog.int8)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT * FROM @extschema@.chat_messages($1, $2, $3::pg_catalog.text, $4) $$;

CREATE OR REPLACE FUNCTION @extschema@.chat_message_problems(chat_id pg_catalog.text, chat pg_catalog.json)
RETURNS TABLE (message_key pg_catalog.text, reason pg_catalog.text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT * FROM @extschema@.chat_message_problems($1, $2::pg_catalog.text) $$;

CREATE OR REPLACE FUNCTION @extschema@.chat_messages(chat_id pg_catalog.text, user_id pg_catalog.text, chat pg_catalog.jsonb,
                                          now pg_catalog.int8 DEFAULT NULL)
RETURNS TABLE (id pg_catalog.text, chat_id pg_catalog.text, user_id pg_catalog.text, role pg_catalog.text, parent_id pg_catalog.text, content pg_catalog.json,
               output pg_catalog.json, model_id pg_catalog.text, files pg_catalog.json, sources pg_catalog.json, embeds pg_catalog.json, done pg_catalog.bool,
               status_history pg_catalog.json, error pg_catalog.json, usage pg_catalog.json, created_at pg_catalog.int8, updated_at pg_catalog.int8)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT * FROM @extschema@.chat_messages($1, $2, $3::pg_catalog.text, $4) $$;

CREATE OR REPLACE FUNCTION @extschema@.chat_message_problems(chat_id pg_catalog.text, chat pg_catalog.jsonb)
RETURNS TABLE (message_key pg_catalog.text, reason pg_catalog.text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT * FROM @extschema@.chat_message_problems($1, $2::pg_catalog.text) $$;
