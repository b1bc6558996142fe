//! The committing run: `CALL backfill_chat_messages_resumable(...)`. `driver` takes the
//! runner's lock and starts the run; `batches` runs batches over key ranges, a COMMIT after
//! each; `state` keeps the checkpoint in
//! `chat_backfill.runs` in the same transaction as the batch; `ranges` splits a run into key
//! ranges for `workers`, the background workers that run them; `throttle` paces the run by
//! replica lag, WAL rate and pauses.

pub mod batches;
pub mod driver;
pub mod ranges;
pub mod state;
pub mod throttle;
pub mod workers;
