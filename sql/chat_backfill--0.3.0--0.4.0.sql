-- chat_backfill 0.3.0 -> 0.4.0: settings (chat_backfill.* GUCs) that NULL arguments take,
-- admission control with force on the one-transaction form, and chat_backfill.plan(). The
-- definitions are the install script's, word for word (the upgrade test compares them); their
-- unqualified names resolve as there (PostgreSQL runs extension scripts with search_path
-- @extschema@, pg_catalog always searched first for types).

-- 1. The one-transaction form: batch_size NULL takes chat_backfill.batch_size; force
--    (appended last, so every existing call keeps its meaning) skips admission control.
--    A new argument is a new signature: the old one goes first, and the new one gets the
--    default privileges (EXECUTE for PUBLIC): a REVOKE made on the old one must be made
--    again (README, Upgrades).
DROP FUNCTION @extschema@.backfill_chat_messages(pg_catalog.regclass, pg_catalog.regclass, pg_catalog.int4,
    pg_catalog.int8, pg_catalog.text, pg_catalog.text, pg_catalog.text, pg_catalog.text, pg_catalog.bool);
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
	"force" bool DEFAULT false
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
	"chats_vanished" bigint
)
VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'backfill_chat_messages_wrapper';

-- 2. The committing form: only batch_size's default changes (to NULL: the setting). Same
--    signature, so CREATE OR REPLACE keeps its privileges.
CREATE OR REPLACE PROCEDURE @extschema@.backfill_chat_messages_resumable(
    source regclass DEFAULT NULL,
    target regclass DEFAULT NULL,
    batch_size integer DEFAULT NULL,
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

-- 3. The plan before a run.
CREATE FUNCTION chat_backfill.plan(
    source regclass DEFAULT NULL,
    target regclass DEFAULT NULL,
    batch_size integer DEFAULT NULL,
    source_filter text DEFAULT $$user_id OPERATOR(pg_catalog.!~~) 'shared-%'::pg_catalog.text$$,
    id_column text DEFAULT 'id',
    user_id_column text DEFAULT 'user_id',
    chat_column text DEFAULT 'chat')
RETURNS TABLE (item text, status text, value numeric, unit text, detail text, advice text)
VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', 'plan_wrapper';
