-- One row per resumable run: where it is, what it did, how it ended.
CREATE TABLE chat_backfill.runs (
    run_id            bigserial PRIMARY KEY,
    source_oid        oid NOT NULL,
    target_oid        oid NOT NULL,
    source            text NOT NULL,
    target            text NOT NULL,
    source_filter     text,
    high_water        text NOT NULL,     -- the largest source key when the run started
    last_key          text,              -- the last key of the last committed batch
    total_chats       bigint NOT NULL,   -- eligible chats up to high_water, at the start
    now               bigint NOT NULL,   -- the clock every batch of the run uses
    chats_read        bigint NOT NULL DEFAULT 0,
    messages_inserted bigint NOT NULL DEFAULT 0,
    messages_rejected bigint NOT NULL DEFAULT 0,
    messages_existing bigint NOT NULL DEFAULT 0,
    messages_skipped  bigint NOT NULL DEFAULT 0,
    chats_skipped     bigint NOT NULL DEFAULT 0,
    batches           integer NOT NULL DEFAULT 0,
    active_ms         double precision NOT NULL DEFAULT 0,
    status            text NOT NULL,     -- running, stopped, yielded, finished
    started_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at       timestamptz,
    last_error        text
);
CREATE INDEX ON chat_backfill.runs (source_oid, target_oid, run_id DESC);
REVOKE ALL ON chat_backfill.runs FROM PUBLIC;
GRANT SELECT ON chat_backfill.runs TO PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('chat_backfill.runs', '');
SELECT pg_catalog.pg_extension_config_dump('chat_backfill.runs_run_id_seq', '');

-- Writers of the run state, so that callers need no write access to it.
CREATE FUNCTION chat_backfill.run_started(source_oid oid, target_oid oid, source text, target text,
    high_water text, total_chats bigint, now bigint, source_filter text) RETURNS bigint
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ INSERT INTO chat_backfill.runs (source_oid, target_oid, source, target, high_water, total_chats, now,
                                      source_filter, status)
      VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'running') RETURNING run_id $$;

CREATE FUNCTION chat_backfill.run_resumed(run_id bigint) RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ UPDATE chat_backfill.runs SET status = 'running', last_error = NULL, updated_at = clock_timestamp()
      WHERE runs.run_id = $1 $$;

CREATE FUNCTION chat_backfill.run_checkpoint(run_id bigint, last_key text, chats bigint, inserted bigint,
    rejected bigint, existing bigint, skipped bigint, chats_skipped bigint, elapsed_ms double precision)
RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ UPDATE chat_backfill.runs SET last_key = coalesce($2, last_key), chats_read = chats_read + $3,
          messages_inserted = messages_inserted + $4, messages_rejected = messages_rejected + $5,
          messages_existing = messages_existing + $6, messages_skipped = messages_skipped + $7,
          chats_skipped = chats_skipped + $8, batches = batches + 1, active_ms = active_ms + $9,
          updated_at = clock_timestamp()
      WHERE runs.run_id = $1 $$;

CREATE FUNCTION chat_backfill.run_status(run_id bigint, status text, last_error text) RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ UPDATE chat_backfill.runs SET status = $2, last_error = $3, updated_at = clock_timestamp()
      WHERE runs.run_id = $1 $$;

CREATE FUNCTION chat_backfill.run_finished(run_id bigint) RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ UPDATE chat_backfill.runs SET status = 'finished', finished_at = clock_timestamp(),
          updated_at = clock_timestamp(), last_error = NULL
      WHERE runs.run_id = $1 $$;

-- Progress of every resumable run. A run recorded as running whose runner no longer holds
-- its advisory lock was interrupted (crash, kill, restart): the next CALL resumes it.
CREATE VIEW chat_backfill.status AS
SELECT r.run_id, r.source, r.target,
       CASE WHEN r.status = 'finished' THEN 'finished'
            WHEN l.pid IS NOT NULL THEN 'running'
            WHEN r.status = 'running' THEN 'interrupted'
            ELSE r.status END AS state,
       r.chats_read AS chats_done, r.total_chats,
       round(100.0 * r.chats_read / nullif(r.total_chats, 0), 1) AS percent_done,
       r.messages_inserted, r.messages_rejected, r.messages_existing, r.messages_skipped, r.chats_skipped,
       r.batches,
       round((r.messages_inserted / nullif(r.active_ms / 1000, 0))::numeric, 1) AS messages_per_second,
       CASE WHEN r.status <> 'finished' AND r.chats_read > 0
            THEN make_interval(secs => (r.total_chats - r.chats_read) * (r.active_ms / 1000) / r.chats_read)
       END AS estimated_time_left,
       l.pid AS runner_pid, r.last_key, r.high_water,
       r.started_at, r.updated_at, r.finished_at, r.last_error
FROM chat_backfill.runs r
LEFT JOIN pg_catalog.pg_locks l
       ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
      AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
      AND l.classid = r.source_oid AND l.objid = r.target_oid;
GRANT SELECT ON chat_backfill.status TO PUBLIC;
