//! Before a run: `estimate` measures a sample of the source through a rolled-back trial
//! run and extrapolates; `plan` turns estimates and catalog checks into
//! `chat_backfill.plan()`'s findings; `admission` refuses a one-transaction run whose
//! estimated WAL is over `chat_backfill.max_atomic_wal`.

pub mod admission;
pub mod calibration;
pub mod estimate;
pub mod plan;
