-- chat_backfill 0.6.0 -> 0.7.0: checkpoints that go on inside a chat bigger than a batch, so
-- every CALL moves a run on however small its max_runtime (runs and key ranges keep the chat
-- a batch left unfinished, how many of its messages are handled, and its text's fingerprint);
-- rows a BEFORE trigger drops counted (messages_dropped). The definitions are the install
-- script's, word for word (the upgrade test compares them).

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

-- 2. Rows a BEFORE trigger on the target dropped: a run's count, shown last in the status view
--    (CREATE OR REPLACE: same columns, one appended, so views built on it and its grants stay).
ALTER TABLE chat_backfill.runs ADD COLUMN messages_dropped pg_catalog.int8 NOT NULL DEFAULT 0;
GRANT UPDATE (messages_dropped) ON chat_backfill.runs TO PUBLIC;
CREATE OR REPLACE VIEW chat_backfill.status WITH (security_invoker = true) AS
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
       r.messages_dropped
FROM chat_backfill.runs r
LEFT JOIN LATERAL (
    SELECT COALESCE(pg_catalog.min(l.pid) FILTER (WHERE l.objsubid OPERATOR(pg_catalog.=) 1::pg_catalog.int2),
                               pg_catalog.min(l.pid)) AS pid,
           (pg_catalog.count(DISTINCT l.pid) FILTER (WHERE l.objsubid OPERATOR(pg_catalog.=) 2::pg_catalog.int2))::pg_catalog.int4
               AS workers
    FROM held l
    WHERE (l.objsubid OPERATOR(pg_catalog.=) 1::pg_catalog.int2
           AND l.classid OPERATOR(pg_catalog.=) r.source_oid AND l.objid OPERATOR(pg_catalog.=) r.target_oid)
       OR (l.objsubid OPERATOR(pg_catalog.=) 2::pg_catalog.int2
           AND l.objid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT g.range_id::pg_catalog.oid FROM chat_backfill.run_ranges g
                                                         WHERE g.run_id OPERATOR(pg_catalog.=) r.run_id)))
) h ON true;

-- 3. The one-transaction form: messages_dropped, appended last to its result. A new result
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
	"messages_dropped" bigint
)
VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'backfill_chat_messages_wrapper';
