//! This backend's WAL: what the throttle paces by and what the estimate measures.

use pgrx::prelude::*;

/// Bytes of WAL this backend has written since it started.
pub fn wal_written() -> u64 {
    // SAFETY: pgWalUsage is this backend's own counter, only ever touched by this thread.
    unsafe { pg_sys::pgWalUsage.wal_bytes as u64 }
}
