//! Background workers for `CALL backfill_chat_messages_resumable(workers => n)`. The CALL
//! (the leader) records what its workers need in `chat_backfill.launches`, starts them, and
//! waits for them (or, with `wait_for_workers => false`, returns once they hold their
//! ranges). Each worker connects as the role that made the CALL, never another, claims key
//! ranges of the split run one at a time, and works each with the same engine, batches,
//! checkpoints and throttles as a one-session run. A worker that fails records why in the
//! run and the others halt before their next batch; a worker that dies leaves its range
//! free and the leader reports it. Every way of stopping leaves each range at its last
//! committed batch, which is where the next CALL resumes.

use std::cell::{Cell, RefCell};
use std::ffi::CString;
use std::panic::AssertUnwindSafe;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pgrx::PgMemoryContexts;
use pgrx::PgSqlErrorCode::*;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime};
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use serde::{Deserialize, Serialize};

use crate::engine::request::Request;
use crate::engine::request::Settings;
use crate::pg::error::{Error, Result};
use crate::run::batches::{commit, work_ranges, Limits, Parallel};
use crate::run::ranges;
use crate::run::state;
use crate::run::throttle::{Throttle, MIN_WAL_RATE_MIB};

/// What the CALL hands its workers (as JSON in `chat_backfill.launches`).
#[derive(Serialize, Deserialize)]
struct Launch {
    source: u32,
    target: u32,
    batch_size: i32,
    now: i64,
    source_filter: Option<String>,
    id_column: String,
    user_id_column: String,
    chat_column: String,
    /// The CALL's session settings that change what its SQL means (a source_filter's names,
    /// literals and dates, which triggers fire): each worker takes them.
    session: Vec<(String, String)>,
    /// When max_runtime ends, in Unix milliseconds.
    deadline_ms: Option<i64>,
    pause_us: u64,
    lock_timeout: Option<String>,
    max_replica_lag: Option<String>,
    replica_slot: Option<String>,
    /// This worker's share of the run's max_wal_rate, MiB per second.
    max_wal_rate: Option<f64>,
    /// The waiting CALL's backend: its workers halt when it is gone.
    leader_pid: Option<i32>,
    /// batch_time, in microseconds: each worker tunes its own batches.
    batch_time_us: Option<u64>,
    /// `'migration'` or `'app'`.
    #[serde(default = "migration")]
    rows: String,
}

fn migration() -> String {
    "migration".to_owned()
}

