//! The batch loop that the CALL and every background worker run over their key ranges:
//! a transaction per batch, the checkpoint written in it, the COMMIT after it, and the
//! limits (max_runtime, pause, lock_timeout, the throttle) between batches.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use pgrx::PgSqlErrorCode::*;
use pgrx::prelude::*;

use crate::engine::backfill::Backfill;
use crate::engine::request::Settings;
use crate::pg::error::{Error, Result};
use crate::pg::subxact::in_subtransaction_catching;
use crate::run::ranges;
use crate::run::state::{self};
use crate::run::throttle::{sleep_interruptibly, Go, Throttle};

/// The throttle's arguments as given, for workers to build their own.
#[derive(Clone, Default)]
pub(crate) struct ThrottleArgs {
    pub max_replica_lag: Option<String>,
    pub replica_slot: Option<String>,
    /// MiB per second for the whole run.
    pub max_wal_rate: Option<f64>,
}

pub(crate) struct Limits {
    pub max_runtime: Option<Duration>,
    pub pause: Duration,
    pub lock_timeout: Option<String>,
    pub throttle: Throttle,
    pub throttle_args: ThrottleArgs,
    /// For workers to tune their own batches.
    pub batch_time: Option<Duration>,
}

/// How many background workers to run the CALL with.
pub(crate) struct Parallel {
    pub workers: usize,
    pub wait: bool,
}

impl Parallel {
    pub(crate) fn check(workers: i32, wait: bool) -> Result<Parallel> {
        if !(1..=crate::pg::gucs::MAX_WORKERS_BOUND).contains(&workers) {
            return Err(Error::new(
                ERRCODE_INVALID_PARAMETER_VALUE,
                format!("workers must be between 1 and {}, not {workers}", crate::pg::gucs::MAX_WORKERS_BOUND),
                "1 runs the backfill in this session; more start that many background workers (within \
                 chat_backfill.max_workers and the server's free worker slots).",
            ));
        }
        Ok(Parallel { workers: workers as usize, wait })
    }
}

/// How a stretch of batches ended.
pub(crate) enum Ended {
    /// Its keys are exhausted.
    Finished,
    /// max_runtime was reached (while throttled, or after a batch).
    /// `idle`: before this stretch wrote any batch (the throttle held it the whole time).
    OutOfTime { throttled: bool, idle: bool },
    /// A batch waited longer than lock_timeout and was rolled back.
    Yielded(String),
    /// Told to stop by the run (another worker failed or stopped, or the CALL is gone).
    Halted,
}

/// Works unfinished ranges of a split run, one at a time, until none is left to claim.
/// `release_on_error`: a CALL gives a range back on an error (its session goes on); a worker
/// keeps it until it has recorded the error and exits, so that a range nobody holds in a
/// running run always means a worker died.
pub(crate) fn work_ranges(
    settings: &Settings,
    run_id: i64,
    limits: &Limits,
    deadline: Option<Instant>,
    commit: &dyn Fn(),
    halted: &dyn Fn() -> Result<bool>,
    release_on_error: bool,
) -> Result<Ended> {
    // A size tuned by batch_time carries over to the next range.
    let mut batch_size = settings.batch_size;
    loop {
        if halted()? {
            return Ok(Ended::Halted);
        }
        let Some(range) = ranges::claim(run_id)? else {
            let strangers = ranges::strangers(run_id)?;
            if strangers.is_empty() {
                return Ok(Ended::Finished);
            }
            return Err(Error::new(
                ERRCODE_LOCK_NOT_AVAILABLE,
                format!("key ranges of run {run_id} are locked by backends {strangers:?}, which are not chat_backfill workers"),
                "A session took the advisory lock (1667329894, range_id) of a range, so nobody can work it. End those \
                 sessions (pg_terminate_backend) and CALL again: the run resumes where it stopped.",
            ));
        };
        let range_id = range.range_id;
        // The lock is the session's: give it back when the range is done with, and on an
        // error when this session goes on (see release_on_error).
        let ended = PgTryBuilder::new(AssertUnwindSafe(|| -> Result<Ended> {
            set_lock_timeout(limits)?;
            let mut backfill =
                Backfill::keyset(Settings { batch_size, ..settings.clone() }, range.after, range.high_key, range.partial)?;
            let ended = drive(&mut backfill, run_id, Some(range_id), limits, deadline, commit, halted);
            batch_size = backfill.batch_size();
            let ended = ended?;
            if let Ended::Finished = ended {
                let failure = if ranges::finish(run_id, range_id)? { state::finish(run_id)? } else { None };
                commit();
                if let Some(error) = failure {
                    return Err(error);
                }
                return Ok(Ended::Finished);
            }
            // The run's state is recorded (and committed) before the range is free, so a
            // range nobody holds in a running run always means its worker died.
            record(run_id, &ended, true)?;
            commit();
            Ok(ended)
        }))
        .catch_others(|caught| {
            if release_on_error {
                ranges::release(range_id);
            }
            caught.rethrow()
        })
        .execute();
        if ended.is_ok() || release_on_error {
            ranges::release(range_id);
        }
        let ended = ended?;
        if !matches!(ended, Ended::Finished) {
            return Ok(ended);
        }
    }
}

