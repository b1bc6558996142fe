//! Estimating a backfill before it runs, for `plan()` and for admission control. A
//! repeatable sample of the source's pages (`TABLESAMPLE SYSTEM`, about
//! `chat_backfill.plan_sample_size` of the table as stored) goes through the real engine
//! into the real target, indexes, foreign keys and triggers included, in a subtransaction
//! that is always rolled back; what that cost (this backend's WAL, the target's growth,
//! the time) is scaled up to the whole source. A source that fits in the sample is read
//! whole, and its counts are exact.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use pgrx::prelude::*;

use crate::backfill::{sample_clause, source_where, Backfill, Settings};
use crate::error::Result;
use crate::gucs;
use crate::subxact::in_rolled_back_subtransaction;
use crate::throttle::wal_written;

#[derive(Debug, Clone)]
pub struct Estimate {
    /// Share of the source's pages read, in percent (100: all of it).
    pub sample_percent: f64,
    /// The source's rows per row sampled (scales counts).
    pub scale: f64,
    /// The source's stored bytes per sampled chat byte (scales bytes and time).
    pub byte_scale: f64,
    pub sampled_chats: i64,
    /// The sampled chats as stored (compressed), in bytes.
    pub sampled_chat_bytes: i64,
    pub chats: f64,
    /// Rows the rules give (written, already present, or rejected by the target).
    pub messages: f64,
    /// Growth of the target with its TOAST table and indexes.
    pub target_bytes: f64,
    /// Each index's share of that growth.
    pub index_bytes: Vec<(String, f64)>,
    pub wal_bytes: f64,
    /// The one-transaction form.
    pub seconds: f64,
    pub batches: f64,
    /// The committing form: the same work plus a WAL flush per batch.
    pub seconds_resumable: f64,
}

/// Measures a trial run of `settings` over a sample of its source (nothing stays written).
/// `time_commits`: also flush the WAL after each trial batch, as the committing form's
/// COMMITs do, to price them (`seconds_resumable`; zero otherwise).
pub fn measure(settings: &Settings, time_commits: bool) -> Result<Estimate> {
    let total = total_size(settings.source.oid)?;
    let budget = gucs::plan_sample_bytes();
    let mut percent = if total <= budget { 100.0 } else { 100.0 * budget as f64 / total as f64 };
    // A small sample of a big table may land on no chat: read ten times more, up to all.
    let sample = loop {
        let sample = count_sample(settings, percent)?;
        if sample.chats > 0 || percent >= 100.0 {
            break sample;
        }
        percent = (percent * 10.0).min(100.0);
    };
    // What the sample saw is scaled by the source's rows per sampled row. SYSTEM sampling
    // reads whole pages, whose row counts vary (a page of toasted chats holds many rows), so
    // where ANALYZE or VACUUM measured the table's density, the row count comes from it, as
    // the planner's does; otherwise from the share of pages read.
    let scale = if percent >= 100.0 {
        1.0
    } else {
        match table_rows(settings.source.oid)? {
            Some(rows) if sample.rows > 0 => rows / sample.rows as f64,
            _ => 100.0 / percent,
        }
    };
    // WAL, table growth and time follow the bytes of chat, not the number of chats, and chat
    // sizes are heavy-tailed: one chat of tens of MB is in a page sample or not. So those are
    // scaled by the source's heap and TOAST bytes (which the catalog knows exactly) per
    // stored byte of the sampled chats: a sample that missed the giants still prices their
    // bytes at the rate it measured. (Other columns and dead rows count as chat here, so a
    // bloated table is overestimated, the safe side.)
    let byte_scale = if percent >= 100.0 || sample.all_bytes <= 0 {
        scale
    } else {
        stored_bytes(settings.source.oid)? as f64 / sample.all_bytes as f64
    };
    let mut trial = settings.clone();
    trial.sample_percent = (percent < 100.0).then_some(percent);
    trial.trial = true;
    trial.dry_run = false;
    let target = settings.target.oid;
    let before = relation_sizes(target)?;
    let measured = in_rolled_back_subtransaction(AssertUnwindSafe(|| -> Result<Trial> {
        let mut run = Backfill::start(trial)?;
        // Preparing the statements is paid once per run, not per byte: not timed.
        let wal_before = wal_written();
        let began = Instant::now();
        let mut flushing = Duration::ZERO;
        while run.next_batch()?.is_some() {
            // The committing form's COMMIT after each batch waits for its WAL to reach disk.
            if time_commits {
                flushing += flush_wal();
            }
        }
        let (totals, batches) = run.totals();
        let messages = totals.messages_inserted + totals.messages_existing + totals.messages_rejected;
        drop(run);
        Ok(Trial {
            messages,
            batches,
            wal: wal_written().saturating_sub(wal_before),
            working: began.elapsed().saturating_sub(flushing),
            flushing,
            after: relation_sizes(target)?,
        })
    }))?;
    let growth = |name: &str| {
        let was = before.iter().find(|(n, _)| n == name).map_or(0, |(_, b)| *b);
        let now = measured.after.iter().find(|(n, _)| n == name).map_or(0, |(_, b)| *b);
        (now - was).max(0) as f64 * byte_scale
    };
    let commits = if synchronous_commit_off()? { 0.0 } else { measured.flushing.as_secs_f64() };
    let seconds = measured.working.as_secs_f64() * byte_scale;
    Ok(Estimate {
        sample_percent: percent,
        scale,
        byte_scale,
        sampled_chats: sample.chats,
        sampled_chat_bytes: sample.bytes,
        chats: sample.chats as f64 * scale,
        messages: measured.messages as f64 * scale,
        target_bytes: growth(""),
        index_bytes: measured.after.iter().filter(|(n, _)| !n.is_empty()).map(|(n, _)| (n.clone(), growth(n))).collect(),
        wal_bytes: measured.wal as f64 * byte_scale,
        seconds,
        batches: f64::from(measured.batches) * scale,
        seconds_resumable: seconds + commits * byte_scale,
    })
}

