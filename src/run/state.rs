//! The committing form's run state in `chat_backfill.runs`, written with the caller's own
//! rights: row-level security admits a role only to runs whose source it can read and
//! whose target it can write. Every statement names its catalog objects explicitly.

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;

use crate::engine::read::source_where;
use crate::engine::report::{BatchReport, Partial};
use crate::engine::request::Settings;
use crate::pg::error::{Error, Result};

/// Where a CALL starts from.
pub enum Start {
    New,
    Resume { run_id: i64, last_key: Option<String>, high_water: String, now: i64, partial: Option<Partial> },
    Finished { run_id: i64, finished_at: String },
}

fn text_or_null(value: Option<&str>) -> DatumWithOid<'_> {
    value.map_or(DatumWithOid::null_oid(pg_sys::TEXTOID), DatumWithOid::from)
}

/// The latest run of this source and target that this CALL may go on with: the same rows
/// and source_filter (a run over other chats is not this one's, finished or not), and
/// started by this role or by one that the source's row-level security did not limit (a
/// run over the few chats a tenant sees, or one from before 0.7.0 that says nothing of it,
/// would leave the rest unwritten under a `finished` status). Row-level security on the
/// runs already hides other roles' runs from a role the source's policies limit.
pub fn start_point(settings: &Settings, restart: bool) -> Result<Start> {
    let args = || -> [DatumWithOid<'_>; 4] {
        [
            settings.source.name.as_str().into(),
            settings.target.name.as_str().into(),
            settings.rows.name().into(),
            text_or_null(settings.source_filter.as_deref()),
        ]
    };
    let latest = Spi::connect(|client| {
        let table = client.select(
            &format!(
                "SELECT r.run_id, r.status, coalesce(r.finished_at::pg_catalog.text, ''::pg_catalog.text), \
                        r.last_key, r.high_water, r.now, r.partial_key, r.partial_done, r.partial_fingerprint \
                 FROM chat_backfill.runs r WHERE {SAME_CHATS} AND {GOES_ON} ORDER BY r.run_id DESC LIMIT 1"
            ),
            None,
            &args(),
        )?;
        let Some(row) = table.into_iter().next() else { return Ok::<_, pgrx::spi::Error>(None) };
        Ok(Some((
            row.get::<i64>(1)?.unwrap_or_default(),
            row.get::<String>(2)?.unwrap_or_default(),
            row.get::<String>(3)?.unwrap_or_default(),
            row.get::<String>(4)?,
            row.get::<String>(5)?.unwrap_or_default(),
            row.get::<i64>(6)?.unwrap_or_default(),
            partial_of(row.get::<String>(7)?, row.get::<i64>(8)?, row.get::<i64>(9)?),
        )))
    })?;
    if !restart {
        // Say so when a later run of the same chats is passed over: the CALL starts again or
        // goes on with an older one, and the operator sees why.
        let [source, target, rows, filter] = args();
        let passed = [source, target, rows, filter, latest.as_ref().map_or(0, |l| l.0).into()];
        let newer = crate::pg::read_only::get_one::<String>(
            &format!(
                "SELECT (SELECT pg_catalog.format('%s (started by %s)'::pg_catalog.text, r.run_id, r.started_by) \
                 FROM chat_backfill.runs r WHERE {SAME_CHATS} AND NOT ({GOES_ON}) \
                   AND r.run_id OPERATOR(pg_catalog.>) $5::pg_catalog.int8 ORDER BY r.run_id DESC LIMIT 1)"
            ),
            &passed,
        )?;
        if let Some(newer) = newer {
            notice!(
                "chat_backfill: run {newer} of {} into {} is not resumed: the source's row-level security limited \
                 that role to some chats, or the run is from before 0.7.0 and does not say; this CALL goes on with \
                 {}",
                settings.source.name,
                settings.target.name,
                match &latest {
                    Some(l) => format!("run {}, its own or one by a role that saw the whole source", l.0),
                    None => "a new run".to_owned(),
                }
            );
        }
    }
    Ok(match latest {
        None => Start::New,
        Some(_) if restart => Start::New,
        Some((run_id, status, finished_at, ..)) if status == "finished" => Start::Finished { run_id, finished_at },
        Some((run_id, _, _, last_key, high_water, now, partial)) => Start::Resume { run_id, last_key, high_water, now, partial },
    })
}

