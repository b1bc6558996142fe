//! Turning the SQL arguments of a backfill into checked `Settings`: bounds, table
//! resolution and shape checks all happen before the first chat is read.

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode::*;

use crate::backfill::Settings;
use crate::error::UsageError;
use crate::relations::{check_source, check_target, column_type_name, resolve};

pub const MAX_BATCH_SIZE: i32 = 1_000_000;

#[allow(clippy::too_many_arguments)]
pub fn build(
    source: Option<pg_sys::Oid>,
    target: Option<pg_sys::Oid>,
    batch_size: i32,
    now: Option<i64>,
    source_filter: Option<&str>,
    id_column: &str,
    user_id_column: &str,
    chat_column: &str,
    dry_run: bool,
) -> Settings {
    if !(1..=MAX_BATCH_SIZE).contains(&batch_size) {
        UsageError::new(
            ERRCODE_INVALID_PARAMETER_VALUE,
            format!("batch_size {batch_size} is out of range"),
            format!("Use a batch_size between 1 and {MAX_BATCH_SIZE}; 5000 is a good default."),
        )
        .raise();
    }
    if unsafe { pg_sys::GetDatabaseEncoding() } != pg_sys::pg_enc::PG_UTF8 as i32 {
        UsageError::new(
            ERRCODE_FEATURE_NOT_SUPPORTED,
            "chat_backfill needs a UTF8 database",
            "Open WebUI's databases are UTF8; run the backfill in one.",
        )
        .raise();
    }
    let source = resolve(source, "chat", "source");
    let target = resolve(target, "chat_message", "target");
    check_source(&source, id_column, user_id_column, chat_column);
    let id_type = column_type_name(&source, id_column);
    check_target(&target);
    let run_id = Spi::get_one::<i64>("SELECT txid_current()").ok().flatten().expect("txid_current()");
    Settings {
        source,
        target,
        batch_size: batch_size as usize,
        now: now.unwrap_or_else(crate::api::transaction_start_epoch),
        source_filter: source_filter.filter(|f| !f.trim().is_empty()).map(str::to_owned),
        id_column: id_column.to_owned(),
        user_id_column: user_id_column.to_owned(),
        chat_column: chat_column.to_owned(),
        dry_run,
        run_id,
        id_type,
    }
}
