-- One row per resumable run: where it is, what it did, how it ended. Its run_id sequence
-- also numbers the one-transaction form's runs, so run ids never collide.
CREATE TABLE chat_backfill.runs (
    run_id            bigserial PRIMARY KEY,
    source_oid        pg_catalog.oid NOT NULL,
    target_oid        pg_catalog.oid NOT NULL,
    source            pg_catalog.text NOT NULL,
    target            pg_catalog.text NOT NULL,
    source_filter     pg_catalog.text,
    high_water        pg_catalog.text NOT NULL,     -- the largest source key when the run started
    last_key          pg_catalog.text,              -- the last chat completed by a committed batch
    total_chats       pg_catalog.int8 NOT NULL,     -- eligible chats up to high_water, at the start
    now               pg_catalog.int8 NOT NULL,     -- the clock every batch of the run uses
    chats_read        pg_catalog.int8 NOT NULL DEFAULT 0,
    messages_inserted pg_catalog.int8 NOT NULL DEFAULT 0,
    messages_rejected pg_catalog.int8 NOT NULL DEFAULT 0,
    messages_existing pg_catalog.int8 NOT NULL DEFAULT 0,
    messages_skipped  pg_catalog.int8 NOT NULL DEFAULT 0,
    chats_skipped     pg_catalog.int8 NOT NULL DEFAULT 0,
    batches           pg_catalog.int4 NOT NULL DEFAULT 0,
    active_ms         pg_catalog.float8 NOT NULL DEFAULT 0,
    status            pg_catalog.text NOT NULL,     -- running, throttled, stopped, yielded, failed, finished
    started_at        pg_catalog.timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    updated_at        pg_catalog.timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    finished_at       pg_catalog.timestamptz,
    last_error        pg_catalog.text,
    chats_vanished    pg_catalog.int8 NOT NULL DEFAULT 0,  -- deleted by the application meanwhile
    started_by        pg_catalog.text NOT NULL DEFAULT CURRENT_USER,  -- for audit; any runner may resume
    replica_lag_bytes pg_catalog.int8,              -- while throttled: how far behind the replicas are
    batch_size        pg_catalog.int4,              -- the size the last batch used (batch_time tunes it)
    rows              pg_catalog.text NOT NULL DEFAULT 'migration',  -- which rows: 'migration' or 'app'
    partial_key       pg_catalog.text,              -- a chat bigger than a batch that the last batch left unfinished,
    partial_done      pg_catalog.int8,              -- how many of its messages are handled,
    partial_fingerprint pg_catalog.int8,            -- and its text's fingerprint (a changed chat is read whole again)
    messages_dropped  pg_catalog.int8 NOT NULL DEFAULT 0   -- a BEFORE trigger on the target returned NULL for them
);
CREATE INDEX ON chat_backfill.runs (source_oid, target_oid, run_id DESC);
SELECT pg_catalog.pg_extension_config_dump('chat_backfill.runs', '');
SELECT pg_catalog.pg_extension_config_dump('chat_backfill.runs_run_id_seq', '');

-- Runs are written by the procedure with the caller's own rights. Row-level security lets a
-- role see a run only if it can read the run's source, and start, advance or delete one only
-- if it could run that backfill (chat_backfill.may_run, may_add). The columns a run is identified and
-- audited by cannot be changed.
REVOKE ALL ON chat_backfill.runs FROM PUBLIC;
GRANT SELECT, DELETE ON chat_backfill.runs TO PUBLIC;
GRANT INSERT (source_oid, target_oid, source, target, source_filter, high_water, total_chats, now, status, rows)
    ON chat_backfill.runs TO PUBLIC;
GRANT UPDATE (last_key, chats_read, messages_inserted, messages_rejected, messages_existing, messages_skipped,
              chats_skipped, chats_vanished, batches, active_ms, status, updated_at, finished_at, last_error,
              replica_lag_bytes, batch_size, partial_key, partial_done, partial_fingerprint,
              messages_dropped)
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
