//! `chat_backfill.plan()`: what a backfill will cost and whether the target is set up for
//! it, before anything is written. Estimates come from a trial run over a sample whose rows
//! go to a temporary table made like the target, rolled back (`estimate`); checks read the
//! catalog. One row per finding, so an operator reads
//! it as a report and a script picks the rows it needs by `item` and `status`.

use pgrx::datum::AnyNumeric;
use pgrx::prelude::*;

use crate::engine::request::Request;
use crate::pg::catalog::{check_target, resolve, Relation, UNIQUE_ON_COLUMN};
use crate::pg::error::{Error, Result};
use crate::planning::estimate::{self, pretty, Estimate, Sampling};

pub(crate) struct Finding {
    pub item: &'static str,
    /// estimate, info, ok, warning, fatal, unknown
    pub status: &'static str,
    pub value: Option<AnyNumeric>,
    pub unit: Option<&'static str>,
    pub detail: String,
    pub advice: Option<String>,
}

fn finding(item: &'static str, status: &'static str, detail: impl Into<String>) -> Finding {
    Finding { item, status, value: None, unit: None, detail: detail.into(), advice: None }
}

impl Finding {
    fn value(mut self, value: f64, unit: &'static str) -> Finding {
        let text = match unit {
            "seconds" => format!("{value:.1}"),
            // A sample of a big source is a small share: 0.042, not 0.0.
            "percent" => format!("{value:.3}"),
            _ => format!("{:.0}", value.round()),
        };
        self.value = AnyNumeric::try_from(text.as_str()).ok();
        self.unit = Some(unit);
        self
    }

    fn advice(mut self, advice: impl Into<String>) -> Finding {
        self.advice = Some(advice.into());
        self
    }
}

/// Estimates and checks for a backfill with these arguments (`chat_backfill.plan()`).
/// Writes nothing to the target: the trial's rows go to a temporary table, rolled back with
/// it (the target gets no dead tuple, and its triggers do not fire).
pub(crate) fn findings(request: Request<'_>) -> Result<Vec<Finding>> {
    // Said before anything else: every estimate is a trial that writes (a temporary table).
    estimate::refuse_read_only()?;
    let source = resolve(request.source, "chat", "source")?;
    let stored = estimate::source_bytes(source.oid)?;
    let mut out = vec![];
    if let Some(bytes) = stored {
        out.push(source_size(&source, bytes));
    }
    // A target that cannot take rows is the finding, not an error: the plan says what to fix.
    let target = match resolve(request.target, "chat_message", "target").and_then(|t| check_target(&t, false).map(|_| t)) {
        Ok(target) => target,
        Err(e) => {
            if stored.is_none() {
                out.push(unstored_source_size(&source, None));
            }
            out.push(fatal_target(e));
            out.push(finding("estimates", "unknown", "Not measured: the trial run needs a target that can take the rows."));
            return Ok(out);
        }
    };
    let settings = request.check()?;
    let estimate = estimate::measure(&settings, true, estimate::Depth::Full)?;
    if stored.is_none() {
        out.push(unstored_source_size(&source, Some(&estimate)));
    }
    out.extend(estimates(&estimate, settings.batch_size));
    out.push(finding("target", "ok", format!("{}: every column, and a unique index on id", target.name)));
    out.push(secondary_indexes(&target, &estimate)?);
    out.push(foreign_keys(&target)?);
    out.extend(deferred_constraints(&target)?);
    out.push(triggers(&target)?);
    out.push(compression(&target, &estimate));
    out.push(wal_size(&estimate)?);
    out.push(admission(&estimate)?);
    out.push(standbys()?);
    out.push(free_disk(&target, &estimate)?);
    Ok(out)
}

fn source_size(source: &Relation, bytes: i64) -> Finding {
    let bytes = bytes as f64;
    finding(
        "source_bytes",
        "info",
        format!("{}: {} with its TOAST and indexes (and those of the tables under it, if any)", source.name, pretty(bytes)),
    )
    .value(bytes, "bytes")
}

