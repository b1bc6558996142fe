//! The committing form: `CALL backfill_chat_messages_resumable(...)` COMMITs after every
//! batch and checkpoints in `chat_backfill.runs` in the same transaction, so a crash, a
//! `pg_terminate_backend`, a restart or a `max_runtime` stop resumes exactly after the
//! last committed batch. One runner per source/target, held by a session advisory lock.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use core::ffi::CStr;

use pgrx::datum::{AnyNumeric, Interval};
use pgrx::prelude::*;
use pgrx::IntoDatum;
use pgrx::PgSqlErrorCode::*;

use crate::backfill::settings::Request;
use crate::backfill::{Backfill, Settings};
use crate::error::{Error, OrRaise, Result};
use crate::run_state::{self, Start};
use crate::subxact::in_subtransaction_catching;
use crate::throttle::{sleep_interruptibly, Throttle};

#[allow(clippy::too_many_arguments)]
#[pg_extern(
    sql = r#"
CREATE PROCEDURE backfill_chat_messages_resumable(
    source regclass DEFAULT NULL,
    target regclass DEFAULT NULL,
    batch_size integer DEFAULT NULL,
    now bigint DEFAULT NULL,
    max_runtime interval DEFAULT NULL,
    pause interval DEFAULT '0',
    source_filter text DEFAULT $$user_id OPERATOR(pg_catalog.!~~) 'shared-%'::pg_catalog.text$$,
    id_column text DEFAULT 'id',
    user_id_column text DEFAULT 'user_id',
    chat_column text DEFAULT 'chat',
    lock_timeout interval DEFAULT NULL,
    restart boolean DEFAULT false,
    if_busy text DEFAULT 'skip',
    max_replica_lag text DEFAULT NULL,
    replica_slot name DEFAULT NULL,
    max_wal_rate numeric DEFAULT NULL)
LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
"#,
    requires = ["state_schema", "runs_state"]
)]
fn backfill_chat_messages_resumable(
    source: Option<pg_sys::Oid>,
    target: Option<pg_sys::Oid>,
    batch_size: Option<i32>,
    now: Option<i64>,
    max_runtime: Option<Interval>,
    pause: Option<Interval>,
    source_filter: Option<&str>,
    id_column: Option<&str>,
    user_id_column: Option<&str>,
    chat_column: Option<&str>,
    lock_timeout: Option<Interval>,
    restart: Option<bool>,
    if_busy: Option<&str>,
    max_replica_lag: Option<&str>,
    replica_slot: Option<&CStr>,
    max_wal_rate: Option<AnyNumeric>,
    fcinfo: pg_sys::FunctionCallInfo,
) {
    refuse_atomic_call(fcinfo).or_raise();
    let if_busy = IfBusy::parse(if_busy.unwrap_or("skip")).or_raise();
    // NULL arguments take the chat_backfill.* settings; the GUC's slot only applies where a
    // lag limit does.
    let max_replica_lag = max_replica_lag.map(str::to_owned).or_else(crate::gucs::max_replica_lag);
    let replica_slot = match replica_slot {
        Some(slot) => Some(slot.to_string_lossy().into_owned()),
        None => max_replica_lag.as_ref().and_then(|_| crate::gucs::replica_slot()),
    };
    let max_wal_rate = match max_wal_rate {
        Some(n) => Some((n.to_string().parse::<f64>().unwrap_or(f64::NAN), "max_wal_rate")),
        None => crate::gucs::max_wal_rate().map(|mib| (mib, "chat_backfill.max_wal_rate")),
    };
    // SAFETY: a non-atomic CALL may connect to SPI non-atomically; it starts without an
    // active snapshot, and each of our transactions holds one while it runs SQL.
    unsafe {
        pg_sys::SPI_connect_ext(pg_sys::SPI_OPT_NONATOMIC as i32);
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let settings = Request {
        source,
        target,
        batch_size,
        now,
        source_filter,
        id_column: id_column.unwrap_or("id"),
        user_id_column: user_id_column.unwrap_or("user_id"),
        chat_column: chat_column.unwrap_or("chat"),
        dry_run: false,
    }
    .check()
    .or_raise();
    crate::relations::check_source_key(&settings.source, &settings.id_column).or_raise();
    let mut throttle = Throttle::new(max_replica_lag.as_deref(), replica_slot.as_deref(), max_wal_rate).or_raise();
    let lock_key = advisory_key(&settings);
    if !take_lock(lock_key, if_busy, &settings).or_raise() {
        finish_call();
        return;
    }
    throttle.start();
    let limits = Limits {
        max_runtime: max_runtime.map(duration_of),
        pause: pause.map(duration_of).unwrap_or_default(),
        lock_timeout: lock_timeout.map(|i| format!("{}ms", (i.as_micros() / 1000).max(1))),
        throttle,
    };
    PgTryBuilder::new(AssertUnwindSafe(|| run(settings, &limits, restart.unwrap_or(false)).or_raise()))
        .finally(|| unlock(lock_key))
        .execute();
    finish_call();
}

/// What to do when another session holds the runner lock.
#[derive(Clone, Copy)]
enum IfBusy {
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

struct Limits {
    max_runtime: Option<Duration>,
    pause: Duration,
    lock_timeout: Option<String>,
    throttle: Throttle,
}

fn run(mut settings: Settings, limits: &Limits, restart: bool) -> Result<()> {
    let (run_id, last_key, high_water) = match run_state::start_point(&settings, restart)? {
        Start::Finished { run_id, finished_at } => {
            notice!(
                "chat_backfill: the backfill of {} into {} is already complete (run {run_id}, finished {finished_at}); \
                 nothing to do. Pass restart => true to run it again from the beginning.",
                settings.source.name,
                settings.target.name
            );
            return Ok(());
        }
        Start::Resume { run_id, last_key, high_water, now } => {
            notice!("chat_backfill: resuming run {run_id} after key {}", last_key.as_deref().unwrap_or("(start)"));
            settings.now = now;
            (run_id, last_key, high_water)
        }
        Start::New => match run_state::new_run(&settings)? {
            Some((run_id, high_water)) => (run_id, None, high_water),
            None => {
                notice!("chat_backfill: {} has no chats to backfill", settings.source.name);
                commit();
                return Ok(());
            }
        },
    };
    settings.run_id = run_id;
    run_state::resumed(run_id)?;
    commit();
    let began = Instant::now();
    // Preparing the INSERT locks the target: do not queue there without a limit either.
    set_lock_timeout(limits)?;
    let mut backfill = Backfill::keyset(settings, last_key, high_water)?;
    loop {
        pgrx::check_for_interrupts!();
        // Replica lag and WAL rate are looked at before every batch, the first included;
        // max_runtime ends a wait too.
        let deadline = limits.max_runtime.map(|max| began + max);
        if !limits.throttle.before_batch(run_id, &commit, deadline)? {
            run_state::set_status(run_id, "stopped", Some("max_runtime reached while throttled; the next CALL resumes here"))?;
            commit();
            notice!("chat_backfill: max_runtime reached while throttled; run {run_id} stopped, CALL again to resume");
            return Ok(());
        }
        set_lock_timeout(limits)?;
        // The batch and its checkpoint commit together; a lock timeout rolls both back.
        let outcome = in_subtransaction_catching(
            AssertUnwindSafe(|| -> Result<Option<BatchDone>> {
                let Some(report) = backfill.next_batch()? else { return Ok(None) };
                run_state::checkpoint(run_id, report.last_chat_id.as_deref(), &report)?;
                Ok(Some(BatchDone))
            }),
            |sqlstate| sqlstate == "55P03",
        );
        match outcome {
            Ok(Ok(Some(BatchDone))) => commit(),
            Ok(Ok(None)) => {
                run_state::set_status(run_id, "finished", None)?;
                commit();
                return Ok(());
            }
            Ok(Err(e)) => return Err(e),
            Err(failure) => {
                run_state::set_status(run_id, "yielded", Some(&format!("lock_timeout: {}", failure.message)))?;
                commit();
                notice!(
                    "chat_backfill: a batch waited longer than lock_timeout ({}); run {run_id} yields to the \
                     application and resumes at the next CALL",
                    failure.message
                );
                return Ok(());
            }
        }
        // Checked after a batch, so every CALL makes progress however small max_runtime is.
        if limits.max_runtime.is_some_and(|max| began.elapsed() >= max) {
            run_state::set_status(run_id, "stopped", Some("max_runtime reached; the next CALL resumes here"))?;
            commit();
            notice!("chat_backfill: max_runtime reached; run {run_id} stopped after a committed batch, CALL again to resume");
            return Ok(());
        }
        if !limits.pause.is_zero() {
            sleep_interruptibly(limits.pause);
        }
    }
}

/// A batch was written and checkpointed.
struct BatchDone;

/// `SET LOCAL lock_timeout` for the current transaction, when the caller asked for one.
fn set_lock_timeout(limits: &Limits) -> Result<()> {
    if let Some(timeout) = &limits.lock_timeout {
        Spi::run_with_args(
            "SELECT pg_catalog.set_config('lock_timeout'::pg_catalog.text, $1::pg_catalog.text, true)",
            &[timeout.as_str().into()],
        )?;
    }
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

/// COMMIT and start the next transaction, with a fresh snapshot for its SQL.
fn commit() {
    // SAFETY: called between batches, outside any subtransaction, with the snapshot this
    // module pushed as the active one.
    unsafe {
        pg_sys::PopActiveSnapshot();
        pg_sys::SPI_commit();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
}

fn finish_call() {
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

fn duration_of(interval: Interval) -> Duration {
    Duration::from_micros(interval.as_micros().clamp(0, u64::MAX as i128) as u64)
}


extension_sql_file!("../sql/runs.sql", name = "runs_state", requires = ["state_schema"]);
