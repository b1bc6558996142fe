-- The committing procedure as an operator sees it (pg_regress runs each statement in
-- autocommit, so the CALL can commit).
CREATE EXTENSION chat_backfill;
\pset null '<NULL>'
SET client_min_messages = warning;
\set SHOW_CONTEXT never
CREATE TABLE chat (id text PRIMARY KEY, user_id text, chat json);
CREATE TABLE chat_message (id text PRIMARY KEY, chat_id text NOT NULL REFERENCES chat(id), user_id text,
  role text NOT NULL, parent_id text, content json, output json, model_id text, files json, sources json,
  embeds json, done boolean, status_history json, error json, usage json, created_at bigint, updated_at bigint);
INSERT INTO chat SELECT 'c' || lpad(i::text, 3, '0'), 'u',
  json_build_object('history', json_build_object('messages', json_build_object('a', json_build_object('role', 'user'),
                                                                              'b', json_build_object('role', 'assistant'))))
FROM generate_series(1, 25) i;
INSERT INTO chat VALUES ('c100', 'u', '{"history":{"messages":{"bad":{"role":{"x":1}}}}}');

-- Where it cannot commit: a clear error.
BEGIN;
CALL backfill_chat_messages_resumable();
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;

-- Slices: each CALL stops after one batch of 10 messages (5 chats) and the next resumes.
CALL backfill_chat_messages_resumable(batch_size => 10, max_runtime => '0', now => 1760000000);
SELECT state, chats_done, total_chats, percent_done, messages_inserted, batches, last_key, high_water
FROM chat_backfill.status;
CALL backfill_chat_messages_resumable(batch_size => 10, max_runtime => '0', now => 1760000000);
SELECT state, chats_done, percent_done, messages_inserted, last_key FROM chat_backfill.status;
-- Without a limit it runs to the end.
CALL backfill_chat_messages_resumable(batch_size => 10, now => 1760000000);
SELECT state, chats_done, percent_done, messages_inserted, messages_rejected, batches, last_key,
       estimated_time_left, last_error
FROM chat_backfill.status;
SELECT count(*), count(DISTINCT id), min(created_at), max(created_at) FROM chat_message;
SELECT chat_id, message_key, sqlstate FROM chat_backfill.rejected_messages;
-- Finished: a no-op; restart runs it again and finds everything present.
CALL backfill_chat_messages_resumable();
SELECT count(*) FROM chat_backfill.runs;
CALL backfill_chat_messages_resumable(restart => true);
SELECT run_id, state, messages_inserted, messages_existing FROM chat_backfill.status ORDER BY run_id;

DROP TABLE chat_message, chat;
DROP EXTENSION chat_backfill;
