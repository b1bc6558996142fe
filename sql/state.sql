-- The extension's own state lives in its own schema, whatever schema the functions went to.
-- Every name below is schema-qualified: this script, and the SQL the extension runs, must
-- mean the same thing whatever search_path the installing or calling role has.
CREATE SCHEMA chat_backfill;
GRANT USAGE ON SCHEMA chat_backfill TO PUBLIC;

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

-- A table's schema-qualified, quoted name: the one the backfill records and shows.
CREATE FUNCTION chat_backfill.table_name(relation pg_catalog.oid) RETURNS pg_catalog.text
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT pg_catalog.format('%I.%I'::pg_catalog.text, n.nspname, c.relname)
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
     WHERE c.oid OPERATOR(pg_catalog.=) relation;
END;


-- Run state names its tables by schema-qualified name, which a dump and restore keep; oids are
-- not kept, and after a restore an old oid can belong to anybody's table. Every right below is
-- therefore worked out from the name, resolved now (to_regclass: NULL when nothing has that
-- name any more, and a missing table grants nothing); the oid columns are only a cache.

-- Who may write a run's state: a role that could run that backfill (read its source, write its
-- target). Parsed once, here.
CREATE FUNCTION chat_backfill.may_run(source pg_catalog.text, target pg_catalog.text)
RETURNS pg_catalog.bool LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT coalesce(pg_catalog.has_table_privilege(chat_backfill.regclass_of(source)::pg_catalog.oid, 'SELECT'::pg_catalog.text)
                    AND pg_catalog.has_table_privilege(chat_backfill.regclass_of(target)::pg_catalog.oid, 'INSERT'::pg_catalog.text),
                    false);
END;

-- Rows a role adds must also carry the oids the names have now, so that the cache is right
-- when written.
CREATE FUNCTION chat_backfill.may_add(source_oid pg_catalog.oid, target_oid pg_catalog.oid,
                                      source pg_catalog.text, target pg_catalog.text)
RETURNS pg_catalog.bool LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT coalesce(chat_backfill.may_run(source, target)
                    AND source_oid OPERATOR(pg_catalog.=) chat_backfill.regclass_of(source)::pg_catalog.oid
                    AND target_oid OPERATOR(pg_catalog.=) chat_backfill.regclass_of(target)::pg_catalog.oid, false);
END;

-- Whether what the source shows depends on who reads it, for the calling role: a table's or
-- a partitioned table's row-level security applies to it (not to the owner, to a role with
-- BYPASSRLS, or where there is none); a view or a foreign table may show each role other rows
-- (row_security_active says nothing of them), so they always count as restricted; a
-- materialized view shows every row to whoever may read it.
CREATE FUNCTION chat_backfill.restricted(source pg_catalog.text)
RETURNS pg_catalog.bool LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT coalesce((SELECT CASE WHEN c.relkind OPERATOR(pg_catalog.=) ANY (ARRAY['r', 'p']::pg_catalog."char"[])
                                 THEN pg_catalog.row_security_active(c.oid)
                                 ELSE c.relkind OPERATOR(pg_catalog.<>) 'm'::pg_catalog."char" END
                     FROM pg_catalog.pg_class c
                     WHERE c.oid OPERATOR(pg_catalog.=) chat_backfill.regclass_of(source)::pg_catalog.oid), false);
END;

-- Messages and chats a backfill could not write, and why. It holds users' chat content, so a
-- role sees only rejections from sources it can read (it could read that content there anyway).
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
    source_oid  pg_catalog.oid,            -- a cache: the names are what identify the tables
    target_oid  pg_catalog.oid,
    id_column   pg_catalog.text,           -- the source's key column, to check a reader can see the chat
    recorded_by pg_catalog.text DEFAULT CURRENT_USER  -- not insertable; NULL: before 0.7.0, by a one-transaction run
);
CREATE INDEX ON chat_backfill.rejected_messages (run_id);
-- A re-run does not record the same rejection again (its INSERT says ON CONFLICT DO NOTHING).
-- Ids come from user data and may be longer than an index row can hold: index their hashes.
-- A chat's own rejection has no message id: the flag and coalesce make those equal too
-- (NULLS NOT DISTINCT would say it, from 15 on only). The recorder is part of it: a row
-- another role recorded first (a decoy, say) never stands in for a run's own.
CREATE UNIQUE INDEX rejected_messages_once ON chat_backfill.rejected_messages
    (target, source, sqlstate, pg_catalog.hashtextextended(chat_id, 0::pg_catalog.int8), (message_id IS NULL),
     coalesce(pg_catalog.hashtextextended(message_id, 0::pg_catalog.int8), 0::pg_catalog.int8), recorded_by);
SELECT pg_catalog.pg_extension_config_dump('chat_backfill.rejected_messages', '');
SELECT pg_catalog.pg_extension_config_dump('chat_backfill.rejected_messages_id_seq', '');
-- Backfills record rejections with the caller's own rights; the policies are in runs.sql.
REVOKE ALL ON chat_backfill.rejected_messages FROM PUBLIC;
GRANT SELECT, DELETE ON chat_backfill.rejected_messages TO PUBLIC;
GRANT INSERT (run_id, source, target, source_oid, target_oid, chat_id, message_key, message_id, sqlstate,
              error, detail, message, id_column) ON chat_backfill.rejected_messages TO PUBLIC;
GRANT USAGE ON SEQUENCE chat_backfill.rejected_messages_id_seq TO PUBLIC;
ALTER TABLE chat_backfill.rejected_messages ENABLE ROW LEVEL SECURITY;
-- The state belongs to the extension's owner (the role that ran CREATE EXTENSION; in a trusted
-- install, the database owner, not the bootstrap superuser that ran this script), as the
-- application's own tables do: so the whole database's pg_dump by that role, and its
-- pg_restore, read and write the state like any table of theirs, row-level security included.
ALTER TABLE chat_backfill.rejected_messages OWNER TO @extowner@;
