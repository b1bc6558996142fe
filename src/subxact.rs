//! Running a piece of work in its own subtransaction and getting its error back instead
//! of aborting the whole statement. pgrx 0.18 has no safe wrapper; this is the pattern
//! verified on this project's machines (see PGRX-NOTES).

use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

/// What a failed subtransaction reported.
#[derive(Debug, Clone)]
pub struct Failure {
    pub sqlstate: String,
    pub message: String,
    pub detail: Option<String>,
}

/// Runs `work` in a subtransaction: committed if it returns, rolled back if it raises an
/// ERROR, which comes back as `Err`. Query cancel, statement timeout, shutdown and Rust
/// panics are re-thrown: they must stop the run, never be recorded as a bad row.
pub fn in_subtransaction<R>(work: impl FnOnce() -> R + std::panic::UnwindSafe) -> Result<R, Failure> {
    unsafe {
        let caller_context = pg_sys::CurrentMemoryContext;
        let caller_owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        // Keep results in the caller's memory, not the subtransaction's.
        pg_sys::MemoryContextSwitchTo(caller_context);
        let outcome = PgTryBuilder::new(|| Ok(work()))
            .catch_others(|caught| match caught {
                CaughtError::PostgresError(ref report) | CaughtError::ErrorReport(ref report)
                    if !must_propagate(report.sql_error_code()) =>
                {
                    Err(Failure {
                        sqlstate: crate::error::sqlstate_text(report.sql_error_code()),
                        message: report.message().to_owned(),
                        detail: report.detail().map(str::to_owned),
                    })
                }
                other => other.rethrow(),
            })
            .execute();
        match outcome {
            Ok(_) => pg_sys::ReleaseCurrentSubTransaction(),
            Err(_) => pg_sys::RollbackAndReleaseCurrentSubTransaction(),
        }
        pg_sys::MemoryContextSwitchTo(caller_context);
        pg_sys::CurrentResourceOwner = caller_owner;
        outcome
    }
}

fn must_propagate(code: PgSqlErrorCode) -> bool {
    matches!(
        code,
        PgSqlErrorCode::ERRCODE_QUERY_CANCELED
            | PgSqlErrorCode::ERRCODE_ADMIN_SHUTDOWN
            | PgSqlErrorCode::ERRCODE_CRASH_SHUTDOWN
            | PgSqlErrorCode::ERRCODE_CANNOT_CONNECT_NOW
            | PgSqlErrorCode::ERRCODE_OUT_OF_MEMORY
            | PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE
            | PgSqlErrorCode::ERRCODE_T_R_DEADLOCK_DETECTED
            | PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE
    )
}
