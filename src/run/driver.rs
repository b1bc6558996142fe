//! The committing form: `CALL backfill_chat_messages_resumable(...)` COMMITs after every
//! batch and checkpoints in `chat_backfill.runs` in the same transaction, so a crash, a
//! `pg_terminate_backend`, a restart or a `max_runtime` stop resumes exactly after the
//! last committed batch. One runner per source/target, held by a session advisory lock.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use pgrx::IntoDatum;
use pgrx::PgSqlErrorCode::*;
use pgrx::prelude::*;

use crate::engine::backfill::Backfill;
use crate::engine::request::Request;
use crate::engine::request::Settings;
use crate::pg::error::{Error, OrRaise, Result};
use crate::run::batches::{commit, drive, iso_keys, record, say, set_lock_timeout, work_ranges, Ended, Limits, Parallel, ThrottleArgs};
use crate::run::ranges;
use crate::run::state::{self, Start};
use crate::run::throttle::Throttle;

/// A CALL's arguments, as the SQL surface hands them over (NULL is None throughout: the
/// settings and defaults are applied here).
pub(crate) struct Call<'a> {
    pub source: Option<pg_sys::Oid>,
    pub target: Option<pg_sys::Oid>,
    pub batch_size: Option<i32>,
    pub now: Option<i64>,
    pub max_runtime: Option<Duration>,
    pub pause: Option<Duration>,
    pub source_filter: Option<&'a str>,
    pub id_column: Option<&'a str>,
    pub user_id_column: Option<&'a str>,
    pub chat_column: Option<&'a str>,
    pub lock_timeout: Option<Duration>,
    pub restart: Option<bool>,
    pub if_busy: Option<&'a str>,
    pub max_replica_lag: Option<&'a str>,
    pub replica_slot: Option<String>,
    /// MiB per second; NaN for a value that is not a number.
    pub max_wal_rate: Option<f64>,
    pub workers: Option<i32>,
    pub wait_for_workers: Option<bool>,
    /// Microseconds, as given (the request refuses a negative one).
    pub batch_time: Option<i128>,
    pub rows: Option<&'a str>,
}