/// Starts workers for the split run and waits for them or not; false when no worker slot
/// was free (the caller then works the ranges itself).
pub fn launch(settings: &Settings, run_id: i64, limits: &Limits, deadline: Option<Instant>, parallel: &Parallel) -> Result<bool> {
    let open = ranges::unfinished(run_id)?.max(1) as usize;
    let cap = crate::pg::gucs::max_workers();
    let wanted = parallel.workers.min(open).min(cap);
    if wanted < parallel.workers {
        notice!(
            "chat_backfill: run {run_id} starts {wanted} of the {} workers asked for ({})",
            parallel.workers,
            if open < parallel.workers.min(cap) {
                format!("it has {open} unfinished key ranges")
            } else {
                format!("chat_backfill.max_workers is {cap}")
            }
        );
    }
    check_can_connect()?;
    let session = session_settings()?;
    // The cap is the server's: workers of every CALL, in every database, count. Counting and
    // starting happen under one server-wide lock, held until the new workers are counted
    // (they hold their mark) or gone: CALLs started at the same instant take turns.
    let cap_lock = CapLock::take();
    let running = ranges::workers_on_server()?;
    let wanted = if running + wanted > cap {
        let free = cap.saturating_sub(running);
        notice!(
            "chat_backfill: {running} chat_backfill workers already run on this server (chat_backfill.max_workers is \
             {cap}); run {run_id} starts {free}"
        );
        free
    } else {
        wanted
    };
    if wanted == 0 {
        notice!("chat_backfill: this CALL works run {run_id} itself");
        return Ok(false);
    }
    let now_ms = unix_ms();
    let launch = Launch {
        source: u32::from(settings.source.oid),
        target: u32::from(settings.target.oid),
        batch_size: settings.batch_size as i32,
        now: settings.now,
        source_filter: settings.source_filter.clone(),
        id_column: settings.id_column.clone(),
        user_id_column: settings.user_id_column.clone(),
        chat_column: settings.chat_column.clone(),
        session,
        deadline_ms: deadline.map(|d| now_ms + d.saturating_duration_since(Instant::now()).as_millis() as i64),
        pause_us: limits.pause.as_micros() as u64,
        lock_timeout: limits.lock_timeout.clone(),
        max_replica_lag: limits.throttle_args.max_replica_lag.clone(),
        replica_slot: limits.throttle_args.replica_slot.clone(),
        // Each backend paces its own WAL: shared out, the run stays within the rate.
        max_wal_rate: limits.throttle_args.max_wal_rate.map(|mib| (mib / wanted as f64).max(MIN_WAL_RATE_MIB)),
        // SAFETY: this backend's own pid, fixed for its life.
        leader_pid: parallel.wait.then(|| unsafe { pg_sys::MyProcPid }),
        batch_time_us: limits.batch_time.map(|t| t.as_micros() as u64),
        rows: settings.rows.name().to_owned(),
    };
    let json = serde_json::to_string(&launch).map_err(|e| {
        Error::new(ERRCODE_INTERNAL_ERROR, format!("chat_backfill: cannot encode the workers' settings: {e}"), "This is a bug in chat_backfill.")
    })?;
    let launch_id = Spi::get_one_with_args::<i64>(
        "INSERT INTO chat_backfill.launches (run_id, settings) VALUES ($1::pg_catalog.int8, $2::pg_catalog.text) RETURNING launch_id",
        &[run_id.into(), json.as_str().into()],
    )?
    .unwrap_or_default();
    // The workers read the launch and the ranges from their own sessions.
    commit();
    // The run's totals before any worker starts: they work while this CALL waits for them to
    // be counted, and what this CALL's workers did is measured from here.
    let before = state::totals(run_id)?;
    let began = Instant::now();
    // SAFETY: backend globals fixed for the session; GetUserId is the role the CALL runs as.
    let (db, role, me) = unsafe { (u32::from(pg_sys::MyDatabaseId), u32::from(pg_sys::GetUserId()), pg_sys::MyProcPid) };
    let mut started = Vec::new();
    for no in 0..wanted {
        let worker = Worker::start(BackgroundWorkerBuilder::new(&format!("chat_backfill worker {no} of run {run_id}"))
            .set_type("chat_backfill worker")
            .set_library("chat_backfill")
            .set_function("chat_backfill_worker")
            .enable_spi_access()
            .set_start_time(BgWorkerStartTime::RecoveryFinished)
            .set_restart_time(None)
            .set_notify_pid(me)
            .set_extra(&format!("{launch_id} {db} {role} {no}")));
        match worker {
            Some(worker) => started.push(worker),
            None => break,
        }
    }
    // A cancel while waiting for them to be counted stops them, as a cancel of the wait does.
    // The wait is bounded: every other CALL with workers, in every database, queues behind
    // the cap lock meanwhile. A worker not counted in time (its connection waits on
    // something: a lock, the role's connection limit) is stopped, and the run goes on
    // without it.
    let until = Instant::now() + COUNTED_WITHIN;
    let counted: Vec<bool> = PgTryBuilder::new(AssertUnwindSafe(|| started.iter().map(|w| w.wait_counted(until)).collect()))
        .catch_others(|caught| {
            stop_all(&started);
            caught.rethrow()
        })
        .execute();
    let (mut on_time, mut late) = (Vec::new(), Vec::new());
    for (worker, counted) in started.into_iter().zip(counted) {
        if counted { on_time.push(worker) } else { late.push(worker) }
    }
    if !late.is_empty() {
        stop_all(&late);
        notice!(
            "chat_backfill: {} of run {run_id}'s workers did not start within {} s and were stopped; the run goes on \
             without them (see the server log for what they waited on)",
            late.len(),
            COUNTED_WITHIN.as_secs()
        );
    }
    let started = on_time;
    drop(cap_lock);
    if started.is_empty() {
        notice!("chat_backfill: no background worker slot is free (see max_worker_processes); this CALL works run {run_id} itself");
        return Ok(false);
    }
    if started.len() < wanted {
        notice!(
            "chat_backfill: only {} background worker slots were free (see max_worker_processes); run {run_id} goes on with {} workers",
            started.len(),
            started.len()
        );
    }
    let n = started.len();
    if parallel.wait {
        notice!("chat_backfill: run {run_id}: {n} workers started; waiting for them");
        wait(started, run_id, launch_id, before, began)?;
    } else {
        settle_in(started, settings, run_id)?;
        notice!(
            "chat_backfill: run {run_id}: {n} workers are backfilling in the background; see chat_backfill.status \
             (their errors go to its last_error)"
        );
    }
    Ok(true)
}

/// How long a CALL waits, holding the cap lock, for its workers to be counted.
const COUNTED_WITHIN: Duration = Duration::from_secs(20);

