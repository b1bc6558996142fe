-- chat_backfill.plan() as an operator reads it, and admission control's settings. Estimates
-- are numbers that depend on the machine and the major: only the exact ones (a source small
-- enough to be read whole gives exact counts) and the checks are shown here; the client
-- suite tests the estimates as ranges.
CREATE EXTENSION chat_backfill;
\pset null '<NULL>'
SET client_min_messages = warning;
\set SHOW_CONTEXT never

CREATE TABLE chat (id text PRIMARY KEY, user_id text, chat json);
INSERT INTO chat SELECT 'c' || i, 'u' || (i % 3), json_build_object('history', json_build_object('messages',
  (SELECT json_object_agg('m' || j, json_build_object('role', 'user', 'content', repeat('x', 50), 'timestamp', 1700000000 + j))
     FROM generate_series(1, 1 + i % 4) j)))
  FROM generate_series(1, 40) i;
INSERT INTO chat VALUES ('s1', 'shared-u1', '{"history":{"messages":{"a":{"role":"user"}}}}');

-- No target yet: the plan says so, with the DDL, and measures nothing.
SELECT item, status, advice FROM chat_backfill.plan() WHERE item <> 'source_bytes';

-- A target without a unique index on id: fatal.
CREATE TABLE chat_message (id text, chat_id text NOT NULL REFERENCES chat(id) ON DELETE CASCADE, user_id text,
  role text NOT NULL, parent_id text, content json, output json, model_id text, files json, sources json,
  embeds json, done boolean DEFAULT true, status_history json, error json, usage json, created_at bigint,
  updated_at bigint);
SELECT item, status, detail, advice FROM chat_backfill.plan() WHERE item <> 'source_bytes';

-- Open WebUI's DDL, with its indexes and foreign key, and a trigger of the application's.
ALTER TABLE chat_message ADD PRIMARY KEY (id);
CREATE INDEX chat_message_chat_parent_idx ON chat_message (chat_id, parent_id);
CREATE INDEX chat_message_model_created_idx ON chat_message (model_id, created_at);
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;
CREATE TRIGGER chat_message_touch BEFORE INSERT ON chat_message FOR EACH ROW EXECUTE FUNCTION touch();
CREATE TRIGGER chat_message_audit AFTER INSERT ON chat_message FOR EACH STATEMENT EXECUTE FUNCTION touch();
-- Triggers the backfill's INSERT never fires: on UPDATE only, and one for replica sessions only.
CREATE TRIGGER chat_message_on_update BEFORE UPDATE ON chat_message FOR EACH ROW EXECUTE FUNCTION touch();
CREATE TRIGGER chat_message_replica BEFORE INSERT ON chat_message FOR EACH ROW EXECUTE FUNCTION touch();
ALTER TABLE chat_message ENABLE REPLICA TRIGGER chat_message_replica;
SELECT item, status, value, unit FROM chat_backfill.plan()
 WHERE item IN ('sample', 'chats', 'estimated_messages') ORDER BY item;
-- (compression depends on whether the server has lz4, which differs by build: test_plan.py.)
SELECT item, status, advice FROM chat_backfill.plan()
 WHERE status <> 'estimate' AND item NOT IN ('sample', 'source_bytes', 'free_disk', 'compression') ORDER BY item;
SELECT item, detail FROM chat_backfill.plan() WHERE item IN ('foreign_keys', 'triggers') ORDER BY item;
-- In a replica session, only the replica trigger fires.
SET session_replication_role = replica;
SELECT detail FROM chat_backfill.plan() WHERE item = 'triggers';
RESET session_replication_role;
SELECT value, unit, detail ~ '^2 index\(es\) besides the unique one on id, each updated for every row: chat_message_chat_parent_idx \(about [^)]+\), chat_message_model_created_idx \(about [^)]+\); \d+% of what the target grows by$' AS names_them
  FROM chat_backfill.plan() WHERE item = 'secondary_indexes';

-- The source filter and the batch size are the run's: the shared chat counts once it is not filtered out.
SELECT value FROM chat_backfill.plan(source_filter => NULL) WHERE item = 'estimated_messages';
SELECT detail FROM chat_backfill.plan(batch_size => 10) WHERE item = 'estimated_seconds_resumable';

-- The trial writes (a temporary table, rolled back): not in a read-only transaction (nor on a standby).
BEGIN READ ONLY;
SELECT item FROM chat_backfill.plan();
ROLLBACK;

-- It wrote nothing, recorded nothing.
SELECT (SELECT count(*) FROM chat_message) AS rows, (SELECT count(*) FROM chat_backfill.rejected_messages) AS rejected,
       (SELECT count(*) FROM chat_backfill.runs) AS runs;

-- Admission control: over chat_backfill.max_atomic_wal, the one-transaction form refuses
-- before reading anything (53400); force => true runs it anyway.
SHOW chat_backfill.max_atomic_wal;
SET chat_backfill.max_atomic_wal = 0;
SELECT status FROM chat_backfill.plan() WHERE item = 'admission';
\set VERBOSITY sqlstate
SELECT count(*) FROM backfill_chat_messages();
\set VERBOSITY default
SELECT count(*) FROM chat_message;
SELECT sum(messages_inserted) FROM backfill_chat_messages(force => true);
RESET chat_backfill.max_atomic_wal;
SELECT status FROM chat_backfill.plan() WHERE item = 'admission';

-- The settings are bounded, and a NULL batch_size takes chat_backfill.batch_size.
SET chat_backfill.batch_size = 0;
-- (PostgreSQL 18 words the range of a setting with a unit differently: SQLSTATE only.)
\set VERBOSITY sqlstate
SET chat_backfill.max_atomic_wal = -2;
SET chat_backfill.plan_sample_size = '32kB';
-- A misspelt setting is refused, not taken as a placeholder that does nothing (from 15 on:
-- PostgreSQL 14 accepts it, expected/plan_1.out).
SET chat_backfill.batchsize = 7;
\set VERBOSITY default
SET chat_backfill.batch_size = 7;
TRUNCATE chat_message;
SELECT count(*) AS batches, max(messages_inserted) AS largest FROM backfill_chat_messages();
RESET chat_backfill.batch_size;
SELECT name, setting, unit, context FROM pg_settings WHERE name LIKE 'chat\_backfill.%' ORDER BY name;

-- A role that may run the backfill may plan it; without pg_monitor it is not told the
-- server's free disk. ON CONFLICT (id) reads the target's id: without SELECT on it, the
-- plan (and the run) refuse up front.
CREATE ROLE planner;
GRANT SELECT ON chat TO planner;
GRANT INSERT ON chat_message TO planner;
SET ROLE planner;
SELECT item FROM chat_backfill.plan();
RESET ROLE;
GRANT SELECT (id) ON chat_message TO planner;
SET ROLE planner;
SELECT item, status, detail, advice FROM chat_backfill.plan() WHERE item IN ('free_disk', 'chats') ORDER BY item;
RESET ROLE;
SELECT status FROM chat_backfill.plan() WHERE item = 'free_disk';

DROP TABLE chat_message, chat;
DROP FUNCTION touch();
DROP ROLE planner;
DROP EXTENSION chat_backfill;
