-- What a SQL user sees of the expansion rules: chat_messages() and chat_message_problems().
CREATE EXTENSION chat_backfill;
\pset null '<NULL>'

-- A chat as Open WebUI stores it: rows keyed by history.messages, the top-level list unread.
SELECT id, role, parent_id, content, model_id, done, created_at
FROM chat_messages('c1', 'u1', '{"messages":[{"role":"user"}],
  "history":{"messages":{
    "m1":{"role":"user","content":"Hi","timestamp":1700000000},
    "m2":{"role":"assistant","parentId":"m1","model":"gpt-4o","content":"Hello","timestamp":1700000000500,"done":false}}}}'::json, 1760000000)
ORDER BY id;

-- JSON columns keep their text verbatim; missing keys become the JSON literal null.
SELECT content::text, output::text, usage::text
FROM chat_messages('c1', 'u1', '{"history":{"messages":{"m":{"role":"user","content":[1.10, 123456789012345678901234567890, "a\u0000b"]}}}}'::json, 1760000000);

-- Text columns take Python/psycopg2's rendering of non-strings.
SELECT id, role FROM chat_messages('c1', NULL, '{"history":{"messages":{
  "a":{"role":1},"b":{"role":1.0},"c":{"role":true},"d":{"role":["x","y z"]},"e":{"role":1e20}}}}'::json, 1760000000)
ORDER BY id;

-- Timestamps: milliseconds scaled, strings parsed, implausible ones replaced by now.
SELECT id, created_at FROM chat_messages('c1', NULL, '{"history":{"messages":{
  "a":{"role":"u","timestamp":"1.7e9"},"b":{"role":"u","timestamp":10000000000},
  "c":{"role":"u","timestamp":1577836799},"d":{"role":"u","timestamp":"soon"},"e":{"role":"u"}}}}'::json, 1760000000)
ORDER BY id;

-- Double-encoded chats (a JSON string holding the document) are migrated; text and jsonb too.
SELECT id FROM chat_messages('c1', NULL, to_json('{"history":{"messages":{"m":{"role":"user"}}}}'::text));
SELECT id FROM chat_messages('c1', NULL, '{"history":{"messages":{"m":{"role":"user"}}}}'::text);
SELECT id FROM chat_messages('c1', NULL, '{"history":{"messages":{"m":{"role":"user"}}}}'::jsonb);

-- Empty or unusable chats give no rows and never raise.
SELECT count(*) FROM chat_messages('c1', NULL, NULL::json);
SELECT count(*) FROM chat_messages('c1', NULL, '[1,2]'::json);
SELECT count(*) FROM chat_messages('c1', NULL, 'not json at all'::text);

-- Every message left out, and why.
SELECT * FROM chat_message_problems('c1', '{"history":{"messages":{
  "ok":{"role":"user"}, "s":"a string", "n":{"content":"no role"},
  "o":{"role":{"a":1}}, "z":{"role":"us\u0000er"}, "d":{"role":"user","done":2},
  "k\ud800":{"role":"user"}}}}'::json) ORDER BY 1;
SELECT * FROM chat_message_problems('c1', '"[1]"'::json);
SELECT * FROM chat_message_problems('c1', '{"history":[]}'::json);
DROP EXTENSION chat_backfill;