/// The server-wide lock under which a CALL counts the running workers and starts its own: an
/// advisory lock tag of database 0, which no SQL call can take (pg_advisory_lock always names
/// its own database), so no role can hold it to keep others from starting workers. A session
/// lock (the CALL commits the launch before starting them), released when this is dropped,
/// on every way out; at backend exit PostgreSQL releases it anyway.
struct CapLock {
    tag: pg_sys::LOCKTAG,
}

impl CapLock {
    fn take() -> CapLock {
        let tag = pg_sys::LOCKTAG {
            locktag_field1: 0,
            locktag_field2: ranges::LOCK_CLASS as u32,
            locktag_field3: 1,
            locktag_field4: 2,
            locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
            locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
        };
        // SAFETY: an ordinary lock wait (interruptible) on a tag of our own.
        unsafe { pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as pg_sys::LOCKMODE, true, false) };
        CapLock { tag }
    }
}

impl Drop for CapLock {
    fn drop(&mut self) {
        // SAFETY: releases the session lock `take` acquired; LockRelease only warns if it is
        // not held.
        unsafe { pg_sys::LockRelease(&self.tag, pg_sys::ExclusiveLock as pg_sys::LOCKMODE, true) };
    }
}

/// A started worker, by its registration handle.
struct Worker {
    handle: *mut pg_sys::BackgroundWorkerHandle,
}

impl Worker {
    /// Registers the worker with the postmaster; `None` when no slot is free.
    fn start(builder: BackgroundWorkerBuilder) -> Option<Worker> {
        let mut bgw: pg_sys::BackgroundWorker = (&builder).into();
        let mut handle: *mut pg_sys::BackgroundWorkerHandle = std::ptr::null_mut();
        // SAFETY: the postmaster copies `bgw`; the handle is allocated in TopMemoryContext, so
        // it stays valid across the commits the CALL makes while it waits (a few bytes each).
        let ok = unsafe {
            PgMemoryContexts::TopMemoryContext.switch_to(|_| pg_sys::RegisterDynamicBackgroundWorker(&mut bgw, &mut handle))
        };
        (ok && !handle.is_null()).then_some(Worker { handle })
    }

    /// Waits until the worker holds its mark (`ranges::mark_as_worker`), so the next CALL's
    /// count includes it, or has stopped: true; false when `until` came first.
    fn wait_counted(&self, until: Instant) -> bool {
        loop {
            pgrx::check_for_interrupts!();
            let mut pid: pg_sys::pid_t = 0;
            // SAFETY: a live handle from RegisterDynamicBackgroundWorker; only reads its slot.
            let status = unsafe { pg_sys::GetBackgroundWorkerPid(self.handle, &mut pid) };
            match status {
                pg_sys::BgwHandleStatus::BGWH_STOPPED | pg_sys::BgwHandleStatus::BGWH_POSTMASTER_DIED => return true,
                pg_sys::BgwHandleStatus::BGWH_STARTED if ranges::is_marked(pid).unwrap_or(true) => return true,
                _ if Instant::now() >= until => return false,
                _ => crate::run::throttle::sleep_interruptibly(std::time::Duration::from_millis(5)),
            }
        }
    }

    fn stopped(&self) -> bool {
        let mut pid: pg_sys::pid_t = 0;
        // SAFETY: a live handle from RegisterDynamicBackgroundWorker; only reads its slot.
        let status = unsafe { pg_sys::GetBackgroundWorkerPid(self.handle, &mut pid) };
        matches!(status, pg_sys::BgwHandleStatus::BGWH_STOPPED | pg_sys::BgwHandleStatus::BGWH_POSTMASTER_DIED)
    }

    /// Asks the postmaster to send it SIGTERM (a no-op once it has stopped).
    fn terminate(&self) {
        // SAFETY: as above; marks the slot for termination.
        unsafe { pg_sys::TerminateBackgroundWorker(self.handle) };
    }

    /// Waits until it has stopped (this backend is its notify_pid, so its latch is set then).
    fn wait_stopped(&self) {
        // SAFETY: as above; returns on stop or postmaster death.
        unsafe { pg_sys::WaitForBackgroundWorkerShutdown(self.handle) };
    }
}

/// The workers this backend is waiting for, as handle addresses: if the CALL is terminated
/// (a FATAL, which no catch sees), its exit hook asks each to stop, and each rolls back the
/// batch it is in.
static LED: Mutex<Vec<usize>> = Mutex::new(Vec::new());
static HOOKED: AtomicBool = AtomicBool::new(false);