/// Runs over the same chats as this CALL: its source, target, rows and source_filter ($1-$4;
/// the filter compared as text, so one spelt differently starts a run of its own, which
/// finds the rows already written and counts them as existing). Not IS NOT DISTINCT FROM:
/// it takes `=` from the search_path.
const SAME_CHATS: &str = "r.source OPERATOR(pg_catalog.=) $1::pg_catalog.text \
    AND r.target OPERATOR(pg_catalog.=) $2::pg_catalog.text AND r.rows OPERATOR(pg_catalog.=) $3::pg_catalog.text \
    AND (r.source_filter OPERATOR(pg_catalog.=) $4::pg_catalog.text OR (r.source_filter IS NULL AND $4 IS NULL))";

/// Runs this role may go on with: its own, or another role's that the source's row-level
/// security did not limit, about the very source and target the names find now (a later
/// session's pg_temp_N, or a table dropped and made again by another role, has the name but
/// not the oid), neither of them temporary (another session's temporary tables are gone, and
/// their names and, once the counter wraps, their oids come round again).
const GOES_ON: &str = "(r.started_by OPERATOR(pg_catalog.=) CURRENT_USER::pg_catalog.text \
    OR (r.restricted IS FALSE \
        AND EXISTS (SELECT FROM pg_catalog.pg_class s, pg_catalog.pg_class t \
                     WHERE s.oid OPERATOR(pg_catalog.=) chat_backfill.regclass_of(r.source)::pg_catalog.oid \
                       AND t.oid OPERATOR(pg_catalog.=) chat_backfill.regclass_of(r.target)::pg_catalog.oid \
                       AND s.oid OPERATOR(pg_catalog.=) r.source_oid AND t.oid OPERATOR(pg_catalog.=) r.target_oid \
                       AND s.relpersistence OPERATOR(pg_catalog.<>) 't'::pg_catalog.\"char\" \
                       AND t.relpersistence OPERATOR(pg_catalog.<>) 't'::pg_catalog.\"char\")))";

/// A checkpoint's unfinished chat, from its three columns.
pub fn partial_of(chat_id: Option<String>, done: Option<i64>, fingerprint: Option<i64>) -> Option<Partial> {
    Some(Partial { chat_id: chat_id?, done: done?, fingerprint: fingerprint? })
}

/// The three columns of a checkpoint's unfinished chat (NULLs when there is none).
pub fn partial_args(partial: Option<&Partial>) -> [DatumWithOid<'_>; 3] {
    match partial {
        Some(p) => [p.chat_id.as_str().into(), p.done.into(), p.fingerprint.into()],
        None => [
            DatumWithOid::null_oid(pg_sys::TEXTOID),
            DatumWithOid::null_oid(pg_sys::INT8OID),
            DatumWithOid::null_oid(pg_sys::INT8OID),
        ],
    }
}