/// Runs a CALL: checks, the runner lock, then the run, batch by batch.
pub(crate) fn call(args: Call<'_>, fcinfo: pg_sys::FunctionCallInfo) -> Result<()> {
    refuse_atomic_call(fcinfo)?;
    crate::pg::read_only::refuse("run the backfill", crate::pg::read_only::WRITES_HINT)?;
    let if_busy = IfBusy::parse(args.if_busy.unwrap_or("skip"))?;
    let parallel = Parallel::check(args.workers.unwrap_or(1), args.wait_for_workers.unwrap_or(true))?;
    // NULL arguments take the chat_backfill.* settings; the GUC's slot only applies where a
    // lag limit does.
    let max_replica_lag = args.max_replica_lag.map(str::to_owned).or_else(crate::pg::gucs::max_replica_lag);
    let replica_slot = match args.replica_slot {
        Some(slot) => Some(slot),
        None => max_replica_lag.as_ref().and_then(|_| crate::pg::gucs::replica_slot()),
    };
    let max_wal_rate = match args.max_wal_rate {
        Some(mib) => Some((mib, "max_wal_rate")),
        None => crate::pg::gucs::max_wal_rate().map(|mib| (mib, "chat_backfill.max_wal_rate")),
    };
    // SAFETY: a non-atomic CALL may connect to SPI non-atomically; it starts without an
    // active snapshot, and each of our transactions holds one while it runs SQL.
    unsafe {
        pg_sys::SPI_connect_ext(pg_sys::SPI_OPT_NONATOMIC as i32);
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let styles = crate::pg::key_text::session_values();
    iso_keys();
    let settings = Request {
        batch_size: args.batch_size,
        now: args.now,
        source_filter: args.source_filter,
        batch_time: args.batch_time,
        ..Request::new(args.source, args.target)
    }
    .columns(args.id_column, args.user_id_column, args.chat_column)
    .rows(args.rows)
    .check()?;
    crate::pg::catalog::check_key_order(&settings.source, &settings.id_column, settings.key_ops.as_ref(), &settings.id_type)?;
    crate::pg::catalog::check_source_key(&settings.source, &settings.id_column)?;
    let mut throttle = Throttle::new(max_replica_lag.as_deref(), replica_slot.as_deref(), max_wal_rate)?;
    let throttle_args = ThrottleArgs { max_replica_lag, replica_slot, max_wal_rate: max_wal_rate.map(|(mib, _)| mib) };
    let lock_key = advisory_key(&settings);
    if !take_lock(lock_key, if_busy, &settings)? {
        finish_call(&styles);
        return Ok(());
    }
    throttle.start();
    let limits = Limits {
        max_runtime: args.max_runtime,
        pause: args.pause.unwrap_or_default(),
        lock_timeout: args.lock_timeout.map(|d| format!("{}ms", d.as_millis().max(1))),
        throttle,
        throttle_args,
        batch_time: args.batch_time.map(|us| Duration::from_micros(us.clamp(0, u64::MAX as i128) as u64)),
    };
    let restart = args.restart.unwrap_or(false);
    // Raised inside, so that the lock is let go on PostgreSQL's errors too.
    PgTryBuilder::new(AssertUnwindSafe(|| run(settings, &limits, restart, &parallel, if_busy).or_raise()))
        .finally(|| unlock(lock_key))
        .execute();
    finish_call(&styles);
    Ok(())
}

/// What to do when another session holds the runner lock.
#[derive(Clone, Copy)]
pub(crate) enum IfBusy {
    Skip,
    Wait,
    Error,
}

impl IfBusy {
    fn parse(value: &str) -> Result<IfBusy> {
        match value {
            "skip" => Ok(IfBusy::Skip),
            "wait" => Ok(IfBusy::Wait),
            "error" => Ok(IfBusy::Error),
            other => Err(Error::new(
                ERRCODE_INVALID_PARAMETER_VALUE,
                format!("if_busy must be 'skip', 'wait' or 'error', not '{other}'"),
                "'skip' returns at once (for pg_cron ticks), 'wait' waits for the other runner, 'error' fails with 55P03.",
            )),
        }
    }
}

/// Takes the runner lock as `if_busy` says; false when the call should do nothing.
fn take_lock(key: i64, if_busy: IfBusy, settings: &Settings) -> Result<bool> {
    if let IfBusy::Wait = if_busy {
        // An ordinary lock wait: cancel, statement_timeout and lock_timeout end it.
        Spi::run_with_args("SELECT pg_catalog.pg_advisory_lock($1::pg_catalog.int8)", &[key.into()])?;
        return Ok(true);
    }
    let locked = Spi::get_one_with_args::<bool>("SELECT pg_catalog.pg_try_advisory_lock($1::pg_catalog.int8)", &[key.into()])?
        .unwrap_or(false);
    match (locked, if_busy) {
        (true, _) => Ok(true),
        (false, IfBusy::Error) => Err(Error::new(
            ERRCODE_LOCK_NOT_AVAILABLE,
            format!("another backfill of {} into {} is running", settings.source.name, settings.target.name),
            "See chat_backfill.status for its progress; CALL again with if_busy => 'wait' to wait for it.",
        )
        .with_detail(format!("The runner lock is the session advisory lock {key}."))),
        _ => {
            notice!(
                "chat_backfill: another backfill of {} into {} is running; this call does nothing (see chat_backfill.status; \
                 if_busy => 'wait' waits for it)",
                settings.source.name,
                settings.target.name
            );
            Ok(false)
        }
    }
}

fn run(mut settings: Settings, limits: &Limits, restart: bool, parallel: &Parallel, if_busy: IfBusy) -> Result<()> {
    // Workers of an earlier CALL (wait_for_workers => false) may still be at it: they hold
    // its key ranges, not the runner lock.
    let holders = ranges::holders(&settings.source.name, &settings.target.name)?;
    if !holders.is_empty() {
        match if_busy {
            IfBusy::Wait => ranges::wait_for_holders(&settings.source.name, &settings.target.name)?,
            IfBusy::Error => {
                return Err(Error::new(
                    ERRCODE_LOCK_NOT_AVAILABLE,
                    format!("workers are still backfilling {} into {}", settings.source.name, settings.target.name),
                    "See chat_backfill.status for their progress; CALL again with if_busy => 'wait' to wait for them.",
                )
                .with_detail(format!("Backends {holders:?} hold key ranges of the run.")))
            }
            IfBusy::Skip => {
                notice!(
                    "chat_backfill: workers (pids {holders:?}) are still backfilling {} into {}; this call does nothing \
                     (see chat_backfill.status; if_busy => 'wait' waits for them)",
                    settings.source.name,
                    settings.target.name
                );
                return Ok(());
            }
        }
    }
    let (run_id, last_key, high_water, partial) = match state::start_point(&settings, restart)? {
        Start::Finished { run_id, finished_at } => {
            notice!(
                "chat_backfill: the backfill of {} into {} is already complete (run {run_id}, finished {finished_at}); \
                 nothing to do. Pass restart => true to run it again from the beginning.",
                settings.source.name,
                settings.target.name
            );
            return Ok(());
        }
        Start::Resume { run_id, last_key, high_water, now, partial } => {
            notice!("chat_backfill: resuming run {run_id} after key {}", last_key.as_deref().unwrap_or("(start)"));
            if let Some(p) = &partial {
                notice!(
                    "chat_backfill: run {run_id} goes on inside chat {} after its first {} messages, if it is unchanged",
                    p.chat_id,
                    p.done
                );
            }
            settings.now = now;
            (run_id, last_key, high_water, partial)
        }
        Start::New => match state::new_run(&settings)? {
            Some((run_id, high_water)) => (run_id, None, high_water, None),
            None => {
                notice!("chat_backfill: {} has no chats to backfill", settings.source.name);
                commit();
                return Ok(());
            }
        },
    };
    settings.run_id = run_id;
    state::resumed(run_id, &settings)?;
    commit();
    let deadline = limits.max_runtime.map(|max| Instant::now() + max);
    let split = ranges::is_split(run_id)?;
    if !split && parallel.workers == 1 {
        // Preparing the INSERT locks the target: do not queue there without a limit either.
        set_lock_timeout(limits)?;
        let mut backfill = Backfill::keyset(settings, last_key, high_water, partial)?;
        let ended = drive(&mut backfill, run_id, None, limits, deadline, &commit, &|| Ok(false))?;
        return settle(run_id, ended, false);
    }
    if !split {
        let n = ranges::split(&settings, run_id, last_key.as_deref(), &high_water, parallel.workers * ranges::PER_WORKER)?;
        commit();
        notice!("chat_backfill: run {run_id} split into {n} key ranges of about equal chat bytes");
    }
    if parallel.workers > 1 && crate::run::workers::launch(&settings, run_id, limits, deadline, parallel)? {
        return Ok(());
    }
    let ended = work_ranges(&settings, run_id, limits, deadline, &commit, &|| Ok(false), true)?;
    settle(run_id, ended, true)
}

/// Records the end in this session, commits, and says what happened.
fn settle(run_id: i64, ended: Ended, split: bool) -> Result<()> {
    let failure = match ended {
        Ended::Finished if !split => state::finish(run_id)?,
        _ => {
            record(run_id, &ended, split)?;
            None
        }
    };
    commit();
    if let Some(error) = failure {
        return Err(error);
    }
    say(run_id, &ended);
    Ok(())
}

/// A CALL inside a transaction block, a function or a procedure with SET is atomic:
/// its COMMIT would fail halfway. Refuse before doing anything.
fn refuse_atomic_call(fcinfo: pg_sys::FunctionCallInfo) -> Result<()> {
    // SAFETY: fcinfo is this call's own; `context` is either null or a Node whose tag
    // says what it is, and only a CallContext is read as one.
    let atomic = unsafe {
        let context = (*fcinfo).context;
        context.is_null()
            || (*context).type_ != pg_sys::NodeTag::T_CallContext
            || (*(context as *mut pg_sys::CallContext)).atomic
    };
    if atomic {
        return Err(Error::new(
            ERRCODE_INVALID_TRANSACTION_TERMINATION,
            "backfill_chat_messages_resumable() cannot commit here",
            "CALL it outside a transaction block (no BEGIN, not from a function). From Alembic, run it inside \
             `with op.get_context().autocommit_block():`. To backfill in one transaction instead, use \
             SELECT * FROM backfill_chat_messages().",
        ));
    }
    Ok(())
}

fn finish_call(styles: &[(String, String)]) {
    // The caller's transaction (a DO block's, say) goes on after the CALL: give it back its
    // own settings, which iso_keys changed for the transaction.
    crate::pg::key_text::restore_local(styles);
    // SAFETY: pops only a snapshot that is set, and ends the SPI connection made at the start.
    unsafe {
        if pg_sys::ActiveSnapshotSet() {
            pg_sys::PopActiveSnapshot();
        }
        pg_sys::SPI_finish();
    }
}

/// One advisory lock per source/target pair: source oid in the high half, target in the
/// low half (pg_locks shows them as classid and objid).
fn advisory_key(settings: &Settings) -> i64 {
    ((u32::from(settings.source.oid) as i64) << 32) | u32::from(settings.target.oid) as i64
}

/// Session advisory locks outlive errors: release it on every way out. The lock manager
/// needs no transaction, so this works in an aborted one too.
fn unlock(key: i64) {
    // SAFETY: calls the built-in with one int8 argument, as SQL would.
    unsafe {
        pgrx::direct_function_call::<bool>(pg_sys::pg_advisory_unlock_int8, &[key.into_datum()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_busy_takes_its_three_words_and_refuses_others() {
        assert!(matches!(IfBusy::parse("skip"), Ok(IfBusy::Skip)));
        assert!(matches!(IfBusy::parse("wait"), Ok(IfBusy::Wait)));
        assert!(matches!(IfBusy::parse("error"), Ok(IfBusy::Error)));
        for other in ["Skip", "", "wait "] {
            let Err(e) = IfBusy::parse(other) else { panic!("{other:?} accepted") };
            assert!(matches!(e.code, ERRCODE_INVALID_PARAMETER_VALUE));
        }
    }
}