struct Trial {
    messages: i64,
    batches: i32,
    wal: u64,
    working: Duration,
    flushing: Duration,
    after: Vec<(String, i64)>,
}

/// The source's rows now, from the density its statistics recorded (`None`: never measured).
fn table_rows(source: pg_sys::Oid) -> Result<Option<f64>> {
    let (density, blocks) = Spi::get_two_with_args::<f64, f64>(
        "SELECT CASE WHEN c.reltuples OPERATOR(pg_catalog.>=) 0::pg_catalog.float4 AND c.relpages OPERATOR(pg_catalog.>) 0 \
                     THEN c.reltuples::pg_catalog.float8 OPERATOR(pg_catalog./) c.relpages::pg_catalog.float8 END, \
                (pg_catalog.pg_relation_size(c.oid::pg_catalog.regclass) OPERATOR(pg_catalog./) \
                 pg_catalog.current_setting('block_size'::pg_catalog.text)::pg_catalog.int8)::pg_catalog.float8 \
           FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) $1",
        &[source.into()],
    )?;
    Ok(density.zip(blocks).map(|(d, b)| d * b))
}

/// The source's heap and TOAST table, in bytes (its indexes are not read by the backfill).
fn stored_bytes(source: pg_sys::Oid) -> Result<i64> {
    Ok(Spi::get_one_with_args::<i64>(
        "SELECT pg_catalog.pg_relation_size(c.oid::pg_catalog.regclass) OPERATOR(pg_catalog.+) \
                CASE WHEN c.reltoastrelid OPERATOR(pg_catalog.=) 0::pg_catalog.oid THEN 0::pg_catalog.int8 \
                     ELSE pg_catalog.pg_relation_size(c.reltoastrelid::pg_catalog.regclass) END \
           FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) $1",
        &[source.into()],
    )?
    .unwrap_or(0))
}

/// What a sample holds, counted without reading its chats' TOAST.
struct Sample {
    /// Every row, and the stored bytes of their chats.
    rows: i64,
    all_bytes: i64,
    /// The chats that pass the filter, and their stored bytes.
    chats: i64,
    bytes: i64,
}

