//! Admission control for the one-transaction form: before it reads anything,
//! `backfill_chat_messages()` estimates its WAL (the same trial as `plan()`, which writes
//! nothing into the target) and refuses a
//! run over `chat_backfill.max_atomic_wal` (default: the server's max_wal_size), which
//! would hold one transaction open for that long and lose everything to one cancel or
//! disconnect. Better refused at once, with the form that fits named, than killed halfway.
//!
//! Admission is paid by every run, so it looks twice only where it must: first with a
//! sample in proportion to the source (`Depth::Quick`: its cost is a share of the run's, not
//! a fixed 16 MB that was 9% of a one-second run), which admits a run estimated at no more
//! than QUICK_ADMITS of the limit; nearer the limit, or above it, `plan()`'s own estimate
//! decides, so a refusal always rests on the full sample.

use std::time::Instant;

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED;

use crate::engine::request::Settings;
use crate::pg::error::{Error, Result};
use crate::planning::estimate::{self, pretty, Depth, Estimate, Sampling};

/// The share of the limit under which the first look admits a run: room for the smaller
/// sample to fall short by half (on the benchmark data and the skewed set, 4 MB samples were
/// within 0.90 to 1.09 of the run's WAL).
const QUICK_ADMITS: f64 = 0.5;

pub fn admit(settings: &Settings) -> Result<()> {
    let began = Instant::now();
    let (limit, limit_name) = estimate::atomic_wal_limit()?;
    // What admission costs a run (bench/plan.py reads it at DEBUG1).
    let decided = |looks: &str, estimate: &Estimate| {
        debug1!(
            "chat_backfill admission: {:.4} s, {looks}, estimated WAL {:.0} B, limit {limit} B",
            began.elapsed().as_secs_f64(),
            estimate.wal_bytes
        );
    };
    // Only the WAL is wanted: neither the committing form's flushes nor compression are measured.
    let quick = estimate::measure(settings, false, Depth::Quick)?;
    if quick.wal_bytes <= limit as f64 * QUICK_ADMITS {
        decided("admitted at the first look", &quick);
        return Ok(());
    }
    let estimate = estimate::measure(settings, false, Depth::Full)?;
    if estimate.wal_bytes <= limit as f64 {
        decided("admitted at the second look", &estimate);
        return Ok(());
    }
    decided("refused at the second look", &estimate);
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
