//! Estimating a backfill before it runs, for `plan()` and for admission control. A
//! repeatable sample of the source's pages (`TABLESAMPLE SYSTEM`, about
//! `chat_backfill.plan_sample_size` of the source as stored; of a partitioned table or an
//! inheritance parent, of every table under it) goes through the real engine: every chat is
//! read and expanded by the rules and its rows counted, and the rows of the first
//! CALIBRATION_CHAT_BYTES of chat text are written into a temporary table made like the
//! target (`calibration`: its columns' types, storage and compression, and its indexes), in
//! a subtransaction that is always rolled back. The target itself gets nothing: no dead
//! tuple, no WAL, no trigger. What that table grew by and what the writing took price the
//! rows; the target's WAL is that growth times measured factors; all of it is scaled up to
//! the whole source. A source that fits in the sample is read whole, and its counts are
//! exact. A source without pages to sample (a view, a foreign table) is read from its start
//! until the sample size of chat text has gone through, and scaled by the planner's
//! estimate of its rows. Either way the trial reads a bounded amount.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use pgrx::PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION;
use pgrx::prelude::*;

use crate::engine::backfill::Backfill;
use crate::engine::read::{sample_clause, source_where};
use crate::engine::request::Settings;
use crate::pg::catalog::INHERITANCE_TREE;
use crate::pg::error::{Error, Result};
use crate::pg::gucs;
use crate::pg::subxact::in_rolled_back_subtransaction;
use crate::planning::calibration::{Calibration, Compression, Sizes};

/// Chat text whose rows a trial writes into its temporary table to price them; the rest of
/// the sample is expanded and counted only. Enough for a stable compression ratio and
/// index growth, small beside the run it prices (the writing is most of a run's cost).
const CALIBRATION_CHAT_BYTES: usize = 2 << 20;
/// Admission's first look (`Depth::Quick`): a sample of the source's stored bytes divided by
/// QUICK_SHARE, at least QUICK_MIN_BYTES (and at most the setting), of which the rows of the
/// first QUICK_CALIBRATION_BYTES of chat text are written. Its cost grows with the source, as
/// the run's does: the full sample cost up to 9% of a one-second run of many small chats
/// (issue 23's skewed set), most of it in expanding and writing, not in the catalog work.
const QUICK_SHARE: i64 = 64;
const QUICK_MIN_BYTES: i64 = 1 << 20;
const QUICK_CALIBRATION_BYTES: usize = 512 << 10;
/// Messages per batch while a page sample is written, so that the writing stops close to
/// CALIBRATION_CHAT_BYTES (a run's batch holds up to 8 MB of rows). Not for a source read
/// whole, whose batches are counted as the run will cut them.
const CALIBRATION_BATCH: usize = 100;
/// WAL a write into the target produces (a temporary table writes none): per byte the
/// heap and its TOAST grow by, and per index entry (a record each, whatever the entry's
/// size: an index's WAL follows its entries, not its bytes). Fitted with `bench/plan.py` on
/// PostgreSQL 15 on two data sets, one of big messages and one of many small ones, in both
/// DDL modes (BENCHMARKS.md): a factor on index bytes fitted one set at 1.4 and the other at
/// 3.2; a cost per entry fits both within 0.92 to 1.03.
const WAL_PER_TABLE_BYTE: f64 = 0.95;
const WAL_PER_INDEX_ENTRY: f64 = 100.0;
/// Writing rows into the target costs this many times writing them into the temporary
/// table (it measured the same there: shared buffers against local ones, foreign key
/// checks), plus, for what a temporary table does not do, a second per this many bytes of
/// WAL (inserting it, writing it out when its buffers fill) and this long per index entry
/// logged, fitted likewise.
const WRITE_COST: f64 = 1.0;
const WAL_BYTES_PER_SECOND: f64 = 4.0e8;
const SECONDS_PER_INDEX_ENTRY: f64 = 1.4e-6;

