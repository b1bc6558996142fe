//! `CALL backfill_chat_messages_resumable(...)`, the committing form (`run::driver`): a
//! COMMIT after every batch, a checkpoint in `chat_backfill.runs` in the same transaction.

use core::ffi::CStr;
use std::time::Duration;

use pgrx::datum::{AnyNumeric, Interval};
use pgrx::prelude::*;

use crate::pg::error::OrRaise;
use crate::run::driver::Call;

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
    let call = Call {
        source,
        target,
        batch_size,
        now,
        max_runtime: max_runtime.map(duration_of),
        pause: pause.map(duration_of),
        source_filter,
        id_column,
        user_id_column,
        chat_column,
        lock_timeout: lock_timeout.map(duration_of),
        restart,
        if_busy,
        max_replica_lag,
        replica_slot: replica_slot.map(|slot| slot.to_string_lossy().into_owned()),
        max_wal_rate: max_wal_rate.map(|n| n.to_string().parse::<f64>().unwrap_or(f64::NAN)),
        workers,
        wait_for_workers,
        batch_time: batch_time.map(|t| t.as_micros()),
        rows,
    };
    crate::run::driver::call(call, fcinfo).or_raise();
}

/// An interval as a duration; a negative one is none.
fn duration_of(interval: Interval) -> Duration {
    Duration::from_micros(interval.as_micros().clamp(0, u64::MAX as i128) as u64)
}