/// Runs batches until the keys are exhausted or something ends the stretch. Each batch and
/// its checkpoint commit together; a lock timeout rolls both back.
pub(crate) fn drive(
    backfill: &mut Backfill,
    run_id: i64,
    range_id: Option<i32>,
    limits: &Limits,
    deadline: Option<Instant>,
    commit: &dyn Fn(),
    halted: &dyn Fn() -> Result<bool>,
) -> Result<Ended> {
    let mut batches = 0;
    loop {
        pgrx::check_for_interrupts!();
        if halted()? {
            return Ok(Ended::Halted);
        }
        // Replica lag and WAL rate are looked at before every batch, the first included;
        // max_runtime ends a wait too.
        match limits.throttle.before_batch(run_id, commit, deadline, halted)? {
            Go::Ahead => {}
            Go::OutOfTime => return Ok(Ended::OutOfTime { throttled: true, idle: batches == 0 }),
            Go::Halted => return Ok(Ended::Halted),
        }
        set_lock_timeout(limits)?;
        let outcome = in_subtransaction_catching(
            AssertUnwindSafe(|| -> Result<Option<BatchDone>> {
                let Some(report) = backfill.next_batch()? else { return Ok(None) };
                match range_id {
                    Some(range_id) => {
                        ranges::checkpoint(range_id, report.last_chat_id.as_deref(), report.partial.as_ref())?;
                        state::checkpoint(run_id, None, None, &report)?;
                    }
                    None => state::checkpoint(run_id, report.last_chat_id.as_deref(), report.partial.as_ref(), &report)?,
                }
                Ok(Some(BatchDone))
            }),
            |sqlstate| sqlstate == "55P03",
        );
        match outcome {
            Ok(Ok(Some(BatchDone))) => {
                commit();
                batches += 1;
            }
            Ok(Ok(None)) => return Ok(Ended::Finished),
            Ok(Err(e)) => return Err(e),
            Err(failure) => return Ok(Ended::Yielded(failure.message)),
        }
        // A batch that read the last key ends the run now, not at the next CALL.
        if backfill.is_done() {
            return Ok(Ended::Finished);
        }
        // Checked after a batch, so every CALL makes progress however small max_runtime is.
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(Ended::OutOfTime { throttled: false, idle: false });
        }
        if !limits.pause.is_zero() {
            sleep_interruptibly(limits.pause);
        }
    }
}

/// Records how the run's stretch ended, without committing. A split run's status changes
/// only while it is active: the first worker to fail or stop sets it, and it halts the rest.
pub(crate) fn record(run_id: i64, ended: &Ended, split: bool) -> Result<()> {
    let (status, why) = match ended {
        // A run that read its last key ends through state::finish.
        Ended::Finished => return Ok(()),
        Ended::OutOfTime { throttled: true, idle: true } => (
            "stopped",
            Some("no progress: max_runtime reached while throttled, before any batch; the next CALL resumes here".to_owned()),
        ),
        Ended::OutOfTime { throttled: true, idle: false } => {
            ("stopped", Some("max_runtime reached while throttled; the next CALL resumes here".to_owned()))
        }
        Ended::OutOfTime { throttled: false, .. } => ("stopped", Some("max_runtime reached; the next CALL resumes here".to_owned())),
        Ended::Yielded(message) => ("yielded", Some(format!("lock_timeout: {message}"))),
        Ended::Halted => return Ok(()),
    };
    if split {
        state::set_status_if_active(run_id, status, why.as_deref())
    } else {
        state::set_status(run_id, status, why.as_deref())
    }
}

pub(crate) fn say(run_id: i64, ended: &Ended) {
    match ended {
        Ended::Finished | Ended::Halted => {}
        Ended::OutOfTime { throttled: true, idle: true } => notice!(
            "chat_backfill: no progress: max_runtime reached while throttled before any batch was written; run {run_id} \
             stopped where it was (see chat_backfill.status for the replica lag), CALL again to resume"
        ),
        Ended::OutOfTime { throttled: true, idle: false } => {
            notice!("chat_backfill: max_runtime reached while throttled; run {run_id} stopped, CALL again to resume")
        }
        Ended::OutOfTime { throttled: false, .. } => {
            notice!("chat_backfill: max_runtime reached; run {run_id} stopped after a committed batch, CALL again to resume")
        }
        Ended::Yielded(message) => notice!(
            "chat_backfill: a batch waited longer than lock_timeout ({message}); run {run_id} yields to the \
             application and resumes at the next CALL"
        ),
    }
}

/// A batch was written and checkpointed.
struct BatchDone;

/// `SET LOCAL lock_timeout` for the current transaction, when the caller asked for one.
pub(crate) fn set_lock_timeout(limits: &Limits) -> Result<()> {
    if let Some(timeout) = &limits.lock_timeout {
        Spi::run_with_args(
            "SELECT pg_catalog.set_config('lock_timeout'::pg_catalog.text, $1::pg_catalog.text, true)",
            &[timeout.as_str().into()],
        )?;
    }
    Ok(())
}

/// COMMIT and start the next transaction, with a fresh snapshot for its SQL.
pub(crate) fn commit() {
    crate::pg::transaction::commit_and_begin(|| {});
    iso_keys();
    // Each transaction checks the state tables again: their owner may have added code since.
    if let Err(e) = crate::engine::state_guard::check() {
        e.raise();
    }
}

/// Keys are kept as text (the high-water mark, checkpoints, ranges) and cast back in later
/// transactions, other sessions and workers: each transaction prints them alike.
pub(crate) fn iso_keys() {
    crate::pg::key_text::pin_for_transaction();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_are_between_one_and_the_bound() {
        assert!(Parallel::check(0, true).is_err());
        assert!(Parallel::check(crate::pg::gucs::MAX_WORKERS_BOUND + 1, true).is_err());
        let p = Parallel::check(crate::pg::gucs::MAX_WORKERS_BOUND, false).unwrap();
        assert_eq!((p.workers, p.wait), (crate::pg::gucs::MAX_WORKERS_BOUND as usize, false));
    }
}
