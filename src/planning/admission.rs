//! Admission control for the one-transaction form: before it reads anything,
//! `backfill_chat_messages()` estimates its WAL (the same trial as `plan()`, which writes
//! nothing into the target) and refuses a
//! run over `chat_backfill.max_atomic_wal` (default: the server's max_wal_size), which
//! would hold one transaction open for that long and lose everything to one cancel or
//! disconnect. Better refused at once, with the form that fits named, than killed halfway.

use pgrx::PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED;

use crate::engine::request::Settings;
use crate::pg::error::{Error, Result};
use crate::planning::estimate::{self, pretty, Sampling};

pub fn admit(settings: &Settings) -> Result<()> {
    let (limit, limit_name) = estimate::atomic_wal_limit()?;
    // Only the WAL is wanted: neither the committing form's flushes nor compression are measured.
    let estimate = estimate::measure(settings, false)?;
    if estimate.wal_bytes <= limit as f64 {
        return Ok(());
    }
    Err(Error::new(
        ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
        format!(
            "backfill_chat_messages() would write about {} of WAL in one transaction, more than {limit_name} ({})",
            pretty(estimate.wal_bytes),
            pretty(limit as f64)
        ),
        "Use CALL backfill_chat_messages_resumable(), which commits every batch and resumes where it stopped; \
         or pass force => true to run in one transaction anyway. SELECT * FROM chat_backfill.plan() shows the estimates.",
    )
    .with_detail(format!(
        "Estimated from {} chats ({}), expanded, their rows priced in a temporary table made like {}: about \
         {:.0} messages, {} of table and indexes, {:.0} s.",
        estimate.sampled_chats,
        match estimate.sampling {
            Sampling::Whole => format!("all of {}", settings.source.name),
            Sampling::Pages => format!("{:.3}% of {}'s pages", estimate.sample_percent, settings.source.name),
            Sampling::FirstRows => {
                format!("the first rows of {}, scaled by the planner's estimate of its rows", settings.source.name)
            }
        },
        settings.target.name,
        estimate.messages,
        pretty(estimate.target_bytes),
        estimate.seconds
    )))
}
