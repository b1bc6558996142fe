//! The settings an operator sets once (postgresql.conf, ALTER DATABASE/ROLE ... SET, or SET),
//! all named `chat_backfill.*` and bounded, defined when the library loads. A backfill
//! argument left NULL takes its setting. Every one is USERSET: each only shapes the caller's
//! own calls, and each could as well be passed as an argument (admission control included,
//! which `force => true` overrides: it is a safety net, not a permission). The one exception,
//! `max_workers`, caps what a CALL takes from the server's shared worker slots: SUSET.

use std::ffi::CString;

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};

/// The largest batch_size an argument or the setting may ask for.
pub const MAX_BATCH_SIZE: i32 = 1_000_000;
/// The most workers one CALL may ask for (chat_backfill.max_workers caps it further).
pub const MAX_WORKERS_BOUND: i32 = 64;

const DEFAULT_BATCH_SIZE: i32 = 5000;

static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(DEFAULT_BATCH_SIZE);
/// MB; -1: the server's max_wal_size.
static MAX_ATOMIC_WAL: GucSetting<i32> = GucSetting::<i32>::new(-1);
/// kB; -1: no throttle.
static MAX_REPLICA_LAG: GucSetting<i32> = GucSetting::<i32>::new(-1);
static REPLICA_SLOT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// MiB per second; 0: no limit.
static MAX_WAL_RATE: GucSetting<f64> = GucSetting::<f64>::new(0.0);
/// kB of chat that plan() and admission control read.
static PLAN_SAMPLE_SIZE: GucSetting<i32> = GucSetting::<i32>::new(16 * 1024);
/// Chats stored in a TOAST table above this size (kB) are read a slice at a time. Below
/// it a chat is held (faster: streaming decompresses it twice, 9-13% slower on a 50 MB chat
/// of text) at about twice its size, under 128 MB.
static STREAM_CHATS_OVER: GucSetting<i32> = GucSetting::<i32>::new(64 * 1024);
/// Background workers one CALL may start (superuser-set: the slots are the server's).
static MAX_WORKERS: GucSetting<i32> = GucSetting::<i32>::new(4);

pub fn init() {
    GucRegistry::define_int_guc(
        c"chat_backfill.batch_size",
        c"Messages per batch when a backfill's batch_size is NULL.",
        c"Batches also end at 8 MB of rows and at chat boundaries.",
        &BATCH_SIZE,
        1,
        MAX_BATCH_SIZE,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"chat_backfill.max_atomic_wal",
        c"Largest estimated WAL the one-transaction backfill_chat_messages() accepts.",
        c"-1 means the server's max_wal_size. Over it, the function refuses with 53400 unless called with force => true.",
        &MAX_ATOMIC_WAL,
        -1,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_MB,
    );
    GucRegistry::define_int_guc(
        c"chat_backfill.max_replica_lag",
        c"Replica lag at which the committing backfill waits, when its max_replica_lag is NULL.",
        c"-1 means no throttle.",
        &MAX_REPLICA_LAG,
        -1,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_string_guc(
        c"chat_backfill.replica_slot",
        c"Replication slot whose lag the throttle reads, when replica_slot is NULL.",
        c"Empty means every connected standby.",
        &REPLICA_SLOT,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_float_guc(
        c"chat_backfill.max_wal_rate",
        c"MiB of WAL per second the committing backfill may write, when its max_wal_rate is NULL.",
        c"0 means no limit.",
        &MAX_WAL_RATE,
        0.0,
        1_000_000.0,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"chat_backfill.plan_sample_size",
        c"How much chat text plan() and admission control read and trial-insert.",
        c"A larger sample gives better estimates and takes longer; the sample is rolled back. Admission looks at a 64th of the source first, within this.",
        &PLAN_SAMPLE_SIZE,
        64,
        1024 * 1024,
        GucContext::Userset,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"chat_backfill.stream_chats_over",
        c"Chats stored in a TOAST table bigger than this are read and expanded a slice at a time.",
        c"Smaller chats are read whole, which is faster; a streamed chat costs memory for one message and its index (16 bytes a message), not its text. 0: every chat in a TOAST table.",
        &STREAM_CHATS_OVER,
        0,
        1024 * 1024,
        GucContext::Userset,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"chat_backfill.max_workers",
        c"Most background workers one CALL backfill_chat_messages_resumable(workers => n) starts.",
        c"Worker slots (max_worker_processes) are shared with parallel query and logical replication; only a superuser may raise this.",
        &MAX_WORKERS,
        1,
        MAX_WORKERS_BOUND,
        GucContext::Suset,
        GucFlags::default(),
    );
    // Any other chat_backfill.* name is a typo: warn of it now, and refuse it from now on,
    // rather than let `SET chat_backfill.batchsize = ...` pass and do nothing.
    crate::pg::version::reserve_guc_prefix(c"chat_backfill");
}

pub fn batch_size() -> i32 {
    BATCH_SIZE.get()
}

/// Bytes, or `None` for "the server's max_wal_size".
pub fn max_atomic_wal() -> Option<i64> {
    let mb = MAX_ATOMIC_WAL.get();
    (mb >= 0).then(|| i64::from(mb) << 20)
}

/// As a size pg_size_bytes reads, like the argument.
pub fn max_replica_lag() -> Option<String> {
    let kb = MAX_REPLICA_LAG.get();
    (kb >= 0).then(|| format!("{kb}kB"))
}

pub fn replica_slot() -> Option<String> {
    REPLICA_SLOT.get().map(|s| s.to_string_lossy().into_owned()).filter(|s| !s.is_empty())
}

/// MiB per second, as the argument.
pub fn max_wal_rate() -> Option<f64> {
    let rate = MAX_WAL_RATE.get();
    (rate > 0.0).then_some(rate)
}

pub fn max_workers() -> usize {
    MAX_WORKERS.get().max(1) as usize
}

pub fn stream_chats_over() -> usize {
    (STREAM_CHATS_OVER.get().max(0) as usize) << 10
}

pub fn plan_sample_bytes() -> i64 {
    i64::from(PLAN_SAMPLE_SIZE.get()) << 10
}

/// A setting's value as the session has it (`current_setting`), whatever its kind.
pub fn current_setting(name: &str) -> pgrx::spi::Result<Option<String>> {
    pgrx::Spi::get_one_with_args::<String>("SELECT pg_catalog.current_setting($1::pg_catalog.text)", &[name.into()])
}

/// Sets a `user` setting for this session as a SET would (`GUC_ACTION_SET`), or saves and
/// sets it at the current GUC nest level (`GUC_ACTION_SAVE`, as a function's SET clause).
/// A refused value raises an ordinary ERROR.
pub fn set_user_setting(name: &std::ffi::CStr, value: &std::ffi::CStr, action: pgrx::pg_sys::GucAction::Type) {
    // SAFETY: NUL-terminated strings that outlive the call; set_config_option copies them.
    unsafe {
        pgrx::pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pgrx::pg_sys::GucContext::PGC_USERSET,
            pgrx::pg_sys::GucSource::PGC_S_SESSION,
            action,
            true,
            0,
            false,
        );
    }
}