/// Captures the high-water mark and the size of the job and records the run; `None` when
/// there is nothing to do. Runs through a portal, which holds exactly one statement.
pub fn new_run(settings: &Settings) -> Result<Option<(i64, String)>> {
    // The greatest key in the key's own order: max() does not exist for every type that
    // sorts (uuid, bytea), and it would not order by the same operator class anyway.
    let key = settings.key_column();
    let measure = format!(
        "SELECT (SELECT {key}::pg_catalog.text FROM {source}{where_high} ORDER BY {key} DESC LIMIT 1), \
                (SELECT pg_catalog.count(*) FROM {source}{where_all}), \
                (SELECT pg_catalog.count(*) FROM {source}{where_null})",
        source = settings.source.name,
        where_high = source_where(settings, Some(&format!("{key} IS NOT NULL"))),
        where_all = source_where(settings, None),
        where_null = source_where(settings, Some(&format!("NOT ({key} IS NOT NULL)"))),
    );
    let (high_water, total, keyless) = Spi::connect(|client| {
        let mut cursor = client.try_open_cursor(measure.as_str(), &[])?;
        let table = cursor.fetch(1)?;
        let row = table.into_iter().next();
        Ok::<_, pgrx::spi::Error>(match row {
            Some(row) => (row.get::<String>(1)?, row.get::<i64>(2)?.unwrap_or(0), row.get::<i64>(3)?.unwrap_or(0)),
            None => (None, 0, 0),
        })
    })?;
    // A run reads chats in key order, after a key: a chat whose key is NULL (or, for a
    // composite key, has a NULL field) sorts nowhere and would be counted but never read, the
    // run still ending `finished`. Refused before anything is recorded.
    if keyless > 0 {
        return Err(Error::new(
            PgSqlErrorCode::ERRCODE_NOT_NULL_VIOLATION,
            format!(
                "chat_backfill: {keyless} chats of {} have a NULL {} (or one with a NULL field), which a resumable run \
                 cannot read in key order",
                settings.source.name, settings.id_column
            ),
            "Give those chats a key, or leave them out with source_filter (for example \"id IS NOT NULL\"); the \
             one-transaction form backfill_chat_messages() reports them as unusable chats.",
        ));
    }
    let Some(high_water) = high_water else { return Ok(None) };
    let run_id = Spi::get_one_with_args::<i64>(
        "INSERT INTO chat_backfill.runs (source_oid, target_oid, source, target, high_water, total_chats, now, \
                                         source_filter, status, rows, id_column, restricted) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'running'::pg_catalog.text, $9::pg_catalog.text, $10::pg_catalog.text, \
                 chat_backfill.restricted($3::pg_catalog.text)) \
         RETURNING run_id",
        &[
            settings.source.oid.into(),
            settings.target.oid.into(),
            settings.source.name.as_str().into(),
            settings.target.name.as_str().into(),
            high_water.as_str().into(),
            total.into(),
            settings.now.into(),
            text_or_null(settings.source_filter.as_deref()),
            settings.rows.name().into(),
            settings.id_column.as_str().into(),
        ],
    )?
    .unwrap_or_default();
    Ok(Some((run_id, high_water)))
}

/// Marks a run resumed, and refreshes its oid cache: after a restore the names (which found
/// the run) belong to tables with new oids. The cache first: every update of a run must leave
/// it right (the policy checks the oids a row is left with).
pub fn resumed(run_id: i64, settings: &Settings) -> Result<()> {
    Spi::run_with_args(
        "UPDATE chat_backfill.runs SET source_oid = $2::pg_catalog.oid, target_oid = $3::pg_catalog.oid \
         WHERE run_id OPERATOR(pg_catalog.=) $1::pg_catalog.int8 \
           AND (source_oid OPERATOR(pg_catalog.<>) $2::pg_catalog.oid OR target_oid OPERATOR(pg_catalog.<>) $3::pg_catalog.oid)",
        &[run_id.into(), settings.source.oid.into(), settings.target.oid.into()],
    )?;
    set_status(run_id, "running", None)
}

