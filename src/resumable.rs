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
use crate::ranges;
use crate::run_state::{self, Start};
use crate::subxact::in_subtransaction_catching;
use crate::throttle::{sleep_interruptibly, Go, Throttle};

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
    max_wal_rate numeric DEFAULT NULL,
    workers integer DEFAULT 1,
    wait_for_workers boolean DEFAULT true,
    batch_time interval DEFAULT NULL,
    "rows" text DEFAULT 'migration')
LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
"#,
    requires = ["state_schema", "runs_state", "parallel_state"]
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
    workers: Option<i32>,
    wait_for_workers: Option<bool>,
    batch_time: Option<Interval>,
    rows: Option<&str>,
    fcinfo: pg_sys::FunctionCallInfo,
) {
    refuse_atomic_call(fcinfo).or_raise();
    crate::read_only::refuse("run the backfill", crate::read_only::WRITES_HINT).or_raise();
    let if_busy = IfBusy::parse(if_busy.unwrap_or("skip")).or_raise();
    let parallel = Parallel::check(workers.unwrap_or(1), wait_for_workers.unwrap_or(true)).or_raise();
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
    let styles = crate::key_text::session_values();
    iso_keys();
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
        batch_time: batch_time.map(|t| t.as_micros()),
        rows: rows.unwrap_or("migration"),
    }
    .check()
    .or_raise();
    crate::relations::check_key_order(&settings.source, &settings.id_column, settings.key_ops.as_ref(), &settings.id_type).or_raise();
    crate::relations::check_source_key(&settings.source, &settings.id_column).or_raise();
    let mut throttle = Throttle::new(max_replica_lag.as_deref(), replica_slot.as_deref(), max_wal_rate).or_raise();
    let throttle_args = ThrottleArgs { max_replica_lag, replica_slot, max_wal_rate: max_wal_rate.map(|(mib, _)| mib) };
    let lock_key = advisory_key(&settings);
    if !take_lock(lock_key, if_busy, &settings).or_raise() {
        finish_call(&styles);
        return;
    }
    throttle.start();
    let limits = Limits {
        max_runtime: max_runtime.map(duration_of),
        pause: pause.map(duration_of).unwrap_or_default(),
        lock_timeout: lock_timeout.map(|i| format!("{}ms", (i.as_micros() / 1000).max(1))),
        throttle,
        throttle_args,
        batch_time: batch_time.map(duration_of),
    };
    PgTryBuilder::new(AssertUnwindSafe(|| run(settings, &limits, restart.unwrap_or(false), &parallel, if_busy).or_raise()))
        .finally(|| unlock(lock_key))
        .execute();
    finish_call(&styles);
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
    fn check(workers: i32, wait: bool) -> Result<Parallel> {
        if !(1..=crate::workers::MAX_WORKERS).contains(&workers) {
            return Err(Error::new(
                ERRCODE_INVALID_PARAMETER_VALUE,
                format!("workers must be between 1 and {}, not {workers}", crate::workers::MAX_WORKERS),
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
    let (run_id, last_key, high_water, partial) = match run_state::start_point(&settings, restart)? {
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
        Start::New => match run_state::new_run(&settings)? {
            Some((run_id, high_water)) => (run_id, None, high_water, None),
            None => {
                notice!("chat_backfill: {} has no chats to backfill", settings.source.name);
                commit();
                return Ok(());
            }
        },
    };
    settings.run_id = run_id;
    run_state::resumed(run_id, &settings)?;
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
    if parallel.workers > 1 && crate::workers::launch(&settings, run_id, limits, deadline, parallel)? {
        return Ok(());
    }
    let ended = work_ranges(&settings, run_id, limits, deadline, &commit, &|| Ok(false), true)?;
    settle(run_id, ended, true)
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
                let failure = if ranges::finish(run_id, range_id)? { run_state::finish(run_id)? } else { None };
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
fn drive(
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
                        run_state::checkpoint(run_id, None, None, &report)?;
                    }
                    None => run_state::checkpoint(run_id, report.last_chat_id.as_deref(), report.partial.as_ref(), &report)?,
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
        // A run that read its last key ends through run_state::finish.
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
        run_state::set_status_if_active(run_id, status, why.as_deref())
    } else {
        run_state::set_status(run_id, status, why.as_deref())
    }
}

/// Records the end in this session, commits, and says what happened.
fn settle(run_id: i64, ended: Ended, split: bool) -> Result<()> {
    let failure = match ended {
        Ended::Finished if !split => run_state::finish(run_id)?,
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
pub(crate) fn commit() {
    // SAFETY: called between batches, outside any subtransaction, with the snapshot this
    // module pushed as the active one.
    unsafe {
        pg_sys::PopActiveSnapshot();
        pg_sys::SPI_commit();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    iso_keys();
    // Each transaction checks the state tables again: their owner may have added code since.
    if let Err(e) = crate::state_guard::check() {
        e.raise();
    }
}

/// Keys are kept as text (the high-water mark, checkpoints, ranges) and cast back in later
/// transactions, other sessions and workers: each transaction prints them alike.
pub(crate) fn iso_keys() {
    crate::key_text::pin_for_transaction();
}

fn finish_call(styles: &[(String, String)]) {
    // The caller's transaction (a DO block's, say) goes on after the CALL: give it back its
    // own settings, which iso_keys changed for the transaction.
    crate::key_text::restore_local(styles);
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

pub(crate) fn duration_of(interval: Interval) -> Duration {
    Duration::from_micros(interval.as_micros().clamp(0, u64::MAX as i128) as u64)
}


extension_sql_file!(
    "../sql/runs.sql",
    name = "runs_state",
    requires = ["state_schema", visibility::chat_visible]
);