/// A view or a foreign table has no storage to measure: its chat text as the trial read
/// it, scaled like its rows (unknown without a trial).
fn unstored_source_size(source: &Relation, estimate: Option<&Estimate>) -> Finding {
    let what = format!("{} has no storage of its own (a view or a foreign table)", source.name);
    match estimate {
        None => finding("source_bytes", "unknown", format!("{what}: not measured without a trial run")),
        Some(e) => {
            let bytes = e.sampled_chat_bytes as f64 * e.scale;
            finding("source_bytes", "estimate", format!("{what}: about {} of chat text, from the rows the trial read", pretty(bytes)))
                .value(bytes, "bytes")
        }
    }
}

fn fatal_target(e: Error) -> Finding {
    finding("target", "fatal", e.message).advice(e.hint)
}

/// How the sample was measured, as the plan says it.
const TRIAL: &str = "expanded by the backfill's rules, the rows of its first 2 MB of chat text written into a temporary \
                     table made like the target (nothing written to the target)";

fn estimates(e: &Estimate, batch_size: usize) -> Vec<Finding> {
    let whole = e.sampling == Sampling::Whole;
    let how = if whole { "counted (the whole source was read)" } else { "estimated from the sample" };
    let scaled = format!(
        "chats scaled by {:.2} (rows per sampled row), messages, bytes and time by {:.2}{}",
        e.scale,
        e.byte_scale,
        if e.sampling == Sampling::Pages { " (the source's chat text per sampled byte, decompressed)" } else { "" }
    );
    let sample = match e.sampling {
        Sampling::Whole => format!("{} chats, the whole source, {TRIAL}", e.sampled_chats),
        Sampling::Pages => format!(
            "{} chats ({} as stored), {:.3}% of the source's pages, {TRIAL}; {scaled}",
            e.sampled_chats,
            pretty(e.sampled_chat_bytes as f64),
            e.sample_percent
        ),
        Sampling::FirstRows => format!(
            "the first {} chats ({} of text) of a source without pages to sample, {:.3}% of the rows the planner expects, \
             {TRIAL}; {scaled}: as good as the planner's row estimate, and biased towards \
             the chats the scan meets first",
            e.sampled_chats,
            pretty(e.sampled_chat_bytes as f64),
            e.sample_percent
        ),
    };
    let sample = if e.sampled_chats == 0 && !whole {
        format!("{sample}; no sampled chat passes source_filter, so the estimates are those of a run over almost nothing")
    } else {
        sample
    };
    vec![
        finding("sample", "info", sample).value(e.sample_percent, "percent"),
        finding("chats", "estimate", format!("chats to read, {how}")).value(e.chats, "chats"),
        finding("estimated_messages", "estimate", format!("chat_message rows the rules give, {how}"))
            .value(e.messages, "messages"),
        finding(
            "estimated_target_bytes",
            "estimate",
            format!(
                "{} added to the target with its TOAST and indexes (of which indexes {}){}",
                pretty(e.target_bytes),
                pretty(e.index_bytes.iter().map(|(_, b)| b).sum()),
                if e.unpriced.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; not counted: {}, which could not be made as in the target (an expression over a column \
                         the backfill does not write, or something this role may not use)",
                        e.unpriced.join(", ")
                    )
                }
            ),
        )
        .value(e.target_bytes, "bytes"),
        finding("estimated_wal_bytes", "estimate", format!("{} of WAL", pretty(e.wal_bytes))).value(e.wal_bytes, "bytes"),
        finding("estimated_seconds", "estimate", "SELECT * FROM backfill_chat_messages(): one transaction")
            .value(e.seconds, "seconds"),
        finding(
            "estimated_seconds_resumable",
            "estimate",
            format!(
                "CALL backfill_chat_messages_resumable(): about {:.0} batches of up to {batch_size} messages, each committed",
                e.batches.ceil()
            ),
        )
        .value(e.seconds_resumable, "seconds"),
    ]
}

