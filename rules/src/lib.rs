//! The rules: one chat document in, its `chat_message` rows out, exactly as Open WebUI
//! 0.12.4 writes them, on the raw JSON text. No PostgreSQL here, and the compiler holds
//! that: this crate does not depend on pgrx, so `cargo test -p chat_backfill_rules` needs
//! no server headers and runs in seconds.
//!
//! - `migration_rows`: migration 8452d01d26d7's rows (`rows => 'migration'`), and the
//!   document scanner both row modes share.
//! - `app_rows`: the rows the app itself writes when it opens a chat (`rows => 'app'`).
//! - `stream_index`: the document scanner's index (`find_messages_and_current`) over a
//!   document fed in pieces, so a huge chat is never held whole.
//! - `scalar`: how one raw JSON value becomes a stored text, boolean or bigint, as Python
//!   and psycopg do it.

pub mod app_rows;
pub mod migration_rows;
pub mod scalar;
pub mod stream_index;
