//! What works on a hot standby or in a read-only transaction. pgrx's `Spi::get_one*` and
//! `Spi::run*` take every statement for a write and assign a transaction id first, which a
//! standby refuses (XX000 "cannot assign TransactionIds during recovery") and which spends an
//! xid on a lookup: the checks every entry point runs before it reads anything go through
//! `get_one` here instead. What writes says so up front, with 25006 and a hint.

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::{FromDatum, IntoDatum};

use crate::pg::error::{Error, Result};

/// The first column of the first row of a statement that only reads (no transaction id).
pub fn get_one<T: FromDatum + IntoDatum>(query: &str, args: &[DatumWithOid<'_>]) -> pgrx::spi::Result<Option<T>> {
    Spi::connect(|client| client.select(query, Some(1), args)?.first().get_one())
}

/// Where this session cannot write: `Some("on a standby")`, `Some("in a read-only
/// transaction")`, or `None`.
pub fn cannot_write() -> Option<&'static str> {
    // SAFETY: reads the backend's recovery state and its transaction's read-only flag.
    let (recovery, read_only) = unsafe { (pg_sys::RecoveryInProgress(), pg_sys::XactReadOnly) };
    if recovery {
        Some("on a standby")
    } else if read_only {
        Some("in a read-only transaction")
    } else {
        None
    }
}

/// 25006 for `action` where this session cannot write.
pub fn refuse(action: &str, hint: &str) -> Result<()> {
    match cannot_write() {
        None => Ok(()),
        Some(place) => Err(Error::new(
            pgrx::PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            format!("cannot {action} {place}"),
            hint.to_owned(),
        )),
    }
}

/// The hint for the forms that write rows.
pub const WRITES_HINT: &str = "Run the backfill on the primary, in a read-write transaction. On a standby, \
    backfill_chat_messages(dry_run => true), chat_backfill.verify(), chat_messages() and chat_backfill.status work.";