/// Indexes other than the one ON CONFLICT (id) needs: each row updates each of them.
fn secondary_indexes(target: &Relation, e: &Estimate) -> Result<Finding> {
    let names: Vec<String> = Spi::connect(|client| -> Result<Vec<String>> {
        let rows = client.select(
            &format!(
                "SELECT pg_catalog.format('%I'::pg_catalog.text, c.relname) \
                   FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) i.indexrelid \
                  WHERE i.indrelid OPERATOR(pg_catalog.=) $1 AND NOT {UNIQUE_ON_COLUMN} ORDER BY 1"
            ),
            None,
            &[target.oid.into(), "id".into()],
        )?;
        let mut names = Vec::new();
        for row in rows {
            names.push(row.get::<String>(1)?.unwrap_or_default());
        }
        Ok(names)
    })?;
    if names.is_empty() {
        return Ok(finding("secondary_indexes", "ok", "none: each row updates only the unique index on id"));
    }
    let sized: Vec<String> = names
        .iter()
        .map(|n| match e.index_bytes.iter().find(|(i, _)| i == n) {
            Some((_, bytes)) => format!("{n} (about {})", pretty(*bytes)),
            None => n.clone(),
        })
        .collect();
    let share: f64 = e.index_bytes.iter().filter(|(n, _)| names.contains(n)).map(|(_, b)| b).sum();
    Ok(finding(
        "secondary_indexes",
        "warning",
        format!(
            "{} index(es) besides the unique one on id, each updated for every row: {}; {:.0}% of what the target grows by",
            names.len(),
            sized.join(", "),
            100.0 * share / e.target_bytes.max(1.0)
        ),
    )
    .value(names.len() as f64, "indexes")
    .advice(
        "For a large backfill, load in bulk-load order: drop these indexes, run the backfill, then CREATE INDEX \
         (one sorted build each, far cheaper than a row at a time), as examples/alembic/committing does.",
    ))
}

fn foreign_keys(target: &Relation) -> Result<Finding> {
    let keys = Spi::get_one_with_args::<String>(
        "SELECT pg_catalog.string_agg(pg_catalog.format('%I %s'::pg_catalog.text, conname, \
                pg_catalog.pg_get_constraintdef(oid)), '; '::pg_catalog.text ORDER BY conname) \
           FROM pg_catalog.pg_constraint WHERE conrelid OPERATOR(pg_catalog.=) $1 \
            AND contype OPERATOR(pg_catalog.=) 'f'::pg_catalog.char",
        &[target.oid.into()],
    )?;
    Ok(match keys {
        None => finding("foreign_keys", "ok", "none"),
        Some(keys) => finding("foreign_keys", "warning", format!("each row is checked against its parent: {keys}"))
            .advice(format!(
                "For a large backfill, drop the constraint, run the backfill, then add it back with NOT VALID and \
                 ALTER TABLE {} VALIDATE CONSTRAINT ..., which checks every row in one pass without blocking writes.",
                target.name
            )),
    })
}

/// The target's INITIALLY DEFERRED constraints, when it has any: the backfill checks them at
/// the end of each write instead of at COMMIT, so one violating chat is rejected, not the run.
fn deferred_constraints(target: &Relation) -> Result<Option<Finding>> {
    let names = Spi::get_one_with_args::<String>(
        "SELECT pg_catalog.string_agg(pg_catalog.format('%I %s'::pg_catalog.text, conname, \
                pg_catalog.pg_get_constraintdef(oid)), '; '::pg_catalog.text ORDER BY conname) \
           FROM pg_catalog.pg_constraint WHERE conrelid OPERATOR(pg_catalog.=) $1 AND condeferred",
        &[target.oid.into()],
    )?;
    Ok(names.map(|names| {
        finding(
            "deferred_constraints",
            "info",
            format!(
                "deferred constraints are checked at the end of each batch's write, not at COMMIT, so a row that \
                 violates one is rejected and recorded and the others are written: {names}"
            ),
        )
    }))
}