unsafe extern "C-unwind" fn stop_led_workers(_code: i32, _arg: pg_sys::Datum) {
    if let Ok(led) = LED.lock() {
        for &handle in led.iter() {
            // SAFETY: handles in LED are live (TopMemoryContext) until `lead` clears them;
            // TerminateBackgroundWorker only marks a slot in shared memory, which is still
            // attached in a before_shmem_exit callback.
            unsafe { pg_sys::TerminateBackgroundWorker(handle as *mut pg_sys::BackgroundWorkerHandle) };
        }
    }
}

/// Records the workers for the exit hook (installed once per backend).
fn lead(workers: &[Worker]) {
    if !HOOKED.swap(true, Ordering::SeqCst) {
        // SAFETY: registers a callback PostgreSQL runs when this backend exits.
        unsafe { pg_sys::before_shmem_exit(Some(stop_led_workers), pg_sys::Datum::from(0)) };
    }
    if let Ok(mut led) = LED.lock() {
        *led = workers.iter().map(|w| w.handle as usize).collect();
    }
}

fn unlead() {
    if let Ok(mut led) = LED.lock() {
        led.clear();
    }
}

/// Before 17 a background worker cannot connect as a role without LOGIN (a migration often
/// runs as one, after SET ROLE); say so now rather than have every worker fail to start.
fn check_can_connect() -> Result<()> {
    if crate::pg::version::WORKERS_MAY_BE_NOLOGIN {
        return Ok(());
    }
    // SAFETY: the role this CALL runs as.
    let role = unsafe { pg_sys::GetUserId() };
    let can = Spi::get_one_with_args::<bool>(
        "SELECT r.rolcanlogin FROM pg_catalog.pg_roles r WHERE r.oid OPERATOR(pg_catalog.=) $1::pg_catalog.oid",
        &[role.into()],
    )?
    .unwrap_or(false);
    if can {
        return Ok(());
    }
    Err(Error::new(
        ERRCODE_INSUFFICIENT_PRIVILEGE,
        "background workers cannot connect as the current role, which has NOLOGIN",
        "Workers connect as the role the CALL runs as, never another. CALL with workers => 1, or as a role with LOGIN \
         (PostgreSQL 17 and later let workers connect as a NOLOGIN role).",
    ))
}

/// Waits for every worker to stop, and reports: their totals in a NOTICE, or the first
/// failure as this CALL's error. Cancelling or terminating the CALL stops its workers.
fn wait(workers: Vec<Worker>, run_id: i64, launch_id: i64, before: [i64; 4], began: Instant) -> Result<()> {
    lead(&workers);
    let cell = RefCell::new(workers);
    let live = AssertUnwindSafe(&cell);
    let failure = PgTryBuilder::new(AssertUnwindSafe(|| -> Result<Option<Error>> {
        loop {
            idle(Duration::from_millis(500));
            let mut stopped = false;
            live.borrow_mut().retain(|w| {
                let gone = w.stopped();
                stopped |= gone;
                !gone
            });
            if stopped {
                if let Some(error) = failure_of(run_id, launch_id)? {
                    return Ok(Some(error));
                }
            }
            if live.borrow().is_empty() {
                return unfinished_at_end(run_id);
            }
        }
    }))
    .catch_others(|caught| {
        stop_all(&live.borrow());
        unlead();
        caught.rethrow()
    })
    .execute();
    // Whatever ended the wait, no worker outlives it unseen.
    stop_all(&cell.borrow());
    unlead();
    if let Some(error) = failure? {
        return Err(error);
    }
    let after = state::totals(run_id)?;
    let (status, why) = state::status_of(run_id)?;
    let secs = began.elapsed().as_secs_f64();
    let inserted = after[1] - before[1];
    notice!(
        "chat_backfill: run {run_id} {} after {secs:.1} s: this CALL's workers read {} chats, inserted {} messages \
         ({:.0} messages/s), {} rejected, {} already present; rejected rows: SELECT * FROM chat_backfill.rejected_messages \
         WHERE run_id = {run_id}",
        match status.as_str() {
            "finished" => "done".to_owned(),
            other => format!("{other} ({})", why.unwrap_or_default()),
        },
        after[0] - before[0],
        inserted,
        inserted as f64 / secs.max(1e-9),
        after[2] - before[2],
        after[3] - before[3],
    );
    Ok(())
}

