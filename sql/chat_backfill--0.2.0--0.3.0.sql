-- chat_backfill 0.2.0 -> 0.3.0: a replica-lag throttle and a WAL rate limit on the committing
-- procedure. Every name is schema-qualified, as in the install script.

-- 1. A run waiting for its replicas records how far behind they are.
ALTER TABLE chat_backfill.runs ADD COLUMN replica_lag_bytes pg_catalog.int8;
GRANT UPDATE (replica_lag_bytes) ON chat_backfill.runs TO PUBLIC;

-- 2. The status view says 'throttled', with the lag, while a run waits.
CREATE OR REPLACE VIEW chat_backfill.status WITH (security_invoker = true) AS
SELECT r.run_id, r.source, r.target,
       CASE WHEN r.status OPERATOR(pg_catalog.=) 'finished'::pg_catalog.text THEN 'finished'::pg_catalog.text
            WHEN l.pid IS NOT NULL AND r.status OPERATOR(pg_catalog.=) 'throttled'::pg_catalog.text
            THEN 'throttled'::pg_catalog.text
            WHEN l.pid IS NOT NULL THEN 'running'::pg_catalog.text
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
       l.pid AS runner_pid, r.last_key, r.high_water,
       r.started_at, r.updated_at, r.finished_at, r.last_error, r.started_by,
       CASE WHEN l.pid IS NOT NULL AND r.status OPERATOR(pg_catalog.=) 'throttled'::pg_catalog.text
            THEN r.replica_lag_bytes END AS replica_lag_bytes
FROM chat_backfill.runs r
LEFT JOIN pg_catalog.pg_locks l
       ON l.locktype OPERATOR(pg_catalog.=) 'advisory'::pg_catalog.text AND l.granted
      AND l.objsubid OPERATOR(pg_catalog.=) 1::pg_catalog.int2
      AND l.database OPERATOR(pg_catalog.=) (SELECT d.oid FROM pg_catalog.pg_database d
                                             WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database())
      AND l.classid OPERATOR(pg_catalog.=) r.source_oid AND l.objid OPERATOR(pg_catalog.=) r.target_oid;
-- 3. The procedure takes max_replica_lag, replica_slot and max_wal_rate (appended last, so
--    every existing call keeps its meaning). Its old signature goes first. The new one gets
--    the default privileges (EXECUTE for PUBLIC): a REVOKE made on the old one must be
--    made again (README, Upgrades).
DROP PROCEDURE @extschema@.backfill_chat_messages_resumable(pg_catalog.regclass, pg_catalog.regclass, pg_catalog.int4,
    pg_catalog.int8, pg_catalog.interval, pg_catalog.interval, pg_catalog.text, pg_catalog.text, pg_catalog.text,
    pg_catalog.text, pg_catalog.interval, pg_catalog.bool, pg_catalog.text);
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
    if_busy text DEFAULT 'skip',
    max_replica_lag text DEFAULT NULL,
    replica_slot name DEFAULT NULL,
    max_wal_rate numeric DEFAULT NULL)
LANGUAGE c AS 'MODULE_PATHNAME', 'backfill_chat_messages_resumable_wrapper';
