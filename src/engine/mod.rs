//! The engine: one backfill, whatever calls it. `request` checks the arguments and the
//! tables and settles what a run will do (`Settings`); `backfill` drives it: `read` fetches
//! chats through a portal, the rules (the `chat_backfill_rules` crate) expand each into rows,
//! `batch` holds a batch's rows as columns, `write` writes them (straight into the table
//! through `direct_insert`, or COPY through `copy_feed`, or one array INSERT, halving on
//! failure down to a row), and `rejections` records what could
//! not be written; `streamed` reads a chat from its TOAST table a slice at a time. `verify` compares a target with what the rules expect. `tuning` sizes
//! batches by time; `state_guard` checks the state tables before a transaction writes them.
//! Nothing here commits: the callers above (the SQL functions, the committing run) own the
//! transactions.

pub mod backfill;
pub mod batch;
pub mod copy_feed;
pub mod direct_insert;
pub mod read;
pub mod rejections;
pub mod report;
pub mod request;
pub mod state_guard;
pub mod streamed;
pub mod tuning;
pub mod verify;
pub mod write;