/// The run's failure once a worker has stopped: one recorded by a worker, or a range left
/// unfinished by a worker that died (its error, if any, is in the server log).
fn failure_of(run_id: i64, launch_id: i64) -> Result<Option<Error>> {
    let (status, last_error) = state::status_of(run_id)?;
    let launch_error = Spi::get_one_with_args::<String>(
        "SELECT l.error FROM chat_backfill.launches l WHERE l.launch_id OPERATOR(pg_catalog.=) $1::pg_catalog.int8",
        &[launch_id.into()],
    )?;
    if launch_error.is_some() || status == "failed" {
        let text = launch_error.or(last_error).unwrap_or_default();
        // A worker that could not record it on the run (it may not see the run at all).
        if matches!(status.as_str(), "running" | "throttled") {
            state::set_status_if_active(run_id, "failed", Some(&text))?;
            commit();
        }
        let code = text.get(..5).filter(|_| text.as_bytes().get(5) == Some(&b':')).map_or(ERRCODE_INTERNAL_ERROR, crate::pg::error::sqlstate_code);
        return Ok(Some(
            Error::new(
                code,
                format!("a worker of run {run_id} failed: {}", text.get(7..).unwrap_or(&text)),
                "The other workers stopped after their current batch. Fix the cause and CALL again: every range resumes \
                 after its last committed batch.",
            ),
        ));
    }
    if matches!(status.as_str(), "running" | "throttled") && orphaned(run_id)? {
        let why = format!("a worker of run {run_id} stopped before finishing its key range");
        state::set_status_if_active(run_id, "failed", Some(&why))?;
        commit();
        return Ok(Some(Error::new(
            ERRCODE_ADMIN_SHUTDOWN,
            why,
            "It was terminated or could not start (see the server log). The other workers were stopped; CALL again to \
             resume every range after its last committed batch.",
        )));
    }
    Ok(None)
}

/// Whether an unfinished range of the run has no holder: the locks are read first, the
/// ranges in a later transaction (so a later snapshot, in any isolation level).
fn orphaned(run_id: i64) -> Result<bool> {
    let held = ranges::held(run_id)?;
    commit();
    Ok(ranges::orphaned(run_id, &held)? > 0)
}

/// Every worker has stopped without an error: the run must be finished, or stopped or
/// yielded as a worker recorded. Anything else is never reported as success.
fn unfinished_at_end(run_id: i64) -> Result<Option<Error>> {
    let (status, _) = state::status_of(run_id)?;
    let left = ranges::unfinished(run_id)?;
    if left == 0 || !matches!(status.as_str(), "running" | "throttled") {
        return Ok(None);
    }
    Ok(Some(Error::new(
        ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("the workers of run {run_id} stopped with {left} key ranges unfinished"),
        "See chat_backfill.status and the server log; CALL again to resume every range after its last committed batch.",
    )))
}

/// Settings a worker never takes from the CALL's session: who it is (it connects as the
/// CALL's role), its name and client, what belongs to one transaction, and the transaction
/// defaults it pins (`pin_transaction_defaults`).
const NOT_CARRIED: [&str; 11] = [
    "application_name",
    "client_encoding",
    "role",
    "session_authorization",
    "transaction_isolation",
    "transaction_read_only",
    "transaction_deferrable",
    "is_superuser",
    "default_transaction_isolation",
    "default_transaction_read_only",
    "default_transaction_deferrable",
];

/// Every setting the CALL's session changed (SET, or the client at connection start),
/// placeholders for custom settings such as `app.tenant` included, in the GUC table's order:
/// a worker must see what the session sees (a row-level security policy, a source_filter or
/// a trigger reading `current_setting('app.tenant', true)`). What the server's files, the
/// database and the role set, the worker gets by connecting as the same role. A setting
/// that only a connection's start can set (`ignore_system_indexes`, given in PGOPTIONS) a
/// worker, already connected when it reads its launch, cannot take: it is left out and
/// named in a NOTICE, rather than failing every worker.
fn session_settings() -> Result<Vec<(String, String)>> {
    let mut at_start = Vec::new();
    let names: Vec<String> = crate::pg::version::guc_variables()
        .into_iter()
        .filter_map(|var| {
            // SAFETY: a live entry of the GUC table; its name is a NUL-terminated string.
            let (name, source, context) = unsafe { (core::ffi::CStr::from_ptr((*var).name), (*var).source, (*var).context) };
            let changed = source == pg_sys::GucSource::PGC_S_CLIENT || source == pg_sys::GucSource::PGC_S_SESSION;
            let name = name.to_string_lossy().into_owned();
            if !changed || NOT_CARRIED.contains(&name.to_ascii_lowercase().as_str()) {
                return None;
            }
            if context == pg_sys::GucContext::PGC_BACKEND || context == pg_sys::GucContext::PGC_SU_BACKEND {
                at_start.push(name);
                return None;
            }
            Some(name)
        })
        .collect();
    if !at_start.is_empty() {
        notice!(
            "chat_backfill: the workers run without this session's {}: only a connection's start sets {}",
            at_start.join(", "),
            if at_start.len() == 1 { "it" } else { "them" }
        );
    }
    names
        .into_iter()
        .map(|name| {
            let value = crate::pg::gucs::current_setting(&name)?.unwrap_or_default();
            Ok((name, value))
        })
        .collect()
}