/// How much a trial reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// `chat_backfill.plan_sample_size` of the source, the rows of its first
    /// CALIBRATION_CHAT_BYTES of chat text written: plan(), and admission near its limit.
    Full,
    /// A sample in proportion to the source (QUICK_SHARE), less written: admission's first
    /// look, which only has to tell a run far below its limit.
    Quick,
}

/// What the trial read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampling {
    /// The whole source: counts are exact.
    Whole,
    /// A repeatable sample of the source's pages.
    Pages,
    /// The first rows of a source without pages (a view), up to the sample size of chat text.
    FirstRows,
}

#[derive(Debug, Clone)]
pub struct Estimate {
    pub sampling: Sampling,
    /// Share of the source read, in percent (100: all of it): of its pages, or, for
    /// `FirstRows`, of the rows the planner expects.
    pub sample_percent: f64,
    /// The source's rows per row sampled (scales counts).
    pub scale: f64,
    /// The source's stored bytes per sampled chat byte (scales bytes and time).
    pub byte_scale: f64,
    pub sampled_chats: i64,
    /// The sampled chats' bytes: as stored (compressed) for a page sample, as read otherwise.
    pub sampled_chat_bytes: i64,
    pub chats: f64,
    /// Rows the rules give (written, already present, or rejected by the target).
    pub messages: f64,
    /// Growth of the target with its TOAST table and indexes.
    pub target_bytes: f64,
    /// Each index's share of that growth.
    pub index_bytes: Vec<(String, f64)>,
    /// The target's indexes and generated columns the trial could not copy (an expression
    /// over a column the engine does not write): not in the bytes.
    pub unpriced: Vec<String>,
    pub wal_bytes: f64,
    /// The one-transaction form.
    pub seconds: f64,
    /// Batches of the committing form.
    pub batches: f64,
    /// The committing form: the same work plus a WAL flush per batch.
    pub seconds_resumable: f64,
    /// For plan(): what lz4 would change where the target compresses with pglz.
    pub compression: Option<CompressionAdvice>,
}

/// lz4 against pglz, measured on the trial's rows and scaled like them.
#[derive(Debug, Clone)]
pub struct CompressionAdvice {
    pub pglz_columns: Vec<String>,
    /// Time the run would save (the compression's share of it), and what the target's table
    /// and TOAST would take with each method.
    pub seconds_saved: f64,
    pub pglz_bytes: f64,
    pub lz4_bytes: f64,
}

