//! Running a piece of work in its own subtransaction and getting its error back instead
//! of aborting the whole statement. pgrx 0.18 has no safe wrapper; this is PL/pgSQL's own
//! pattern for an EXCEPTION block (BeginInternalSubTransaction, then on error
//! RollbackAndReleaseCurrentSubTransaction with the memory context and resource owner put
//! back), which the `#[pg_test]`s and every client test that isolates a bad row exercise.

use std::cell::Cell;
use std::ffi::c_void;

use pgrx::pg_sys::panic::{CaughtError, ErrorReport};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode::ERRCODE_INTERNAL_ERROR;

use crate::pg::error::{packed_sqlstate_text, sqlstate_text};

/// What a failed subtransaction reported.
#[derive(Debug, Clone)]
pub struct Failure {
    pub sqlstate: String,
    pub message: String,
    pub detail: Option<String>,
}

/// Runs `work` in a subtransaction: committed if it returns, rolled back if it raises an
/// ERROR, which comes back as `Err` when it is about the data. Anything else (query
/// cancel, statement timeout, shutdown, permissions, Rust panics) is re-thrown once the
/// subtransaction is rolled back: it must stop the run, never be recorded as a bad row,
/// and must leave the session usable for the next statement.
pub fn in_subtransaction<R>(work: impl FnOnce() -> R + std::panic::UnwindSafe) -> Result<R, Failure> {
    in_subtransaction_catching(work, is_data_error)
}

/// The same, returning as `Err` the errors whose SQLSTATE `is_caught` accepts.
pub fn in_subtransaction_catching<R>(
    work: impl FnOnce() -> R + std::panic::UnwindSafe,
    is_caught: fn(&str) -> bool,
) -> Result<R, Failure> {
    run_in_subtransaction(work, true).or_else(|(caught, raised)| match caught {
        CaughtError::PostgresError(ref report) | CaughtError::ErrorReport(ref report) => {
            let sqlstate = match (&caught, raised) {
                // pgrx turns a code its enum lacks (a trigger's `RAISE ... USING ERRCODE =
                // 'P0999'`) into XX000; PostgreSQL's own code was seen as it was raised.
                (CaughtError::PostgresError(_), Some(packed)) if matches!(report.sql_error_code(), ERRCODE_INTERNAL_ERROR) => {
                    packed_sqlstate_text(packed)
                }
                _ => sqlstate_text(report.sql_error_code()),
            };
            if is_caught(&sqlstate) {
                return Err(Failure {
                    sqlstate,
                    message: report.message().to_owned(),
                    detail: report.detail().map(str::to_owned),
                });
            }
            if sqlstate == sqlstate_text(report.sql_error_code()) {
                caught.rethrow()
            }
            // Stops the run as raised, but pgrx can only raise the codes its enum has: the
            // real one goes into the detail rather than be lost.
            let detail = format!("raised with SQLSTATE {sqlstate}{}", report.detail().map(|d| format!("; {d}")).unwrap_or_default());
            let mut again = ErrorReport::new(ERRCODE_INTERNAL_ERROR, report.message().to_owned(), "chat_backfill").set_detail(detail);
            if let Some(hint) = report.hint() {
                again = again.set_hint(hint);
            }
            again.report(PgLogLevel::ERROR);
            unreachable!("an ERROR report returns no more")
        }
        other => other.rethrow(),
    })
}

/// Runs `work` in a subtransaction that is always rolled back: a trial whose writes must
/// not stay. An ERROR inside is re-thrown once the subtransaction is gone.
pub fn in_rolled_back_subtransaction<R>(work: impl FnOnce() -> R + std::panic::UnwindSafe) -> R {
    run_in_subtransaction(work, false).unwrap_or_else(|(caught, _)| caught.rethrow())
}

/// Runs `work` in a subtransaction, released if `keep` and the work returned, rolled back
/// otherwise; what the work raised comes back once the subtransaction is gone, with the
/// SQLSTATE PostgreSQL last reported inside it, packed (`None`: it reported nothing).
fn run_in_subtransaction<R>(
    work: impl FnOnce() -> R + std::panic::UnwindSafe,
    keep: bool,
) -> Result<R, (CaughtError, Option<i32>)> {
    let raised = Cell::new(None);
    // SAFETY: the subtransaction is begun and ended here on every path, and the caller's
    // memory context and resource owner are restored either way, as PostgreSQL's PL
    // handlers do. The callback pushed on error_context_stack points at `raised`, which
    // outlives it: it is popped on every path before this frame returns.
    unsafe {
        let caller_context = pg_sys::CurrentMemoryContext;
        let caller_owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        // Keep results in the caller's memory, not the subtransaction's.
        pg_sys::MemoryContextSwitchTo(caller_context);
        let previous = pg_sys::error_context_stack;
        let mut callback = pg_sys::ErrorContextCallback {
            previous,
            callback: Some(remember_sqlstate),
            arg: std::ptr::from_ref(&raised).cast_mut().cast::<c_void>(),
        };
        pg_sys::error_context_stack = &mut callback;
        let outcome = PgTryBuilder::new(|| Ok(work())).catch_others(Err).execute();
        pg_sys::error_context_stack = previous;
        let outcome = outcome.map_err(|caught| (caught, raised.get()));
        if keep && outcome.is_ok() {
            pg_sys::ReleaseCurrentSubTransaction();
        } else {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        pg_sys::MemoryContextSwitchTo(caller_context);
        pg_sys::CurrentResourceOwner = caller_owner;
        outcome
    }
}

/// Called by PostgreSQL for every report raised while the work runs (errfinish calls the
/// context callbacks before an ERROR leaves for its handler), with the report still on
/// its error stack: keeps its SQLSTATE as PostgreSQL packed it.
#[pg_guard]
unsafe extern "C-unwind" fn remember_sqlstate(arg: *mut c_void) {
    // SAFETY: `arg` is the Cell of the run_in_subtransaction frame that pushed this callback
    // and pops it before returning; geterrcode reads the report being raised.
    unsafe { (*arg.cast::<Cell<Option<i32>>>()).set(Some(pg_sys::geterrcode())) }
}

/// Only errors about the data belong to a row: invalid values (class 22), constraint
/// violations (23), a trigger's RAISE (P0), WITH CHECK OPTION (44), and a value too big
/// or too deep for PostgreSQL (54: an index row too large, stack depth), which one row can
/// cause and which would otherwise stop every run at the same batch forever. Everything
/// else (cancel, timeout, shutdown, permissions, lock timeouts, deadlocks, disk full and
/// out of memory, class 53) is about the run, not the row: it must stop the run.
fn is_data_error(sqlstate: &str) -> bool {
    matches!(sqlstate.get(..2), Some("22" | "23" | "P0" | "44" | "54"))
}
