//! The committing form: `CALL backfill_chat_messages_resumable(...)` COMMITs after every
//! batch and checkpoints in `chat_backfill.runs` in the same transaction, so a crash, a
//! `pg_terminate_backend`, a restart or a `max_runtime` stop resumes exactly after the
//! last committed batch. One runner per source/target, held by a session advisory lock.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use pgrx::datum::{DatumWithOid, Interval};
use pgrx::prelude::*;
use pgrx::IntoDatum;
use pgrx::PgSqlErrorCode::*;

use crate::backfill::{source_where, Backfill, BatchReport, Settings};
use crate::engine_settings;
use crate::error::UsageError;
use crate::subxact::in_subtransaction_catching;

/// Where a CALL starts from.
enum Start {
    New,
    Resume { run_id: i64, last_key: Option<String>, high_water: String, now: i64 },
    Finished { run_id: i64, finished_at: String },
}

#[allow(clippy::too_many_arguments)]
#[pg_extern(
    sql = r#"
CREATE PROCEDURE backfill_chat_messages_resumable(
    source regclass DEFAULT NULL,
    target regclass DEFAULT NULL,
    batch_size integer DEFAULT 5000,
    now bigint DEFAULT NULL,
    max_runtime interval DEFAULT NULL,
    pause interval DEFAULT '0',
    source_filter text DEFAULT $$user_id NOT LIKE 'shared-%'$$,
    id_column text DEFAULT 'id',
    user_id_column text DEFAULT 'user_id',
    chat_column text DEFAULT 'chat',
    lock_timeout interval DEFAULT NULL,
    restart boolean DEFAULT false)
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
    fcinfo: pg_sys::FunctionCallInfo,
) {
    refuse_atomic_call(fcinfo);
    unsafe {
        pg_sys::SPI_connect_ext(pg_sys::SPI_OPT_NONATOMIC as i32);
        // A non-atomic CALL starts without an active snapshot; each of our transactions
        // holds one while it runs SQL.
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let settings = engine_settings::build(
        source,
        target,
        batch_size.unwrap_or(5000),
        now,
        source_filter,
        id_column.unwrap_or("id"),
        user_id_column.unwrap_or("user_id"),
        chat_column.unwrap_or("chat"),
        false,
    );
    let lock_key = advisory_key(&settings);
    let locked = Spi::get_one_with_args::<bool>("SELECT pg_try_advisory_lock($1)", &[lock_key.into()])
        .ok()
        .flatten()
        .unwrap_or(false);
    if !locked {
        notice!(
            "chat_backfill: another backfill of {} into {} is running; this call does nothing (see chat_backfill.status)",
            settings.source.name,
            settings.target.name
        );
        finish_call();
        return;
    }
    let limits = Limits {
        max_runtime: max_runtime.map(duration_of),
        pause: pause.map(duration_of).unwrap_or_default(),
        lock_timeout: lock_timeout.map(|i| format!("{}ms", (i.as_micros() / 1000).max(1))),
    };
    PgTryBuilder::new(AssertUnwindSafe(|| run(settings, &limits, restart.unwrap_or(false))))
        .finally(|| unlock(lock_key))
        .execute();
    finish_call();
}

struct Limits {
    max_runtime: Option<Duration>,
    pause: Duration,
    lock_timeout: Option<String>,
}

fn run(mut settings: Settings, limits: &Limits, restart: bool) {
    let (run_id, last_key, high_water) = match start_point(&settings, restart) {
        Start::Finished { run_id, finished_at } => {
            notice!(
                "chat_backfill: the backfill of {} into {} is already complete (run {run_id}, finished {finished_at}); \
                 nothing to do. Pass restart => true to run it again from the beginning.",
                settings.source.name,
                settings.target.name
            );
            return;
        }
        Start::Resume { run_id, last_key, high_water, now } => {
            notice!(
                "chat_backfill: resuming run {run_id} after key {}",
                last_key.as_deref().unwrap_or("(start)")
            );
            settings.now = now;
            (run_id, last_key, high_water)
        }
        Start::New => match new_run(&settings) {
            Some(started) => started,
            None => {
                notice!("chat_backfill: {} has no chats to backfill", settings.source.name);
                commit();
                return;
            }
        },
    };
    settings.run_id = run_id;
    Spi::run_with_args("SELECT chat_backfill.run_resumed($1)", &[run_id.into()]).expect("marking the run as running");
    commit();
    let began = Instant::now();
    // Preparing the INSERT locks the target: do not queue there without a limit either.
    set_lock_timeout(limits);
    let mut backfill = Backfill::keyset(settings, last_key, high_water);
    loop {
        pgrx::check_for_interrupts!();
        set_lock_timeout(limits);
        // The batch and its checkpoint commit together; a lock timeout rolls both back.
        let outcome = in_subtransaction_catching(
            AssertUnwindSafe(|| {
                let report = backfill.next_batch();
                if let Some(r) = &report {
                    checkpoint(run_id, backfill.last_key(), r);
                }
                report
            }),
            |sqlstate| sqlstate == "55P03",
        );
        match outcome {
            Ok(Some(_)) => commit(),
            Ok(None) => {
                Spi::run_with_args("SELECT chat_backfill.run_finished($1)", &[run_id.into()]).expect("finishing the run");
                commit();
                return;
            }
            Err(failure) => {
                set_status(run_id, "yielded", Some(&format!("lock_timeout: {}", failure.message)));
                commit();
                notice!(
                    "chat_backfill: a batch waited longer than lock_timeout ({}); run {run_id} yields to the \
                     application and resumes at the next CALL",
                    failure.message
                );
                return;
            }
        }
        // Checked after a batch, so every CALL makes progress however small max_runtime is.
        if limits.max_runtime.is_some_and(|max| began.elapsed() >= max) {
            set_status(run_id, "stopped", Some("max_runtime reached; the next CALL resumes here"));
            commit();
            notice!("chat_backfill: max_runtime reached; run {run_id} stopped after a committed batch, CALL again to resume");
            return;
        }
        if !limits.pause.is_zero() {
            sleep_interruptibly(limits.pause);
        }
    }
}

/// `SET LOCAL lock_timeout` for the current transaction, when the caller asked for one.
fn set_lock_timeout(limits: &Limits) {
    if let Some(timeout) = &limits.lock_timeout {
        Spi::run_with_args("SELECT set_config('lock_timeout', $1, true)", &[timeout.as_str().into()])
            .expect("setting lock_timeout");
    }
}

/// A CALL inside a transaction block, a function or a procedure with SET is atomic:
/// its COMMIT would fail halfway. Refuse before doing anything.
fn refuse_atomic_call(fcinfo: pg_sys::FunctionCallInfo) {
    let atomic = unsafe {
        let context = (*fcinfo).context;
        context.is_null()
            || (*context).type_ != pg_sys::NodeTag::T_CallContext
            || (*(context as *mut pg_sys::CallContext)).atomic
    };
    if atomic {
        UsageError::new(
            ERRCODE_INVALID_TRANSACTION_TERMINATION,
            "backfill_chat_messages_resumable() cannot commit here",
            "CALL it outside a transaction block (no BEGIN, not from a function). From Alembic, run it inside \
             `with op.get_context().autocommit_block():`. To backfill in one transaction instead, use \
             SELECT * FROM backfill_chat_messages().",
        )
        .raise();
    }
}

fn start_point(settings: &Settings, restart: bool) -> Start {
    let latest = Spi::get_three_with_args::<i64, String, String>(
        "SELECT run_id, status, coalesce(finished_at::text, '') FROM chat_backfill.runs \
         WHERE source_oid = $1 AND target_oid = $2 ORDER BY run_id DESC LIMIT 1",
        &[settings.source.oid.into(), settings.target.oid.into()],
    );
    let Ok((Some(run_id), Some(status), Some(finished_at))) = latest else { return Start::New };
    if restart {
        return Start::New;
    }
    if status == "finished" {
        return Start::Finished { run_id, finished_at };
    }
    let (last_key, high_water, now) = Spi::get_three_with_args::<String, String, i64>(
        "SELECT last_key, high_water, now FROM chat_backfill.runs WHERE run_id = $1",
        &[run_id.into()],
    )
    .expect("reading the run to resume");
    Start::Resume { run_id, last_key, high_water: high_water.expect("high_water"), now: now.expect("now") }
}

/// Captures the high-water mark and the size of the job; `None` when there is nothing.
fn new_run(settings: &Settings) -> Option<(i64, Option<String>, String)> {
    let key = pgrx::spi::quote_identifier(&settings.id_column);
    let filter = source_where(settings, None);
    let (high_water, total) = Spi::get_two::<String, i64>(&format!(
        "SELECT max({key})::text, count(*) FROM {}{filter}",
        settings.source.name
    ))
    .expect("measuring the source");
    let high_water = high_water?;
    let run_id = Spi::get_one_with_args::<i64>(
        "SELECT chat_backfill.run_started($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            settings.source.oid.into(),
            settings.target.oid.into(),
            settings.source.name.as_str().into(),
            settings.target.name.as_str().into(),
            high_water.as_str().into(),
            total.unwrap_or(0).into(),
            settings.now.into(),
            settings.source_filter.as_deref().map_or(DatumWithOid::null_oid(pg_sys::TEXTOID), DatumWithOid::from),
        ],
    )
    .expect("recording the run")
    .expect("run id");
    Some((run_id, None, high_water))
}