/// Measures a trial run of `settings` over a sample of its source (nothing stays written).
/// `full`: plan()'s estimate, which also prices the committing form's COMMITs (one WAL
/// flush, `seconds_resumable`; zero otherwise) and compares compressions; admission control
/// needs only the WAL.
pub fn measure(settings: &Settings, full: bool, depth: Depth) -> Result<Estimate> {
    refuse_read_only()?;
    let source = source_size(settings.source.oid)?;
    let setting = gucs::plan_sample_bytes();
    let (budget, calibration) = match depth {
        Depth::Full => (setting, CALIBRATION_CHAT_BYTES),
        Depth::Quick => {
            ((source.stored / QUICK_SHARE).clamp(QUICK_MIN_BYTES.min(setting), setting), QUICK_CALIBRATION_BYTES)
        }
    };
    if !source.has_pages {
        return first_rows(settings, full, budget, calibration);
    }
    let mut percent = if source.total <= budget { 100.0 } else { 100.0 * budget as f64 / source.total as f64 };
    // A sample that lands on no chat passing source_filter is read once more, ten times
    // bigger; no more, so that a filter passing almost nothing never makes the trial read the
    // whole source. (What it then estimates is a run over what the bigger sample found:
    // nothing, or little.) A sample that lands on no row at all says nothing of the filter:
    // the share is of the source's bytes, and a heavily toasted table has few heap pages to
    // draw, maybe less than one at this share. It grows tenfold until it holds a row (of a
    // source that has rows, a handful of pages; reading them is the trial, bounded by the
    // rows on those pages).
    let mut most = (percent * 10.0).min(100.0);
    let sample = loop {
        check_for_interrupts!();
        let sample = count_sample(settings, percent)?;
        if percent >= 100.0 || (sample.rows > 0 && (sample.chats > 0 || percent >= most)) {
            break sample;
        }
        if sample.rows == 0 {
            most = (most * 10.0).min(100.0);
            percent = (percent * 10.0).min(100.0);
        } else {
            percent = most;
        }
    };
    // What the sample saw is scaled by the source's rows per sampled row. SYSTEM sampling
    // reads whole pages, whose row counts vary (a page of toasted chats holds many rows), so
    // where ANALYZE or VACUUM measured the tables' density, the row count comes from it, as
    // the planner's does; otherwise from the share of pages read. Never below 1: the source
    // holds at least the rows sampled, whatever stale statistics say.
    let scale = if percent >= 100.0 {
        1.0
    } else {
        match source.rows {
            Some(rows) if sample.rows > 0 => (rows / sample.rows as f64).max(1.0),
            _ => 100.0 / percent,
        }
    };
    // WAL, table growth and time follow the bytes of chat, not the number of chats, and chat
    // sizes are heavy-tailed: one chat of tens of MB is in a page sample or not. So those are
    // scaled by the source's heap and TOAST bytes (which the catalog knows exactly) per
    // stored byte of the sampled chats: a sample that missed the giants still prices their
    // bytes at the rate it measured. (Other columns and dead rows count as chat here, so a
    // bloated table is overestimated, the safe side.)
    // Scaled by the chat text itself, decompressed, of the whole source against the sample's
    // (both read from the heap alone: a toasted value's pointer holds its raw size). The
    // source's bytes as stored priced a chat the sample missed at the sample's compression:
    // one giant that compresses 50x was then a fiftieth of its rows (issue 23's skewed set, the
    // sixteenth review). Where the sample holds no text, by bytes as stored.
    let byte_scale = if percent >= 100.0 {
        scale
    } else {
        let (_, whole) = raw_chat_bytes(settings, None)?;
        let (_, sampled) = raw_chat_bytes(settings, Some(percent))?;
        if sampled > 0 {
            (whole as f64 / sampled as f64).max(1.0)
        } else if sample.all_bytes > 0 {
            (source.stored as f64 / sample.all_bytes as f64).max(1.0)
        } else {
            scale
        }
    };
    let sampled = (percent < 100.0).then_some(percent);
    let trial = run_trial(settings, sampled, full, None, calibration)?;
    let sampling = if sampled.is_some() { Sampling::Pages } else { Sampling::Whole };
    let measured = Measured { sampling, percent, scale, byte_scale, chats: sample.chats, chat_bytes: sample.bytes };
    scale_up(settings, &measured, &trial)
}

/// A source without pages (a view, a foreign table): its first rows, until `budget` bytes
/// of chat text have been read, scaled by the planner's estimate of the rows that pass the
/// filter. Biased towards what the scan meets first, and as good as the planner's estimate:
/// the plan says so.
fn first_rows(settings: &Settings, full: bool, budget: i64, calibration: usize) -> Result<Estimate> {
    let trial = run_trial(settings, None, full, Some(budget.max(1) as usize), calibration)?;
    let (sampling, scale, percent) = if trial.whole || trial.chats == 0 {
        (Sampling::Whole, 1.0, 100.0)
    } else {
        let planned = planner_rows(settings)?;
        let scale = (planned / trial.chats as f64).max(1.0);
        (Sampling::FirstRows, scale, 100.0 / scale)
    };
    let measured = Measured { sampling, percent, scale, byte_scale: scale, chats: trial.chats, chat_bytes: trial.chat_bytes as i64 };
    scale_up(settings, &measured, &trial)
}

/// How the sample relates to the source.
struct Measured {
    sampling: Sampling,
    percent: f64,
    scale: f64,
    byte_scale: f64,
    /// The chats sampled, and their bytes.
    chats: i64,
    chat_bytes: i64,
}

