-- json and jsonb input: their text carries the same document (jsonb's with duplicate
-- keys already merged). json to text costs nothing; these SQL wrappers are inlined.
CREATE FUNCTION chat_messages(chat_id text, user_id text, chat json, now bigint DEFAULT NULL)
RETURNS TABLE (id text, chat_id text, user_id text, role text, parent_id text, content json,
               output json, model_id text, files json, sources json, embeds json, done boolean,
               status_history json, error json, usage json, created_at bigint, updated_at bigint)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT * FROM @extschema@.chat_messages($1, $2, $3::text, $4) $$;

CREATE FUNCTION chat_message_problems(chat_id text, chat json)
RETURNS TABLE (message_key text, reason text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT * FROM @extschema@.chat_message_problems($1, $2::text) $$;

-- jsonb input: its text form carries the same document (duplicate keys already merged).
CREATE FUNCTION chat_messages(chat_id text, user_id text, chat jsonb, now bigint DEFAULT NULL)
RETURNS TABLE (id text, chat_id text, user_id text, role text, parent_id text, content json,
               output json, model_id text, files json, sources json, embeds json, done boolean,
               status_history json, error json, usage json, created_at bigint, updated_at bigint)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT * FROM @extschema@.chat_messages($1, $2, $3::text, $4) $$;

CREATE FUNCTION chat_message_problems(chat_id text, chat jsonb)
RETURNS TABLE (message_key text, reason text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT * FROM @extschema@.chat_message_problems($1, $2::text) $$;
