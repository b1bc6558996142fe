//! chat_backfill: moves chats stored as JSON documents into `chat_message` rows inside
//! PostgreSQL.
//!
//! Where things are: `expand` and `scalar` are the Open WebUI rules in plain Rust;
//! `api` is the SQL surface; `backfill` the engine that streams, batches and writes;
//! `relations` checks the tables; `subxact` isolates failures; `datums` moves values.

pub mod expand;
pub mod scalar;

mod api;
mod backfill;
mod datums;
mod engine_settings;
mod error;
mod relations;
mod subxact;

::pgrx::pg_module_magic!();

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