fn scale_up(settings: &Settings, m: &Measured, trial: &Trial) -> Result<Estimate> {
    // The rows written into the trial's table are a part of the sample's (those of its first
    // CALIBRATION_CHAT_BYTES of chat text): their growth and time per byte of rows price the
    // rest, which were only expanded and counted. (Per byte of rows, not of chat text: a chat
    // split across batches is read whole before all its rows are written.)
    let priced = trial.row_bytes as f64 / trial.written_row_bytes.max(1) as f64;
    let scale = |bytes: i64| bytes.max(0) as f64 * priced * m.byte_scale;
    let table_bytes = scale(trial.growth.table);
    let index_bytes: Vec<(String, f64)> = trial.growth.indexes.iter().map(|(n, b)| (n.clone(), scale(*b))).collect();
    let index_total: f64 = index_bytes.iter().map(|(_, b)| b).sum();
    // Messages follow the chat text too (each carries its own), not the number of chats:
    // scaled by rows, a page sample that missed one chat of thousands of messages, or hit
    // it, was off by up to 2x either way on the benchmark data.
    let messages = trial.messages as f64 * m.byte_scale;
    // Batches end at batch_size messages or at a size limit (8 MB of rows, 64 MB of chat
    // text), whichever comes first. The trial's last batch is partial: its full batches,
    // scaled by bytes, count the size-cut ones; messages over batch_size the rest.
    let batches = if m.sampling == Sampling::Whole {
        trial.batches
    } else if messages > 0.0 {
        (messages / settings.batch_size as f64).ceil().max((trial.batches - 1.0).max(0.0) * m.byte_scale).max(1.0)
    } else {
        0.0
    };
    let flush_per_batch = if synchronous_commit_off()? { 0.0 } else { trial.commit.as_secs_f64() };
    let expanding = trial.working.saturating_sub(trial.writing).as_secs_f64();
    // What the constants below were fitted from (bench/plan.py reads it at DEBUG1).
    debug1!(
        "chat_backfill trial: expanding {expanding:.4} s, writing {:.4} s, priced x{priced:.3}, bytes x{:.3}, \
         rows x{:.3}, messages {}, table {} B, indexes {} B, chat {} B, rows {} B, written {} B",
        trial.writing.as_secs_f64(),
        m.byte_scale,
        m.scale,
        trial.messages,
        trial.growth.table,
        trial.growth.indexes.iter().map(|(_, b)| b).sum::<i64>(),
        trial.chat_bytes,
        trial.row_bytes,
        trial.written_row_bytes
    );
    // Every row has an entry in every index made like the target's.
    let index_entries = messages * index_bytes.len() as f64;
    let (wal, logging) = if trial.logged {
        let wal = table_bytes * WAL_PER_TABLE_BYTE + index_entries * WAL_PER_INDEX_ENTRY;
        (wal, wal / WAL_BYTES_PER_SECOND + index_entries * SECONDS_PER_INDEX_ENTRY)
    } else {
        (0.0, 0.0)
    };
    let seconds = (expanding + trial.writing.as_secs_f64() * priced * WRITE_COST) * m.byte_scale + logging;
    Ok(Estimate {
        sampling: m.sampling,
        sample_percent: m.percent,
        scale: m.scale,
        byte_scale: m.byte_scale,
        sampled_chats: m.chats,
        sampled_chat_bytes: m.chat_bytes,
        chats: m.chats as f64 * m.scale,
        messages,
        target_bytes: table_bytes + index_total,
        wal_bytes: wal,
        index_bytes,
        unpriced: trial.unpriced.clone(),
        seconds,
        batches,
        seconds_resumable: seconds + flush_per_batch * batches,
        compression: trial.compression.as_ref().map(|c| CompressionAdvice {
            pglz_columns: c.pglz_columns.clone(),
            seconds_saved: c.pglz.0.saturating_sub(c.lz4.0).as_secs_f64() * priced * m.byte_scale,
            pglz_bytes: scale(c.pglz.1),
            lz4_bytes: scale(c.lz4.1),
        }),
    })
}