/// Adds a committed batch to the run. `partial`: the chat the batch left unfinished (the
/// run's own, unsplit; a split run keeps it on the range).
pub fn checkpoint(run_id: i64, last_key: Option<&str>, partial: Option<&Partial>, r: &BatchReport) -> Result<()> {
    let [partial_text, partial_done, partial_fingerprint] = partial_args(partial);
    Spi::run_with_args(
        "UPDATE chat_backfill.runs SET last_key = coalesce($2, last_key), \
             chats_read = chats_read OPERATOR(pg_catalog.+) $3, \
             messages_inserted = messages_inserted OPERATOR(pg_catalog.+) $4, \
             messages_rejected = messages_rejected OPERATOR(pg_catalog.+) $5, \
             messages_existing = messages_existing OPERATOR(pg_catalog.+) $6, \
             messages_skipped = messages_skipped OPERATOR(pg_catalog.+) $7, \
             chats_skipped = chats_skipped OPERATOR(pg_catalog.+) $8, \
             chats_vanished = chats_vanished OPERATOR(pg_catalog.+) $9, \
             batches = batches OPERATOR(pg_catalog.+) 1::pg_catalog.int4, \
             active_ms = active_ms OPERATOR(pg_catalog.+) $10, batch_size = $11, \
             partial_key = $12::pg_catalog.text, partial_done = $13::pg_catalog.int8, \
             partial_fingerprint = $14::pg_catalog.int8, \
             messages_dropped = messages_dropped OPERATOR(pg_catalog.+) $15::pg_catalog.int8, \
             write_path = coalesce($16::pg_catalog.text, write_path), \
             updated_at = pg_catalog.clock_timestamp() \
         WHERE run_id OPERATOR(pg_catalog.=) $1",
        &[
            run_id.into(),
            text_or_null(last_key),
            r.chats_read.into(),
            r.messages_inserted.into(),
            r.messages_rejected.into(),
            r.messages_existing.into(),
            r.messages_skipped.into(),
            r.chats_skipped.into(),
            r.chats_vanished.into(),
            r.elapsed_ms.into(),
            r.batch_size.into(),
            partial_text,
            partial_done,
            partial_fingerprint,
            r.messages_dropped.into(),
            text_or_null(r.write_path),
        ],
    )?;
    Ok(())
}

pub fn set_status(run_id: i64, status: &str, error: Option<&str>) -> Result<()> {
    Spi::run_with_args(
        "UPDATE chat_backfill.runs SET status = $2, last_error = $3, replica_lag_bytes = NULL, \
             updated_at = pg_catalog.clock_timestamp(), \
             finished_at = CASE WHEN $2 OPERATOR(pg_catalog.=) 'finished'::pg_catalog.text \
                                THEN pg_catalog.clock_timestamp() END \
         WHERE run_id OPERATOR(pg_catalog.=) $1",
        &[run_id.into(), status.into(), text_or_null(error)],
    )?;
    Ok(())
}

/// Whether this session sees the run (the policies of `chat_backfill.runs`).
pub fn visible(run_id: i64) -> Result<bool> {
    Ok(crate::pg::read_only::get_one::<bool>(
        "SELECT EXISTS (SELECT FROM chat_backfill.runs r WHERE r.run_id OPERATOR(pg_catalog.=) $1::pg_catalog.int8)",
        &[run_id.into()],
    )?
    .unwrap_or(false))
}

/// Ends a run that has read its last key: `finished`, unless it read no chat at all although
/// its start counted some and none vanished while being read. Then the sessions that read it
/// saw none of what the CALL counted (workers without a setting a row-level security policy
/// or the filter reads, say): the run is `failed`, with the counts, and the error comes back
/// to be raised once that is committed.
pub fn finish(run_id: i64) -> Result<Option<Error>> {
    let counts = Spi::connect(|client| {
        let table = client.select(
            "SELECT r.total_chats, r.chats_read, r.chats_vanished FROM chat_backfill.runs r \
             WHERE r.run_id OPERATOR(pg_catalog.=) $1::pg_catalog.int8",
            None,
            &[run_id.into()],
        )?;
        let Some(row) = table.into_iter().next() else { return Ok::<_, pgrx::spi::Error>(None) };
        Ok(Some((row.get::<i64>(1)?.unwrap_or(0), row.get::<i64>(2)?.unwrap_or(0), row.get::<i64>(3)?.unwrap_or(0))))
    })?;
    if let Some((total, 0, 0)) = counts.filter(|&(total, _, _)| total > 0) {
        let error = Error::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("run {run_id} read its last key without reading any chat, although {total} were counted when it started"),
            "The sessions that read the source saw none of its chats: a row-level security policy, source_filter or \
             trigger that reads a setting or a role they do not have? If the chats were deleted meanwhile, CALL with \
             restart => true.",
        );
        set_status(run_id, "failed", Some(&format!("55000: {}", error.message)))?;
        return Ok(Some(error));
    }
    set_status(run_id, "finished", None)?;
    Ok(None)
}

