//! Transactions of a non-atomic CALL and of a background worker: both COMMIT between
//! batches and need a snapshot pushed while they run SQL.

use pgrx::prelude::*;

/// COMMITs the current transaction and starts the next, with a fresh snapshot for its SQL.
/// `between` runs in the new transaction before any snapshot is taken: a wait there holds
/// back no vacuum.
pub fn commit_and_begin(between: impl FnOnce()) {
    // SAFETY: called between statements of a non-atomic SPI connection, outside any
    // subtransaction, with the snapshot this module (or the caller's start) pushed as the
    // active one; SPI_commit starts the next transaction.
    unsafe {
        pg_sys::PopActiveSnapshot();
        pg_sys::SPI_commit();
    }
    between();
    // SAFETY: a transaction is open (SPI_commit started it); its SQL needs a snapshot.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
}