/// What the trial run cost.
struct Trial {
    /// Chats read, messages the rules gave, batches (the run's: small batches written to
    /// price rows count as the run's batches would hold their messages).
    chats: i64,
    messages: i64,
    batches: f64,
    /// Chat text read, in bytes; the bytes of the rows it gave, and of those written.
    chat_bytes: usize,
    row_bytes: usize,
    written_row_bytes: usize,
    /// Whether it read its source to the end.
    whole: bool,
    /// Time reading, expanding and writing, and of it writing.
    working: Duration,
    writing: Duration,
    /// One WAL flush, as a COMMIT waits for.
    commit: Duration,
    /// The trial table's growth, and the target's indexes it could not copy.
    growth: Sizes,
    unpriced: Vec<String>,
    /// plan() only: the written rows compressed both ways.
    compression: Option<Compression>,
    /// Whether the target writes WAL (an unlogged one writes none for its rows).
    logged: bool,
}

/// Runs the engine over `sample_percent` of the source (all: `None`), stopping once
/// `budget` bytes of chat text have gone through, in a subtransaction that is rolled back.
/// The rows of the first `calibration_bytes` of chat text are written into a temporary
/// table made like the target (`calibration`); the rest are expanded and counted only.
fn run_trial(
    settings: &Settings,
    sample_percent: Option<f64>,
    full: bool,
    budget: Option<usize>,
    calibration_bytes: usize,
) -> Result<Trial> {
    let mut trial = settings.clone();
    trial.sample_percent = sample_percent;
    trial.trial = true;
    trial.dry_run = false;
    in_rolled_back_subtransaction(AssertUnwindSafe(|| -> Result<Trial> {
        let table = Calibration::create(&settings.target, settings.rows.is_app())?;
        // Making the table wrote its catalog rows to the WAL: flushing them costs what a
        // committing batch's COMMIT waits for.
        let commit = if full { flush_wal() } else { Duration::ZERO };
        trial.target = table.table.clone();
        let small_batches = sample_percent.is_some() && trial.batch_size > CALIBRATION_BATCH;
        if small_batches {
            trial.batch_size = CALIBRATION_BATCH;
        }
        let mut run = Backfill::start(trial)?;
        // Preparing the statements is paid once per run, not per byte: not timed.
        let began = Instant::now();
        let mut whole = true;
        let mut calibrated = false;
        let mut calibration = (0, 0);
        while run.next_batch()?.is_some() {
            if !calibrated && run.chat_bytes_read() >= calibration_bytes {
                calibrated = true;
                run.count_only();
                if small_batches {
                    let (totals, batches) = run.totals();
                    calibration = (batches, totals.messages_inserted + totals.messages_existing + totals.messages_rejected);
                    run.set_batch_size(settings.batch_size);
                }
            }
            if budget.is_some_and(|b| run.chat_bytes_read() >= b) && run.totals().0.chats_read > 0 {
                run.stop();
                whole = false;
                break;
            }
        }
        let working = began.elapsed();
        let (totals, batches) = run.totals();
        let (chats, messages) = (
            // (chats_read counts the skipped chats too.)
            totals.chats_read,
            totals.messages_inserted + totals.messages_existing + totals.messages_rejected,
        );
        let chat_bytes = run.chat_bytes_read();
        let writing = run.writing();
        let (row_bytes, written_row_bytes) = run.row_bytes();
        drop(run);
        if small_batches && !calibrated {
            calibration = (batches, messages);
        }
        // The small batches written count as the run's batches would hold their messages.
        let batches = if calibration.0 > 0 {
            f64::from(batches - calibration.0) + calibration.1 as f64 / settings.batch_size as f64
        } else {
            f64::from(batches)
        };
        Ok(Trial {
            chats,
            messages,
            batches,
            chat_bytes,
            row_bytes,
            written_row_bytes,
            whole,
            working,
            writing,
            commit,
            growth: table.growth()?,
            compression: if full { table.compare_compression()? } else { None },
            unpriced: table.unpriced,
            logged: table.logged,
        })
    }))
}