fn count_sample(settings: &Settings, percent: f64) -> Result<Sample> {
    let mut sampled = settings.clone();
    sampled.sample_percent = (percent < 100.0).then_some(percent);
    let count = |condition: &str| {
        let sql = format!(
            "SELECT pg_catalog.count(*), pg_catalog.sum(pg_catalog.pg_column_size({}))::pg_catalog.int8 FROM {}{}{condition}",
            pgrx::spi::quote_identifier(&settings.chat_column),
            settings.source.name,
            sample_clause(&sampled),
        );
        Spi::get_two::<i64, i64>(&sql).map(|(n, bytes)| (n.unwrap_or(0), bytes.unwrap_or(0)))
    };
    // Every row of the sample, filtered or not (the source's totals are of every row), then
    // the chats that pass the filter.
    let (rows, all_bytes) = count("")?;
    let (chats, bytes) = count(&source_where(settings, None))?;
    Ok(Sample { rows, all_bytes, chats, bytes })
}

/// The target's size with its TOAST (under ""), and each of its indexes by name.
fn relation_sizes(target: pg_sys::Oid) -> Result<Vec<(String, i64)>> {
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT ''::pg_catalog.text, pg_catalog.pg_total_relation_size($1::pg_catalog.regclass) \
             UNION ALL \
             SELECT pg_catalog.format('%I'::pg_catalog.text, c.relname), pg_catalog.pg_relation_size(c.oid::pg_catalog.regclass) \
               FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) i.indexrelid \
              WHERE i.indrelid OPERATOR(pg_catalog.=) $1",
            None,
            &[target.into()],
        )?;
        let mut sizes = Vec::new();
        for row in rows {
            sizes.push((row.get::<String>(1)?.unwrap_or_default(), row.get::<i64>(2)?.unwrap_or(0)));
        }
        Ok(sizes)
    })
}

/// Flushes this backend's WAL to disk, as a COMMIT does, and says how long it took.
fn flush_wal() -> Duration {
    let began = Instant::now();
    // SAFETY: XactLastRecEnd is the end of the last WAL record this backend inserted (zero:
    // none), a position every insertion has completed, which is exactly what COMMIT flushes
    // to. (The current insert position can lie past a page header no record has reached yet,
    // and XLogFlush refuses it.)
    unsafe {
        let end = pg_sys::XactLastRecEnd;
        if end != 0 {
            pg_sys::XLogFlush(end);
        }
    }
    began.elapsed()
}

fn synchronous_commit_off() -> Result<bool> {
    Ok(Spi::get_one::<String>("SELECT pg_catalog.current_setting('synchronous_commit'::pg_catalog.text)")?.as_deref()
        == Some("off"))
}

/// The table with its TOAST and indexes, in bytes.
pub fn total_size(relation: pg_sys::Oid) -> Result<i64> {
    Ok(Spi::get_one_with_args::<i64>(
        "SELECT pg_catalog.pg_total_relation_size($1::pg_catalog.regclass)",
        &[relation.into()],
    )?
    .unwrap_or(0))
}

/// The server's max_wal_size, in bytes.
pub fn max_wal_size() -> Result<i64> {
    Ok(Spi::get_one::<i64>(
        "SELECT pg_catalog.pg_size_bytes(pg_catalog.current_setting('max_wal_size'::pg_catalog.text))",
    )?
    .unwrap_or(0))
}

/// `chat_backfill.max_atomic_wal` in bytes (-1 there: max_wal_size), and the setting's
/// name to quote.
pub fn atomic_wal_limit() -> Result<(i64, &'static str)> {
    match gucs::max_atomic_wal() {
        Some(bytes) => Ok((bytes, "chat_backfill.max_atomic_wal")),
        None => Ok((max_wal_size()?, "max_wal_size (chat_backfill.max_atomic_wal is -1)")),
    }
}

/// Bytes as PostgreSQL prints them.
pub fn pretty(bytes: f64) -> String {
    Spi::get_one_with_args::<String>(
        "SELECT pg_catalog.pg_size_pretty($1::pg_catalog.int8)",
        &[(bytes.round().clamp(0.0, i64::MAX as f64) as i64).into()],
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| format!("{bytes:.0} bytes"))
}