/// Asks every worker still running to stop (each rolls back its open batch) and waits
/// until they have.
fn stop_all(workers: &[Worker]) {
    for worker in workers {
        worker.terminate();
    }
    for worker in workers {
        worker.wait_stopped();
    }
}

/// With wait_for_workers => false: returns once every worker holds a range or has stopped
/// (at most 30 s), so a pg_cron tick right after sees the run busy instead of starting more.
fn settle_in(workers: Vec<Worker>, settings: &Settings, run_id: i64) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        let live = workers.iter().filter(|w| !w.stopped()).count();
        let holding = ranges::holders(&settings.source.name, &settings.target.name)?.len();
        if holding >= live.min(ranges::unfinished(run_id)? as usize) {
            break;
        }
        idle(Duration::from_millis(100));
    }
    Ok(())
}

/// Commits, then waits up to `timeout` without a snapshot (so a long run holds back no
/// vacuum) for a worker to start or stop (the postmaster sets our latch), or an interrupt.
fn idle(timeout: Duration) {
    crate::pg::transaction::commit_and_begin(|| {
        // SAFETY: the latch is this backend's own; the wait ends on it, the timeout or the
        // postmaster's death.
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                timeout.as_millis() as _,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pgrx::check_for_interrupts!();
    });
}

fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// SIGTERM as a client backend's `die` takes it: only flags, acted on at the next
/// CHECK_FOR_INTERRUPTS (a FATAL that rolls back the open transaction).
unsafe extern "C-unwind" fn on_sigterm(_signal: i32) {
    // SAFETY: async-signal-safe stores and SetLatch, as die() does; errno is restored for
    // the code the signal interrupted.
    unsafe {
        let errno = *libc::__errno_location();
        (&raw mut pg_sys::InterruptPending).write_volatile(1);
        (&raw mut pg_sys::ProcDiePending).write_volatile(1);
        pg_sys::SetLatch(pg_sys::MyLatch);
        *libc::__errno_location() = errno;
    }
}