/// The same, only while the run is active (running or throttled): of a split run's workers,
/// the first to fail or stop sets it, and the others see it and halt.
pub fn set_status_if_active(run_id: i64, status: &str, error: Option<&str>) -> Result<()> {
    Spi::run_with_args(
        "UPDATE chat_backfill.runs SET status = $2, last_error = $3, replica_lag_bytes = NULL, \
             updated_at = pg_catalog.clock_timestamp() \
         WHERE run_id OPERATOR(pg_catalog.=) $1 \
           AND status OPERATOR(pg_catalog.=) ANY ('{running,throttled}'::pg_catalog.text[])",
        &[run_id.into(), status.into(), text_or_null(error)],
    )?;
    Ok(())
}

/// The run's status and last error.
pub fn status_of(run_id: i64) -> Result<(String, Option<String>)> {
    Spi::connect(|client| {
        let table = client.select(
            "SELECT r.status, r.last_error FROM chat_backfill.runs r WHERE r.run_id OPERATOR(pg_catalog.=) $1::pg_catalog.int8",
            None,
            &[run_id.into()],
        )?;
        let Some(row) = table.into_iter().next() else { return Ok((String::new(), None)) };
        Ok((row.get::<String>(1)?.unwrap_or_default(), row.get::<String>(2)?))
    })
    .map_err(|e: pgrx::spi::Error| e.into())
}

/// The run's totals: chats read, messages inserted, rejected, already present.
pub fn totals(run_id: i64) -> Result<[i64; 4]> {
    Spi::connect(|client| {
        let table = client.select(
            "SELECT r.chats_read, r.messages_inserted, r.messages_rejected, r.messages_existing \
             FROM chat_backfill.runs r WHERE r.run_id OPERATOR(pg_catalog.=) $1::pg_catalog.int8",
            None,
            &[run_id.into()],
        )?;
        let Some(row) = table.into_iter().next() else { return Ok([0; 4]) };
        Ok([
            row.get::<i64>(1)?.unwrap_or(0),
            row.get::<i64>(2)?.unwrap_or(0),
            row.get::<i64>(3)?.unwrap_or(0),
            row.get::<i64>(4)?.unwrap_or(0),
        ])
    })
    .map_err(|e: pgrx::spi::Error| e.into())
}

/// A run waiting for its replicas shows it, with the lag, until it goes on (`None`); a run
/// another worker has stopped stays stopped.
pub fn set_throttled(run_id: i64, lag: Option<i64>) -> Result<()> {
    Spi::run_with_args(
        "UPDATE chat_backfill.runs SET status = CASE WHEN $2::pg_catalog.int8 IS NULL THEN 'running'::pg_catalog.text \
                                                     ELSE 'throttled'::pg_catalog.text END, \
             replica_lag_bytes = $2::pg_catalog.int8, updated_at = pg_catalog.clock_timestamp() \
         WHERE run_id OPERATOR(pg_catalog.=) $1::pg_catalog.int8 \
           AND status OPERATOR(pg_catalog.=) ANY ('{running,throttled}'::pg_catalog.text[])",
        &[run_id.into(), lag.map_or(DatumWithOid::null_oid(pg_sys::INT8OID), DatumWithOid::from)],
    )?;
    Ok(())
}