/// Triggers that fire on the backfill's INSERT (row or statement level) in this session's
/// session_replication_role; UPDATE, DELETE or TRUNCATE triggers, and those disabled or
/// set to fire only in the other role, do not.
fn triggers(target: &Relation) -> Result<Finding> {
    let names = Spi::get_one_with_args::<String>(
        "SELECT pg_catalog.string_agg(pg_catalog.format('%I (%s)'::pg_catalog.text, tgname, \
                CASE WHEN (tgtype::pg_catalog.int4 OPERATOR(pg_catalog.&) 1) OPERATOR(pg_catalog.<>) 0 \
                     THEN 'per row' ELSE 'per statement' END), ', '::pg_catalog.text ORDER BY tgname) \
           FROM pg_catalog.pg_trigger WHERE tgrelid OPERATOR(pg_catalog.=) $1 AND NOT tgisinternal \
            AND (tgtype::pg_catalog.int4 OPERATOR(pg_catalog.&) 4) OPERATOR(pg_catalog.<>) 0 \
            AND tgenabled OPERATOR(pg_catalog.=) ANY (CASE WHEN pg_catalog.current_setting('session_replication_role'::pg_catalog.text) \
                OPERATOR(pg_catalog.=) 'replica'::pg_catalog.text THEN '{R,A}'::pg_catalog.\"char\"[] ELSE '{O,A}'::pg_catalog.\"char\"[] END)",
        &[target.oid.into()],
    )?;
    Ok(match names {
        None => finding("triggers", "ok", "none fires on INSERT"),
        Some(names) => finding("triggers", "warning", format!("fire on the backfill's INSERTs: {names}")).advice(
            "The estimates leave them out (the trial writes a temporary table). If they only serve the application, consider disabling them for the \
             backfill (ALTER TABLE ... DISABLE TRIGGER) and doing their work afterwards in one statement.",
        ),
    })
}

/// How the target compresses what the backfill writes, and where it is pglz on a server with
/// lz4, what lz4 would change, measured on the trial's rows. The backfill never changes a
/// column's compression itself: the operator decides (lz4 is faster and usually a little
/// larger, and applies to values written after the change).
fn compression(target: &Relation, e: &Estimate) -> Finding {
    let Some(c) = &e.compression else {
        return finding(
            "compression",
            "ok",
            "nothing to compare: the values the backfill writes are compressed with lz4 already, or not at all, or this \
             server has no lz4",
        );
    };
    let seconds = e.seconds.max(f64::MIN_POSITIVE);
    let faster = seconds / (seconds - c.seconds_saved).max(seconds * 0.01);
    let larger = 100.0 * (c.lz4_bytes - c.pglz_bytes) / c.pglz_bytes.max(1.0);
    let alter = c.pglz_columns.iter().map(|col| format!("ALTER COLUMN {col} SET COMPRESSION lz4")).collect::<Vec<_>>();
    finding(
        "compression",
        "info",
        format!(
            "pglz compresses {}; on the sample's rows, lz4 would save about {:.1} s of the run ({faster:.2}x as \
             fast), and the table with its TOAST would take {} instead of {} ({larger:+.0}%)",
            c.pglz_columns.join(", "),
            c.seconds_saved,
            pretty(c.lz4_bytes),
            pretty(c.pglz_bytes)
        ),
    )
    .value(c.seconds_saved, "seconds")
    .advice(format!(
        "If that trade suits: ALTER TABLE {} {} before the backfill (it applies to values written from \
         then on; existing ones keep theirs). The backfill honours each column's setting and never changes it.",
        target.name,
        alter.join(", ")
    ))
}

fn wal_size(e: &Estimate) -> Result<Finding> {
    let max = estimate::max_wal_size()? as f64;
    let detail = format!("estimated WAL {} against max_wal_size {}", pretty(e.wal_bytes), pretty(max));
    Ok(if e.wal_bytes <= max {
        finding("max_wal_size", "ok", detail)
    } else {
        finding("max_wal_size", "warning", detail).advice(format!(
            "The run forces about {:.0} checkpoints (each writes full-page images again). Raise max_wal_size for the \
             backfill, and use the committing form, whose WAL can be recycled as it goes.",
            (e.wal_bytes / max.max(1.0)).floor()
        ))
    })
}

/// What admission control will say to the one-transaction form with these settings.
fn admission(e: &Estimate) -> Result<Finding> {
    let (limit, name) = estimate::atomic_wal_limit()?;
    let detail = format!("estimated WAL {} against {name} = {}", pretty(e.wal_bytes), pretty(limit as f64));
    Ok(if e.wal_bytes <= limit as f64 {
        finding("admission", "ok", format!("backfill_chat_messages() will run: {detail}"))
    } else {
        finding("admission", "warning", format!("backfill_chat_messages() will refuse with 53400: {detail}"))
            .advice("Use CALL backfill_chat_messages_resumable(), or pass force => true to run in one transaction anyway.")
    })
}