/// The trial writes (and rolls back): a standby or a read-only transaction cannot run it.
/// Said up front, with what to do, rather than as the INSERT's own error.
pub fn refuse_read_only() -> Result<()> {
    match crate::pg::read_only::cannot_write() {
        None => Ok(()),
        Some(place) => Err(Error::new(
            ERRCODE_READ_ONLY_SQL_TRANSACTION,
            format!("cannot estimate a backfill {place}: the estimate writes a sample into a temporary table"),
            "Run chat_backfill.plan() and the backfill on the primary, in a read-write transaction.",
        )),
    }
}

/// The source as the catalog knows it: with a partitioned table or an inheritance parent,
/// every table under it (a backfill reads them all).
struct SourceSize {
    /// Whether it has pages to sample (a table, a materialized view, or a parent of tables).
    has_pages: bool,
    /// With TOAST and indexes, in bytes.
    total: i64,
    /// Heap and TOAST, in bytes (indexes are not read by the backfill).
    stored: i64,
    /// Rows now, from the density statistics recorded (`None`: a table with pages was never
    /// measured, or its statistics say it is empty).
    rows: Option<f64>,
}

fn source_size(source: pg_sys::Oid) -> Result<SourceSize> {
    // The tree holds partitions and inheritance children alike. The aggregates are computed whatever
    // the outer CASE decides, so the division inside one guards itself.
    // Stored bytes are the files' sizes: dead rows and free space count as chat (the
    // statistics' live and dead tuple counters are too loose to correct for them: an
    // inheritance parent's live count can read 0), so a bloated source is overestimated,
    // the safe side.
    let sql = [INHERITANCE_TREE, ", \
                 sized AS ( \
                   SELECT c.relkind, c.reltuples::pg_catalog.float8 AS tuples, c.relpages::pg_catalog.float8 AS pages, \
                          pg_catalog.pg_total_relation_size(c.oid::pg_catalog.regclass) AS total, \
                          pg_catalog.pg_relation_size(c.oid::pg_catalog.regclass) OPERATOR(pg_catalog.+) \
                            CASE WHEN c.reltoastrelid OPERATOR(pg_catalog.=) 0::pg_catalog.oid THEN 0::pg_catalog.int8 \
                                 ELSE pg_catalog.pg_relation_size(c.reltoastrelid::pg_catalog.regclass) END AS stored, \
                          (pg_catalog.pg_relation_size(c.oid::pg_catalog.regclass) OPERATOR(pg_catalog./) \
                           pg_catalog.current_setting('block_size'::pg_catalog.text)::pg_catalog.int8)::pg_catalog.float8 AS blocks \
                     FROM tree JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) tree.relid) \
                 SELECT pg_catalog.bool_or(relkind OPERATOR(pg_catalog.=) ANY ('{r,m,p}'::pg_catalog.\"char\"[])) \
                          AND pg_catalog.bool_and(relkind OPERATOR(pg_catalog.<>) ALL ('{v,f}'::pg_catalog.\"char\"[])), \
                        pg_catalog.sum(total)::pg_catalog.int8, pg_catalog.sum(stored)::pg_catalog.int8, \
                        CASE WHEN pg_catalog.bool_and(blocks OPERATOR(pg_catalog.=) 0::pg_catalog.float8 \
                                  OR (tuples OPERATOR(pg_catalog.>) 0::pg_catalog.float8 AND pages OPERATOR(pg_catalog.>) 0::pg_catalog.float8)) \
                             THEN pg_catalog.sum(CASE WHEN blocks OPERATOR(pg_catalog.=) 0::pg_catalog.float8 \
                                                           OR pages OPERATOR(pg_catalog.<=) 0::pg_catalog.float8 THEN 0::pg_catalog.float8 \
                                                      ELSE tuples OPERATOR(pg_catalog./) pages OPERATOR(pg_catalog.*) blocks END) END \
                   FROM sized"].concat();
    let row = Spi::connect(|client| -> Result<(bool, i64, i64, Option<f64>)> {
        let row = client.select(sql.as_str(), None, &[source.into()])?.first();
        Ok((
            row.get::<bool>(1)?.unwrap_or(false),
            row.get::<i64>(2)?.unwrap_or(0),
            row.get::<i64>(3)?.unwrap_or(0),
            row.get::<f64>(4)?,
        ))
    })?;
    let (has_pages, total, stored, rows) = row;
    Ok(SourceSize { has_pages, total, stored, rows })
}