/// A worker's main function, run by the postmaster in a new process.
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn chat_backfill_worker(_arg: pg_sys::Datum) {
    // SAFETY: a worker starts with signals blocked. `die` turns SIGTERM (pg_terminate_backend,
    // a stopping leader, shutdown) into an interrupt that the next CHECK_FOR_INTERRUPTS raises
    // as FATAL, rolling back the open batch, as in a client backend.
    unsafe {
        crate::pg::version::on_sigterm(on_sigterm);
        pg_sys::BackgroundWorkerUnblockSignals();
    }
    let extra = BackgroundWorker::get_extra().to_owned();
    let parts: Vec<i64> = extra.split(' ').filter_map(|p| p.parse().ok()).collect();
    let [launch_id, db, role, no] = parts[..] else {
        pgrx::error!("chat_backfill worker started without its launch ({extra:?})");
    };
    // SAFETY: once, before any SQL: the CALL's database, as the role the CALL ran as.
    unsafe {
        pg_sys::BackgroundWorkerInitializeConnectionByOid(pg_sys::Oid::from(db as u32), pg_sys::Oid::from(role as u32), crate::pg::version::WORKER_CONNECT_FLAGS);
    }
    pin_transaction_defaults();
    // SAFETY: a non-atomic SPI connection keeps its memory under PortalContext, which a
    // worker does not have: the process's top context lives as long. Then the first
    // transaction, with a snapshot, as batches::commit keeps one.
    unsafe {
        pg_sys::PortalContext = pg_sys::TopMemoryContext;
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::SPI_connect_ext(pg_sys::SPI_OPT_NONATOMIC as i32);
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let cell = Cell::new(0i64);
    let run = AssertUnwindSafe(&cell);
    PgTryBuilder::new(AssertUnwindSafe(|| {
        if let Err(e) = work(launch_id, &cell) {
            e.raise();
        }
    }))
    .catch_others(|caught| {
        record_failure(launch_id, run.get(), no, &caught);
        caught.rethrow()
    })
    .execute();
    // SAFETY: ends what was begun above, in the transaction the last commit opened.
    unsafe {
        if pg_sys::ActiveSnapshotSet() {
            pg_sys::PopActiveSnapshot();
        }
        pg_sys::SPI_finish();
        pg_sys::CommitTransactionCommand();
    }
}

/// A worker's transactions are READ COMMITTED, read-write and not deferrable, whatever the
/// role's or the database's defaults say, set before its first transaction: a SERIALIZABLE
/// READ ONLY DEFERRABLE default would make it wait for a safe snapshot (as long as any
/// serializable transaction is open, anywhere) while its CALL waits for it to be counted,
/// and each batch is correct on its own (ON CONFLICT against the target), so the workers'
/// batches need no serializable snapshot; the CALL's session's own choice of these is not
/// carried either (NOT_CARRIED).
fn pin_transaction_defaults() {
    // Outside any transaction, as a connection's startup options are applied.
    for (name, value) in TRANSACTION_DEFAULTS {
        crate::pg::gucs::set_user_setting(name, value, pg_sys::GucAction::GUC_ACTION_SET);
    }
}

const TRANSACTION_DEFAULTS: [(&core::ffi::CStr, &core::ffi::CStr); 3] = [
    (c"default_transaction_isolation", c"read committed"),
    (c"default_transaction_read_only", c"off"),
    (c"default_transaction_deferrable", c"off"),
];

fn work(launch_id: i64, run: &Cell<i64>) -> Result<()> {
    // Row-level security shows a role only its own launches; the condition says it again.
    let found = Spi::connect(|client| {
        let table = client.select(
            "SELECT l.run_id, l.settings FROM chat_backfill.launches l \
             WHERE l.launch_id OPERATOR(pg_catalog.=) $1::pg_catalog.int8 \
               AND l.launched_by OPERATOR(pg_catalog.=) CURRENT_USER::pg_catalog.text",
            None,
            &[launch_id.into()],
        )?;
        let Some(row) = table.into_iter().next() else { return Ok::<_, pgrx::spi::Error>(None) };
        Ok(Some((row.get::<i64>(1)?.unwrap_or_default(), row.get::<String>(2)?.unwrap_or_default())))
    })?;
    let Some((run_id, json)) = found else {
        return Err(Error::new(
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("chat_backfill worker: launch {launch_id} was not made by this role"),
            "Workers only take settings their own role recorded.",
        ));
    };
    run.set(run_id);
    let launch: Launch = serde_json::from_str(&json).map_err(|e| {
        Error::new(ERRCODE_DATA_CORRUPTED, format!("chat_backfill worker: launch {launch_id} is unreadable: {e}"), "CALL again.")
    })?;
    for (name, value) in &launch.session {
        // Only what differs: setting session_replication_role needs rights the CALL's role
        // has only if it could set it there. A custom setting is unknown here until set.
        let differs = Spi::get_one_with_args::<bool>(
            "SELECT pg_catalog.current_setting($1::pg_catalog.text, true) OPERATOR(pg_catalog.<>) $2::pg_catalog.text",
            &[name.as_str().into(), value.as_str().into()],
        )?
        .unwrap_or(true);
        if differs {
            Spi::run_with_args(
                "SELECT pg_catalog.set_config($1::pg_catalog.text, $2::pg_catalog.text, false)",
                &[name.as_str().into(), value.as_str().into()],
            )?;
        }
    }
    crate::run::batches::iso_keys();
    ranges::mark_as_worker()?;
    let activity = CString::new(format!("chat_backfill worker: run {run_id}")).unwrap_or_default();
    // SAFETY: reports this backend's own activity; the string is copied.
    unsafe { pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, activity.as_ptr()) };
    // The same checks as the CALL made, as the same role: settings are never taken on trust.
    let settings = Request {
        batch_size: Some(launch.batch_size),
        now: Some(launch.now),
        source_filter: launch.source_filter.as_deref(),
        batch_time: launch.batch_time_us.map(i128::from),
        ..Request::new(Some(pg_sys::Oid::from(launch.source)), Some(pg_sys::Oid::from(launch.target)))
    }
    .columns(Some(&launch.id_column), Some(&launch.user_id_column), Some(&launch.chat_column))
    .rows(Some(&launch.rows))
    .check()?;
    let mut settings = settings;
    settings.run_id = run_id;
    crate::pg::catalog::check_key_order(&settings.source, &settings.id_column, settings.key_ops.as_ref(), &settings.id_type)?;
    crate::pg::catalog::check_source_key(&settings.source, &settings.id_column)?;
    // The run's state shows this session the run only if the source's row-level security
    // shows it the run's last chat (chat_backfill.may_see_run): a worker that cannot see it
    // would find no range to work and stop as if another had taken them all.
    if !state::visible(run_id)? {
        return Err(Error::new(
            ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("chat_backfill worker: run {run_id} is not visible to this worker: the source's row-level security \
                     does not show it the run's last chat"),
            "The workers read the source as the CALL's role with the CALL's settings, but a policy tells them apart \
             (pg_backend_pid, backend_type, application_name?). CALL with workers => 1, or make the policy show them \
             the same rows.",
        ));
    }
    let mut throttle = Throttle::new(
        launch.max_replica_lag.as_deref(),
        launch.replica_slot.as_deref(),
        launch.max_wal_rate.map(|mib| (mib, "max_wal_rate")),
    )?;
    throttle.start();
    let limits = Limits {
        max_runtime: None,
        pause: Duration::from_micros(launch.pause_us),
        lock_timeout: launch.lock_timeout.clone(),
        throttle,
        throttle_args: Default::default(),
        batch_time: None,
    };
    let deadline = launch.deadline_ms.map(|ms| Instant::now() + Duration::from_millis((ms - unix_ms()).max(0) as u64));
    commit();
    let halted = || -> Result<bool> {
        // SAFETY: looks the pid up in the proc array, under its lock; nothing is kept.
        if launch.leader_pid.is_some_and(|pid| unsafe { pg_sys::BackendPidGetProc(pid) }.is_null()) {
            return Ok(true);
        }
        let (status, _) = state::status_of(run_id)?;
        Ok(!matches!(status.as_str(), "running" | "throttled"))
    };
    work_ranges(&settings, run_id, &limits, deadline, &commit, &halted, false)?;
    Ok(())
}