fn standbys() -> Result<Finding> {
    let n = Spi::get_one::<i64>("SELECT pg_catalog.count(*) FROM pg_catalog.pg_stat_replication")?.unwrap_or(0);
    Ok(if n == 0 {
        finding("standbys", "ok", "no standby or subscriber is connected")
    } else {
        finding("standbys", "warning", format!("{n} standby(s) or subscriber(s) connected: they replay what the backfill writes"))
            .value(n as f64, "standbys")
            .advice(
                "Use the committing form with max_replica_lag => '256MB' (say), so it waits while they fall behind; \
                 the caller needs pg_monitor to see their lag.",
            )
    })
}

/// Free space where the target's files and the WAL go: read with statvfs, for roles that
/// may see server internals (pg_monitor or superuser), as PostgreSQL's own monitoring
/// functions are.
fn free_disk(target: &Relation, e: &Estimate) -> Result<Finding> {
    let allowed = Spi::get_one::<bool>(
        "SELECT pg_catalog.pg_has_role(CURRENT_USER, 'pg_monitor'::pg_catalog.name, 'USAGE'::pg_catalog.text) \
         OR (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) CURRENT_USER)",
    )?
    .unwrap_or(false);
    if !allowed {
        return Ok(finding("free_disk", "unknown", "not read: it needs pg_monitor").advice("GRANT pg_monitor TO the caller to see it."));
    }
    let tablespace = Spi::get_one_with_args::<pg_sys::Oid>(
        "SELECT CASE WHEN c.reltablespace OPERATOR(pg_catalog.=) 0::pg_catalog.oid THEN d.dattablespace ELSE c.reltablespace END \
           FROM pg_catalog.pg_class c, pg_catalog.pg_database d \
          WHERE c.oid OPERATOR(pg_catalog.=) $1 AND d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()",
        &[target.oid.into()],
    )?
    .unwrap_or(pg_sys::Oid::from(pg_sys::DEFAULTTABLESPACE_OID));
    // SAFETY: DataDir is set once at startup to the data directory's absolute path.
    let data_dir = unsafe { std::ffi::CStr::from_ptr(pg_sys::DataDir) }.to_string_lossy().into_owned();
    let table_dir = if tablespace == pg_sys::Oid::from(pg_sys::DEFAULTTABLESPACE_OID) {
        format!("{data_dir}/base")
    } else {
        format!("{data_dir}/pg_tblspc/{}", u32::from(tablespace))
    };
    let wal_dir = format!("{data_dir}/pg_wal");
    let (Some(table_free), Some(wal_free)) = (free_bytes(&table_dir), free_bytes(&wal_dir)) else {
        return Ok(finding("free_disk", "unknown", "statvfs failed on the data directory"));
    };
    let same = device(&table_dir) == device(&wal_dir);
    let need_table = e.target_bytes;
    // WAL is recycled at checkpoints: what must fit at once is about max_wal_size. (A slot or
    // archiving that holds WAL back is not looked at: then all of it must fit.)
    let need_wal = e.wal_bytes.min(estimate::max_wal_size()? as f64);
    let (short, detail) = if same {
        (need_table + need_wal > table_free as f64, format!("{} free for the table and WAL (one file system)", pretty(table_free as f64)))
    } else {
        (
            need_table > table_free as f64 || need_wal > wal_free as f64,
            format!("{} free for the table, {} for WAL", pretty(table_free as f64), pretty(wal_free as f64)),
        )
    };
    let detail = format!("{detail}; the backfill needs about {} for the table and up to {} of WAL", pretty(need_table), pretty(need_wal));
    Ok(if short {
        finding("free_disk", "fatal", detail).advice("Free or add disk first: a full disk stops the whole server, not only the backfill.")
    } else {
        finding("free_disk", "ok", detail)
    }
    .value(table_free as f64, "bytes"))
}

fn free_bytes(path: &str) -> Option<u64> {
    let path = std::ffi::CString::new(path).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: statvfs writes the struct it is given and reads only the NUL-terminated path.
    if unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let stat = unsafe { stat.assume_init() };
    Some(stat.f_bavail as u64 * stat.f_frsize as u64)
}

fn device(path: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.dev())
}
