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
    messages_dropped  pg_catalog.int8 NOT NULL DEFAULT 0,  -- a BEFORE trigger on the target returned NULL for them
    write_path        pg_catalog.text,              -- how the last batch went in: direct, copy binary, copy text, insert
    id_column         pg_catalog.text,              -- the source's key column, to check a reader can see the chats
    restricted        pg_catalog.bool               -- whether the source's row-level security applied to started_by
                                                    -- (NULL: unknown, a run before 0.7.0): another role resumes only a
                                                    -- run that covered the whole source
);
CREATE INDEX ON chat_backfill.runs (source, target, run_id DESC);
SELECT pg_catalog.pg_extension_config_dump('chat_backfill.runs', '');
SELECT pg_catalog.pg_extension_config_dump('chat_backfill.runs_run_id_seq', '');

-- Runs are written by the procedure with the caller's own rights. Row-level security lets a
-- role see a run only if it can read what the run shows: its source, and, where the source's
-- own row-level security applies to the role, the run must be its own and show it the run's
-- last chat (high_water); it may start, advance or delete one only if it could run that
-- backfill (chat_backfill.may_run, may_add), and a run it starts says truly whether the
-- source's row-level security applied to it. The columns a run is identified and audited by
-- (started_by among them) cannot be set or changed; the oid cache is refreshed by whoever
-- resumes the run.
REVOKE ALL ON chat_backfill.runs FROM PUBLIC;
GRANT SELECT, DELETE ON chat_backfill.runs TO PUBLIC;
GRANT INSERT (source_oid, target_oid, source, target, source_filter, high_water, total_chats, now, status, rows,
              id_column, restricted)
    ON chat_backfill.runs TO PUBLIC;
GRANT UPDATE (last_key, chats_read, messages_inserted, messages_rejected, messages_existing, messages_skipped,
              chats_skipped, chats_vanished, batches, active_ms, status, updated_at, finished_at, last_error,
              replica_lag_bytes, batch_size, partial_key, partial_done, partial_fingerprint,
              messages_dropped, source_oid, target_oid, write_path)
    ON chat_backfill.runs TO PUBLIC;
GRANT USAGE ON SEQUENCE chat_backfill.runs_run_id_seq TO PUBLIC;
ALTER TABLE chat_backfill.runs ENABLE ROW LEVEL SECURITY;
ALTER TABLE chat_backfill.runs OWNER TO @extowner@;

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

-- A rejection belongs to a run of the same tables: a resumable run in chat_backfill.runs, or the
-- one-transaction run that drew its id from the sequence in this very session. It holds a
-- chat's content: a role sees it only if it could read that chat, and, where the source's
-- row-level security applies to it, only if it or a trusted role recorded it.
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