/// Records a worker's error in its run, so the others halt and the CALL (or the status
/// view) says why. The failed transaction is rolled back first.
fn record_failure(launch_id: i64, run_id: i64, no: i64, caught: &CaughtError) {
    let report = match caught {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) | CaughtError::RustPanic { ereport: r, .. } => r,
    };
    let text = format!(
        "{}: worker {no} (pid {}): {}{}",
        crate::pg::error::sqlstate_text(report.sql_error_code()),
        // SAFETY: this backend's own pid.
        unsafe { pg_sys::MyProcPid },
        report.message(),
        report.hint().map(|h| format!(" (hint: {h})")).unwrap_or_default()
    );
    // SAFETY: the error was caught at the top of the worker: abort its transaction (this
    // also ends the SPI connection) and record in a new one.
    unsafe {
        pg_sys::AbortCurrentTransaction();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    // On the launch first: its role can always write there, even when it has lost the
    // rights the run's row asks for (then only the launch has it).
    let _ = Spi::run_with_args(
        "UPDATE chat_backfill.launches SET error = COALESCE(error, $2::pg_catalog.text) \
         WHERE launch_id OPERATOR(pg_catalog.=) $1::pg_catalog.int8",
        &[launch_id.into(), text.as_str().into()],
    );
    if run_id != 0 {
        let _ = state::set_status_if_active(run_id, "failed", Some(&text));
    }
    // SAFETY: ends the transaction started just above.
    unsafe {
        pg_sys::PopActiveSnapshot();
        pg_sys::CommitTransactionCommand();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A launch record as 0.5.0 wrote it (no `rows`): a worker of this release reads it as
    /// the migration's rows, and every field comes back as written.
    #[test]
    fn a_launch_record_without_rows_means_the_migration_s() {
        let json = r#"{"source":16384,"target":16390,"batch_size":500,"now":1760000000,"source_filter":null,
            "id_column":"id","user_id_column":"user_id","chat_column":"chat","session":[["TimeZone","UTC"]],
            "deadline_ms":null,"pause_us":0,"lock_timeout":"5000ms","max_replica_lag":null,"replica_slot":null,
            "max_wal_rate":2.5,"leader_pid":4242,"batch_time_us":null}"#;
        let launch: Launch = serde_json::from_str(json).unwrap();
        assert_eq!(launch.rows, "migration");
        assert_eq!((launch.source, launch.target, launch.batch_size), (16384, 16390, 500));
        assert_eq!(launch.session, vec![("TimeZone".to_owned(), "UTC".to_owned())]);
        assert_eq!((launch.max_wal_rate, launch.leader_pid), (Some(2.5), Some(4242)));
        let again: Launch = serde_json::from_str(&serde_json::to_string(&launch).unwrap()).unwrap();
        assert_eq!(serde_json::to_string(&again).unwrap(), serde_json::to_string(&launch).unwrap());
    }
}
