-- A run split across background workers (CALL ... workers => n): its keys after the run's
-- last_key at the split, up to high_water, in contiguous ranges of about equal stored chat
-- bytes (chat sizes are heavily skewed, counts would not balance), each with its own
-- checkpoint. A range is worked by whoever holds its advisory lock (1667329894, range_id):
-- a worker, or a CALL with workers => 1; the lock goes with the session, so a killed or
-- crashed worker frees its range for the next CALL.
CREATE TABLE chat_backfill.run_ranges (
    range_id   serial PRIMARY KEY,                 -- int4: the second half of the lock key
    run_id     pg_catalog.int8 NOT NULL REFERENCES chat_backfill.runs ON DELETE CASCADE,
    range_no   pg_catalog.int4 NOT NULL,
    low_key    pg_catalog.text,                    -- exclusive; NULL: from the first key
    high_key   pg_catalog.text NOT NULL,           -- inclusive
    chat_bytes pg_catalog.int8 NOT NULL,           -- stored chat bytes in it at the split
    last_key   pg_catalog.text,                    -- the last chat completed by a committed batch
    finished   pg_catalog.bool NOT NULL DEFAULT false,
    partial_key pg_catalog.text,                   -- as in chat_backfill.runs: the chat a batch left
    partial_done pg_catalog.int8,                  -- unfinished, its messages handled,
    partial_fingerprint pg_catalog.int8,           -- and its text's fingerprint
    UNIQUE (run_id, range_no)
);
SELECT pg_catalog.pg_extension_config_dump('chat_backfill.run_ranges', '');
SELECT pg_catalog.pg_extension_config_dump('chat_backfill.run_ranges_range_id_seq', '');
REVOKE ALL ON chat_backfill.run_ranges FROM PUBLIC;
GRANT SELECT ON chat_backfill.run_ranges TO PUBLIC;
GRANT INSERT (run_id, range_no, low_key, high_key, chat_bytes) ON chat_backfill.run_ranges TO PUBLIC;
GRANT UPDATE (last_key, finished, partial_key, partial_done, partial_fingerprint) ON chat_backfill.run_ranges TO PUBLIC;
GRANT USAGE ON SEQUENCE chat_backfill.run_ranges_range_id_seq TO PUBLIC;
ALTER TABLE chat_backfill.run_ranges ENABLE ROW LEVEL SECURITY;
ALTER TABLE chat_backfill.run_ranges OWNER TO @extowner@;
-- A range is seen with its run (the runs policies apply inside), and made or advanced by who
-- may run that backfill.
CREATE POLICY ranges_visible_with_their_run ON chat_backfill.run_ranges FOR SELECT
    USING (EXISTS (SELECT FROM chat_backfill.runs r WHERE r.run_id OPERATOR(pg_catalog.=) run_ranges.run_id));
CREATE POLICY ranges_made_by_runners ON chat_backfill.run_ranges FOR INSERT
    WITH CHECK (EXISTS (SELECT FROM chat_backfill.runs r WHERE r.run_id OPERATOR(pg_catalog.=) run_ranges.run_id
                          AND chat_backfill.may_run(r.source, r.target)));
CREATE POLICY ranges_advanced_by_runners ON chat_backfill.run_ranges FOR UPDATE
    USING (EXISTS (SELECT FROM chat_backfill.runs r WHERE r.run_id OPERATOR(pg_catalog.=) run_ranges.run_id
                     AND chat_backfill.may_run(r.source, r.target)))
    WITH CHECK (EXISTS (SELECT FROM chat_backfill.runs r WHERE r.run_id OPERATOR(pg_catalog.=) run_ranges.run_id
                          AND chat_backfill.may_run(r.source, r.target)));

-- What a CALL hands its workers: its arguments, as JSON. A worker connects as the role that
-- made the CALL and reads only a launch that role made itself (launched_by is never given
-- by the INSERT: it is the inserting role), so nobody can make a worker run a filter, or
-- settings, that its own role did not choose.
CREATE TABLE chat_backfill.launches (
    launch_id   bigserial PRIMARY KEY,
    run_id      pg_catalog.int8 NOT NULL REFERENCES chat_backfill.runs ON DELETE CASCADE,
    settings    pg_catalog.text NOT NULL,
    launched_by pg_catalog.text NOT NULL DEFAULT CURRENT_USER,
    launched_at pg_catalog.timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    error       pg_catalog.text                -- a worker's error, where its role can always write it
);
REVOKE ALL ON chat_backfill.launches FROM PUBLIC;
GRANT SELECT ON chat_backfill.launches TO PUBLIC;
GRANT INSERT (run_id, settings) ON chat_backfill.launches TO PUBLIC;
GRANT UPDATE (error) ON chat_backfill.launches TO PUBLIC;
GRANT USAGE ON SEQUENCE chat_backfill.launches_launch_id_seq TO PUBLIC;
ALTER TABLE chat_backfill.launches ENABLE ROW LEVEL SECURITY;
CREATE POLICY launches_read_by_their_role ON chat_backfill.launches FOR SELECT
    USING (launched_by OPERATOR(pg_catalog.=) CURRENT_USER::pg_catalog.text);
-- A worker records its error on its own launch even when its role has meanwhile lost the
-- rights the run's row needs (the CALL then still reports the real error).
CREATE POLICY launches_failed_by_their_role ON chat_backfill.launches FOR UPDATE
    USING (launched_by OPERATOR(pg_catalog.=) CURRENT_USER::pg_catalog.text)
    WITH CHECK (launched_by OPERATOR(pg_catalog.=) CURRENT_USER::pg_catalog.text);
CREATE POLICY launches_made_by_runners ON chat_backfill.launches FOR INSERT
    WITH CHECK (launched_by OPERATOR(pg_catalog.=) CURRENT_USER::pg_catalog.text
                AND EXISTS (SELECT FROM chat_backfill.runs r WHERE r.run_id OPERATOR(pg_catalog.=) launches.run_id
                              AND chat_backfill.may_run(r.source, r.target)));

-- Progress of every resumable run the caller may see: a view over a SQL function, which runs
-- as whoever reads the view, so the policies above apply to them (a view's own
-- security_invoker exists from 15 on only). A run is running while its CALL holds the runner lock or a
-- chat_backfill worker holds one of its ranges (any session can take an advisory lock: a
-- range lock counts only if its backend holds the workers' mark, the shared lock
-- (1667329894, 0), and pg_stat_activity, where it shows the backend, says it is a worker); one recorded as running that nobody
-- holds was interrupted (crash, kill, restart): the next CALL resumes it. runner_pid is the
-- CALL's, or a worker's; workers is NULL when none is at work.
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
CREATE VIEW chat_backfill.status AS SELECT * FROM chat_backfill.status_rows();
GRANT SELECT ON chat_backfill.status TO PUBLIC;