/// The planner's estimate of the source's rows that pass the filter.
fn planner_rows(settings: &Settings) -> Result<f64> {
    let sql = format!("EXPLAIN (FORMAT JSON) SELECT 1 FROM {}{}", settings.source.name, source_where(settings, None));
    let plan = Spi::get_one::<pgrx::datum::Json>(&sql)?;
    Ok(plan.and_then(|p| p.0.pointer("/0/Plan/Plan Rows").and_then(serde_json::Value::as_f64)).unwrap_or(1.0).max(1.0))
}

/// The rows of the source (of `percent` of its pages) that pass the filter, and the bytes
/// their chats hold decompressed, read without fetching any TOAST: a toasted value's raw
/// size is in its pointer in the heap, a compressed one's in its header.
fn raw_chat_bytes(settings: &Settings, percent: Option<f64>) -> Result<(i64, i64)> {
    let mut sampled = settings.clone();
    sampled.sample_percent = percent.filter(|p| *p < 100.0);
    let sql = format!(
        "SELECT {} FROM {}{}{}",
        pgrx::spi::quote_identifier(&settings.chat_column),
        settings.source.name,
        sample_clause(&sampled),
        source_where(settings, None)
    );
    Spi::connect(|client| -> Result<(i64, i64)> {
        let mut cursor = client.try_open_cursor(&sql, &[])?;
        let (mut rows, mut bytes) = (0i64, 0i64);
        loop {
            check_for_interrupts!();
            let mut table = cursor.fetch(1000)?;
            if table.is_empty() {
                break;
            }
            while table.next().is_some() {
                rows += 1;
                if let Some(datum) = table.get_datum_by_ordinal(1)? {
                    // SAFETY: a varlena datum of the row just fetched (the chat column is json,
                    // jsonb or text); toast_raw_datum_size reads its header or its TOAST pointer,
                    // never the TOAST table.
                    let raw = unsafe { pg_sys::toast_raw_datum_size(datum) };
                    bytes += (raw as i64 - pg_sys::VARHDRSZ as i64).max(0);
                }
            }
            drop(table);
            // SAFETY: the table just read is SPI's last, and nothing refers to it any more:
            // freed now, a scan of millions of rows holds one fetch at a time.
            unsafe { pg_sys::SPI_freetuptable(pg_sys::SPI_tuptable) };
        }
        Ok((rows, bytes))
    })
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

/// The source with its TOAST and indexes, in bytes: with a partitioned table or an
/// inheritance parent, every table under it.
/// The source's bytes with TOAST and indexes, summed over the tables under it; `None` for
/// a source without storage of its own (a view, a foreign table).
pub fn source_bytes(source: pg_sys::Oid) -> Result<Option<i64>> {
    let size = source_size(source)?;
    Ok(size.has_pages.then_some(size.total))
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
    crate::pg::read_only::get_one::<String>(
        "SELECT pg_catalog.pg_size_pretty($1::pg_catalog.int8)",
        &[(bytes.round().clamp(0.0, i64::MAX as f64) as i64).into()],
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| format!("{bytes:.0} bytes"))
}
