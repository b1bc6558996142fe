-- The extension's own state lives in its own schema, whatever schema the functions went to.
-- Every name below is schema-qualified: this script, and the SQL the extension runs, must
-- mean the same thing whatever search_path the installing or calling role has.
CREATE SCHEMA chat_backfill;
GRANT USAGE ON SCHEMA chat_backfill TO PUBLIC;

-- Messages and chats a backfill could not write, and why. It holds users' chat content:
-- not readable by PUBLIC; grant SELECT to whoever runs the migration if they need it.
CREATE TABLE chat_backfill.rejected_messages (
    id          bigserial PRIMARY KEY,
    run_id      pg_catalog.int8 NOT NULL,
    source      pg_catalog.text NOT NULL,
    target      pg_catalog.text NOT NULL,
    chat_id     pg_catalog.text NOT NULL,
    message_key pg_catalog.text,           -- NULL: the whole chat was unusable
    message_id  pg_catalog.text,
    sqlstate    pg_catalog.text NOT NULL,
    error       pg_catalog.text NOT NULL,
    detail      pg_catalog.text,
    message     pg_catalog.json,
    rejected_at pg_catalog.timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    source_oid  pg_catalog.oid,
    target_oid  pg_catalog.oid
);
CREATE INDEX ON chat_backfill.rejected_messages (run_id);
-- A re-run does not record the same rejection again (its INSERT says ON CONFLICT DO NOTHING).
-- Ids come from user data and may be longer than an index row can hold: index their hashes.
CREATE UNIQUE INDEX rejected_messages_once ON chat_backfill.rejected_messages
    (target_oid, sqlstate, pg_catalog.hashtextextended(chat_id, 0::pg_catalog.int8),
     pg_catalog.hashtextextended(message_id, 0::pg_catalog.int8)) NULLS NOT DISTINCT;
SELECT pg_catalog.pg_extension_config_dump('chat_backfill.rejected_messages', '');
SELECT pg_catalog.pg_extension_config_dump('chat_backfill.rejected_messages_id_seq', '');

-- Backfills record rejections with the caller's own rights: anyone may add rows, but only
-- for a source it can read and a target it can write, which it could fill with anything
-- anyway. Nobody but the owner (and superusers) reads, changes or deletes them.
REVOKE ALL ON chat_backfill.rejected_messages FROM PUBLIC;
GRANT INSERT (run_id, source, target, source_oid, target_oid, chat_id, message_key, message_id, sqlstate,
              error, detail, message) ON chat_backfill.rejected_messages TO PUBLIC;
GRANT USAGE ON SEQUENCE chat_backfill.rejected_messages_id_seq TO PUBLIC;
ALTER TABLE chat_backfill.rejected_messages ENABLE ROW LEVEL SECURITY;
CREATE POLICY rejections_by_runners ON chat_backfill.rejected_messages FOR INSERT
    WITH CHECK (pg_catalog.has_table_privilege(source_oid, 'SELECT'::pg_catalog.text)
                AND pg_catalog.has_table_privilege(target_oid, 'INSERT'::pg_catalog.text));