fn checkpoint(run_id: i64, last_key: Option<&str>, r: &BatchReport) {
    Spi::run_with_args(
        "SELECT chat_backfill.run_checkpoint($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[
            run_id.into(),
            last_key.map_or(DatumWithOid::null_oid(pg_sys::TEXTOID), DatumWithOid::from),
            r.chats_read.into(),
            r.messages_inserted.into(),
            r.messages_rejected.into(),
            r.messages_existing.into(),
            r.messages_skipped.into(),
            r.chats_skipped.into(),
            r.elapsed_ms.into(),
        ],
    )
    .expect("checkpointing the run");
}

fn set_status(run_id: i64, status: &str, error: Option<&str>) {
    Spi::run_with_args(
        "SELECT chat_backfill.run_status($1, $2, $3)",
        &[run_id.into(), status.into(), error.map_or(DatumWithOid::null_oid(pg_sys::TEXTOID), DatumWithOid::from)],
    )
    .expect("recording the run's status");
}

/// COMMIT and start the next transaction, with a fresh snapshot for its SQL.
fn commit() {
    unsafe {
        pg_sys::PopActiveSnapshot();
        pg_sys::SPI_commit();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
}

fn finish_call() {
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
    unsafe {
        pgrx::direct_function_call::<bool>(pg_sys::pg_advisory_unlock_int8, &[key.into_datum()]);
    }
}

fn duration_of(interval: Interval) -> Duration {
    Duration::from_micros(interval.as_micros().clamp(0, u64::MAX as i128) as u64)
}

fn sleep_interruptibly(total: Duration) {
    let until = Instant::now() + total;
    while Instant::now() < until {
        pgrx::check_for_interrupts!();
        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
    }
}

extension_sql_file!("../sql/runs.sql", name = "runs_state", requires = ["state_schema"]);
