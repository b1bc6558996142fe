-- The extension's own state lives in its own schema, whatever schema the functions went to.
CREATE SCHEMA chat_backfill;
GRANT USAGE ON SCHEMA chat_backfill TO PUBLIC;

-- Messages and chats a backfill could not write, and why. It holds users' chat content:
-- not readable by PUBLIC; grant SELECT to whoever runs the migration if they need it.
CREATE TABLE chat_backfill.rejected_messages (
    id          bigserial PRIMARY KEY,
    run_id      bigint NOT NULL,
    source      text NOT NULL,
    target      text NOT NULL,
    chat_id     text NOT NULL,
    message_key text,           -- NULL: the whole chat was unusable
    message_id  text,
    sqlstate    text NOT NULL,
    error       text NOT NULL,
    detail      text,
    message     json,
    rejected_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX ON chat_backfill.rejected_messages (run_id);
REVOKE ALL ON chat_backfill.rejected_messages FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('chat_backfill.rejected_messages', '');
SELECT pg_catalog.pg_extension_config_dump('chat_backfill.rejected_messages_id_seq', '');

-- Callers write rejections through this, so running a backfill needs no access to the
-- table itself (and gives none).
CREATE FUNCTION chat_backfill.record_rejections(
    run_id bigint, source text, target text, chat_ids text[], message_keys text[],
    message_ids text[], sqlstates text[], errors text[], details text[], messages json[])
RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO chat_backfill.rejected_messages
        (run_id, source, target, chat_id, message_key, message_id, sqlstate, error, detail, message)
    SELECT $1, $2, $3, u.* FROM unnest($4, $5, $6, $7, $8, $9, $10) AS u
$$;
