//! The PostgreSQL glue everything else stands on, and nothing here imports from the layers
//! above: the error type raised once at the SQL boundary (`error`), the settings and every
//! bound (`gucs`), values in and out of datums (`datums`), subtransactions (`subxact`),
//! COMMIT between batches (`transaction`), catalog lookups and the checks of the tables
//! (`catalog`), statements that work on a standby (`read_only`), keys as text under pinned
//! settings (`key_text`), what a role may see of a source (`visibility`), WAL position
//! (`wal`) and what differs between PostgreSQL majors (`version`).

pub mod catalog;
pub mod datums;
pub mod error;
pub mod gucs;
pub mod key_text;
pub mod read_only;
pub mod subxact;
pub mod toast_read;
pub mod transaction;
pub mod version;
pub mod visibility;
pub mod wal;
