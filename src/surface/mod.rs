//! The SQL surface: every function and procedure the extension installs, as thin wrappers
//! that turn SQL arguments into a request for the layers below and raise their errors, once.
//! `functions`: `chat_messages`, `chat_message_problems`, `backfill_chat_messages`,
//! `chat_backfill.verify()`; `procedure`: `CALL backfill_chat_messages_resumable(...)`;
//! `plan`: `chat_backfill.plan()`; `state`: the run state's schema, tables and policies
//! (the SQL files under sql/), and the event triggers guarding them.

pub mod functions;
pub mod plan;
pub mod procedure;
pub mod state;
