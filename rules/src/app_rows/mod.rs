//! `rows => 'app'`: the rows Open WebUI 0.12.4 itself writes the first time a chat without
//! rows is opened (`Chats.get_messages_map_by_chat_id` -> `backfill_messages_by_chat_id`
//! -> `ChatMessages.upsert_messages` -> `_build_message`, `get_usage`, `normalize_usage`),
//! read path included, on the raw JSON text.
//!
//! How the app gets there, and what each step means here:
//! - it loads the chat through its model: the column is parsed with orjson (falling back
//!   to the standard library, which refuses integer literals longer than 100 characters),
//!   must be a JSON object (a double-encoded chat is a string: no rows), and the chat's
//!   `user_id` must be set; a failure there makes the app return nothing, so no rows;
//! - `sanitize_data_for_db` removes NUL characters and lone surrogates from every string
//!   and key of the document;
//! - `chat.history.messages` must be an object (a non-object history raises; falsy
//!   messages mean none);
//! - the rows go out in one `INSERT ... ON CONFLICT DO NOTHING` through psycopg 3 with
//!   SQLAlchemy's type casts (`::VARCHAR`, `::BIGINT`, `::BOOLEAN`, `::JSON`): a value
//!   either side cannot convert fails the whole chat. So a chat is all or nothing here too.
//!
//! JSON columns keep the message's own text where its value survives the trip unchanged
//! (the app re-serializes, so its text differs but its value does not); strings holding
//! NULs or lone surrogates are rewritten without them, and floats beyond f64's range
//! become `null`, as orjson writes infinities.
//!
//! The jobs, each in its own file and each importing only the ones before it: `message`,
//! `scan`, `json_text`, `current_id`, `python_int`, `columns`, `load`.

mod message;
pub(crate) mod scan;
mod json_text;
mod current_id;
mod python_int;
mod columns;
mod load;
#[cfg(test)]
mod tests;

pub use message::{AppSkip, Codec, truthy};
pub use json_text::{json_value};
pub use columns::{AppEntry, AppMessage, Failure, Server, float8_text, int8_in};
pub use load::{APP_MAX_DEPTH, APP_MAX_DEPTH_STRIPPED, Indexed, Opened, RepairCheck, StreamOpen, StreamOpened, check, entry_at, expand, index, open};
