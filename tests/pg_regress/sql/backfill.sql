-- backfill_chat_messages() as an operator sees it: results, rejections, re-runs, misuse.
CREATE EXTENSION chat_backfill;
\pset null '<NULL>'
SET client_min_messages = warning;  -- progress NOTICEs carry timings
\set SHOW_CONTEXT never

-- Misuse, before any table exists: clear errors with a SQLSTATE and a hint.
SELECT * FROM backfill_chat_messages();
\echo :LAST_ERROR_SQLSTATE
CREATE TABLE chat (id text PRIMARY KEY, user_id text, chat json);
SELECT * FROM backfill_chat_messages();
\echo :LAST_ERROR_SQLSTATE
CREATE TABLE chat_message (id text, chat_id text REFERENCES chat(id), user_id text, role text NOT NULL,
  parent_id text, content json, output json, model_id text, files json, sources json, embeds json,
  done boolean, status_history json, error json, usage json, created_at bigint, updated_at integer);
SELECT * FROM backfill_chat_messages();
\echo :LAST_ERROR_SQLSTATE
ALTER TABLE chat_message ALTER updated_at TYPE bigint;
SELECT * FROM backfill_chat_messages();
\echo :LAST_ERROR_SQLSTATE
ALTER TABLE chat_message ADD PRIMARY KEY (id);
SELECT * FROM backfill_chat_messages(batch_size => 0);
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM backfill_chat_messages(chat_column => 'document');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM backfill_chat_messages(source => 'no_such_table');
\echo :LAST_ERROR_SQLSTATE

-- Data: good chats, a shared snapshot, bad messages, an unusable chat.
INSERT INTO chat VALUES
 ('c1', 'u1', '{"history":{"messages":{"a":{"role":"user","content":"hi","timestamp":1700000000},
                                       "b":{"role":"assistant","parentId":"a","timestamp":1700000001}}}}'),
 ('c2', 'u2', '{"history":{"messages":{"a":{"role":"user","timestamp":1700000002},
                                       "bad":{"role":{"x":1}},"skip":{"content":"no role"}}}}'),
 ('c3', 'shared-c1', '{"history":{"messages":{"a":{"role":"user"}}}}'),
 ('c4', 'u4', '[1,2,3]'),
 ('c5', 'u5', '{"history":{"messages":{"a":{"role":"evil","timestamp":1700000003}}}}');
-- A constraint the rules know nothing about: the batch fails, the bad row is isolated.
ALTER TABLE chat_message ADD CONSTRAINT no_evil CHECK (role <> 'evil');

SELECT batch, chats_read, messages_inserted, messages_rejected, messages_existing, messages_skipped, chats_skipped
FROM backfill_chat_messages(now => 1760000000);
SELECT id, role, parent_id, created_at FROM chat_message ORDER BY id;
SELECT chat_id, message_key, message_id, sqlstate, error FROM chat_backfill.rejected_messages ORDER BY chat_id, message_key;
SELECT message->>'role' AS role FROM chat_backfill.rejected_messages WHERE sqlstate = '23514';

-- A re-run inserts nothing and counts what is there.
SELECT sum(chats_read) AS chats, sum(messages_inserted) AS inserted, sum(messages_existing) AS existing
FROM backfill_chat_messages(now => 1760000000);

-- Dry run: parses and counts, writes nothing.
DELETE FROM chat_message;
SELECT sum(messages_inserted) AS would_insert FROM backfill_chat_messages(dry_run => true);
SELECT count(*) FROM chat_message;

-- Batches: one progress row per batch.
SELECT batch, chats_read, messages_inserted FROM backfill_chat_messages(batch_size => 1, now => 1760000000);

-- The rejected rows hold chat content: not readable by PUBLIC, yet any caller can run a
-- backfill. Without INSERT on the target, PostgreSQL's own permission error stops it.
CREATE ROLE app_migrator;
GRANT SELECT ON chat TO app_migrator;
GRANT SELECT, INSERT ON chat_message TO app_migrator;
-- A role that can read chat sees the rejections of chat's backfills (their content is chat's);
-- one that cannot, sees none.
CREATE ROLE outsider;
SET ROLE outsider;
SELECT count(*) AS outsider_sees FROM chat_backfill.rejected_messages;
RESET ROLE;
SET ROLE app_migrator;
SELECT count(*) AS migrator_sees FROM chat_backfill.rejected_messages;
SELECT sum(messages_existing) AS existing, sum(messages_rejected) AS rejected FROM backfill_chat_messages(now => 1760000000);
RESET ROLE;
REVOKE INSERT ON chat_message FROM app_migrator;
SET ROLE app_migrator;
SELECT * FROM backfill_chat_messages(batch_size => 1);
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
SELECT count(*) AS recorded_against_rows FROM chat_backfill.rejected_messages WHERE sqlstate = '42501';
DROP TABLE chat_message, chat;
DROP OWNED BY app_migrator;
DROP ROLE app_migrator, outsider;
DROP EXTENSION chat_backfill;
