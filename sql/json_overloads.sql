-- json and jsonb input: their text carries the same document (jsonb's with duplicate
-- keys already merged). A json value is its text: the json overloads are the C functions
-- themselves, so that a json column is passed as stored and a chat still in its TOAST
-- table streams (issue 26; a cast to text would print it whole first). jsonb is printed
-- as text by SQL wrappers, which are inlined, so their bodies are parsed with the
-- caller's search_path: every name is qualified.
CREATE FUNCTION @extschema@.chat_messages(chat_id pg_catalog.text, user_id pg_catalog.text, chat pg_catalog.json,
                                          now pg_catalog.int8 DEFAULT NULL)
RETURNS TABLE (id pg_catalog.text, chat_id pg_catalog.text, user_id pg_catalog.text, role pg_catalog.text, parent_id pg_catalog.text, content pg_catalog.json,
               output pg_catalog.json, model_id pg_catalog.text, files pg_catalog.json, sources pg_catalog.json, embeds pg_catalog.json, done pg_catalog.bool,
               status_history pg_catalog.json, error pg_catalog.json, usage pg_catalog.json, created_at pg_catalog.int8, updated_at pg_catalog.int8)
STABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'chat_messages_text_wrapper';

CREATE FUNCTION @extschema@.chat_message_problems(chat_id pg_catalog.text, chat pg_catalog.json)
RETURNS TABLE (message_key pg_catalog.text, reason pg_catalog.text)
IMMUTABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'chat_message_problems_text_wrapper';

CREATE FUNCTION @extschema@.chat_messages(chat_id pg_catalog.text, user_id pg_catalog.text, chat pg_catalog.jsonb,
                                          now pg_catalog.int8 DEFAULT NULL)
RETURNS TABLE (id pg_catalog.text, chat_id pg_catalog.text, user_id pg_catalog.text, role pg_catalog.text, parent_id pg_catalog.text, content pg_catalog.json,
               output pg_catalog.json, model_id pg_catalog.text, files pg_catalog.json, sources pg_catalog.json, embeds pg_catalog.json, done pg_catalog.bool,
               status_history pg_catalog.json, error pg_catalog.json, usage pg_catalog.json, created_at pg_catalog.int8, updated_at pg_catalog.int8)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT * FROM @extschema@.chat_messages($1, $2, $3::pg_catalog.text, $4) $$;

CREATE FUNCTION @extschema@.chat_message_problems(chat_id pg_catalog.text, chat pg_catalog.jsonb)
RETURNS TABLE (message_key pg_catalog.text, reason pg_catalog.text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT * FROM @extschema@.chat_message_problems($1, $2::pg_catalog.text) $$;
