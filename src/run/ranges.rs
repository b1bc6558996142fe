//! A run split into key ranges for parallel work (`sql/parallel.sql`): the split by stored
//! chat bytes, claiming a range by its advisory lock, its checkpoint and its end, and
//! whether anyone is working a run's ranges. Every statement names its catalog objects.

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;

use crate::engine::read::source_where;
use crate::engine::report::Partial;
use crate::engine::request::Settings;
use crate::pg::error::Result;
use crate::run::state::{partial_args, partial_of};

/// The first half of a range's advisory lock key (two-int4 form; the second half is the
/// range_id). "cbkf" in ASCII: far from the small numbers applications pick.
pub const LOCK_CLASS: i32 = 1_667_329_894;

/// Ranges made per worker asked for. More ranges than workers balance the load: workers
/// claim the largest unfinished range first, so a worker that drew a range of small chats
/// takes another while one with a huge chat is still at it, and a run resumed with more
/// workers has ranges for them.
pub const PER_WORKER: usize = 4;

/// A range to work: keys after `after` (none: from the first) up to `high_key`.
pub struct Range {
    pub range_id: i32,
    pub after: Option<String>,
    pub high_key: String,
    /// The chat a batch of this range left unfinished.
    pub partial: Option<Partial>,
}

fn text_or_null(value: Option<&str>) -> DatumWithOid<'_> {
    value.map_or(DatumWithOid::null_oid(pg_sys::TEXTOID), DatumWithOid::from)
}

/// Whether the run has been split.
pub fn is_split(run_id: i64) -> Result<bool> {
    Ok(Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT FROM chat_backfill.run_ranges g WHERE g.run_id OPERATOR(pg_catalog.=) $1::pg_catalog.int8)",
        &[run_id.into()],
    )?
    .unwrap_or(false))
}

/// Splits the keys in (`after`, `high_water`] into at most `n` contiguous ranges holding
/// about equal stored chat bytes (`pg_column_size`: what is on disk, without detoasting)
/// and records them; returns how many. The last range ends at `high_water` itself, so a
/// chat inserted meanwhile below it is read, as a one-worker run would.
pub fn split(settings: &Settings, run_id: i64, after: Option<&str>, high_water: &str, n: usize) -> Result<usize> {
    let key = settings.key_column();
    let chat = pgrx::spi::quote_identifier(&settings.chat_column);
    let condition = settings.key_range_condition(1, 2);
    // Each chat counts its bytes plus one, so a run of empty chats still spreads. A chat's
    // bucket is where its running total started: a huge chat fills its own range. A
    // bucket's last key is found by ordering, in the key's own order: max() does not exist
    // for every type that sorts (uuid, bytea).
    let query = format!(
        "SELECT DISTINCT ON (w.bucket) w.k::pg_catalog.text, \
                (pg_catalog.sum(w.b) OVER (PARTITION BY w.bucket))::pg_catalog.int8 FROM ( \
           SELECT c.k, c.b, pg_catalog.floor(((pg_catalog.sum(c.b) OVER (ORDER BY c.k ROWS UNBOUNDED PRECEDING)) \
                    OPERATOR(pg_catalog.-) c.b)::pg_catalog.float8 OPERATOR(pg_catalog.*) $3::pg_catalog.float8 \
                    OPERATOR(pg_catalog./) (pg_catalog.sum(c.b) OVER ())::pg_catalog.float8) AS bucket \
           FROM (SELECT {key} AS k, (COALESCE(pg_catalog.pg_column_size({chat}), 0::pg_catalog.int4) \
                        OPERATOR(pg_catalog.+) 1::pg_catalog.int4)::pg_catalog.int8 AS b \
                 FROM {}{}) c) w \
         ORDER BY w.bucket, w.k DESC",
        settings.source.name,
        source_where(settings, Some(&condition)),
    );
    let buckets = Spi::connect(|client| {
        let mut cursor = client.try_open_cursor(
            query.as_str(),
            &[text_or_null(after), DatumWithOid::from(high_water), (n as f64).into()],
        )?;
        let mut out = Vec::new();
        for row in cursor.fetch(n as i64 + 1)? {
            out.push((row.get::<String>(1)?.unwrap_or_default(), row.get::<i64>(2)?.unwrap_or(0)));
        }
        Ok::<_, pgrx::spi::Error>(out)
    })?;
    if buckets.is_empty() {
        // Nothing left in the keys: one empty range, so the run ends the ordinary way.
        insert(run_id, 0, after, high_water, 0)?;
        return Ok(1);
    }
    let mut low = after.map(str::to_owned);
    let last = buckets.len() - 1;
    for (no, (high, bytes)) in buckets.into_iter().enumerate() {
        let high = if no == last { high_water.to_owned() } else { high };
        insert(run_id, no as i32, low.as_deref(), &high, bytes)?;
        low = Some(high);
    }
    Ok(last + 1)
}

fn insert(run_id: i64, no: i32, low: Option<&str>, high: &str, bytes: i64) -> Result<()> {
    Spi::run_with_args(
        "INSERT INTO chat_backfill.run_ranges (run_id, range_no, low_key, high_key, chat_bytes) \
         VALUES ($1::pg_catalog.int8, $2::pg_catalog.int4, $3::pg_catalog.text, $4::pg_catalog.text, $5::pg_catalog.int8)",
        &[run_id.into(), no.into(), text_or_null(low), high.into(), bytes.into()],
    )?;
    Ok(())
}

/// Unfinished ranges of the run.
pub fn unfinished(run_id: i64) -> Result<i64> {
    Ok(Spi::get_one_with_args::<i64>(
        "SELECT pg_catalog.count(*) FROM chat_backfill.run_ranges g \
         WHERE g.run_id OPERATOR(pg_catalog.=) $1::pg_catalog.int8 AND NOT g.finished",
        &[run_id.into()],
    )?
    .unwrap_or(0))
}

/// Takes the next unfinished range nobody holds, largest first (the long ones start
/// early), and locks it for this session; `None` when there is none.
pub fn claim(run_id: i64) -> Result<Option<Range>> {
    let candidates = Spi::connect(|client| {
        let table = client.select(
            "SELECT g.range_id FROM chat_backfill.run_ranges g \
             WHERE g.run_id OPERATOR(pg_catalog.=) $1::pg_catalog.int8 AND NOT g.finished \
             ORDER BY g.chat_bytes DESC, g.range_no",
            None,
            &[run_id.into()],
        )?;
        table.into_iter().map(|row| Ok(row.get::<i32>(1)?.unwrap_or_default())).collect::<std::result::Result<Vec<i32>, pgrx::spi::Error>>()
    })?;
    for range_id in candidates {
        let locked = Spi::get_one_with_args::<bool>(
            "SELECT pg_catalog.pg_try_advisory_lock($1::pg_catalog.int4, $2::pg_catalog.int4)",
            &[LOCK_CLASS.into(), range_id.into()],
        )?
        .unwrap_or(false);
        if !locked {
            continue;
        }
        // Read again under the lock: whoever held it last may have finished it or moved on.
        let range = Spi::connect(|client| {
            let table = client.select(
                "SELECT COALESCE(g.last_key, g.low_key), g.high_key, g.finished, \
                        g.partial_key, g.partial_done, g.partial_fingerprint \
                 FROM chat_backfill.run_ranges g WHERE g.range_id OPERATOR(pg_catalog.=) $1::pg_catalog.int4",
                None,
                &[range_id.into()],
            )?;
            let Some(row) = table.into_iter().next() else { return Ok::<_, pgrx::spi::Error>(None) };
            if row.get::<bool>(3)?.unwrap_or(true) {
                return Ok(None);
            }
            Ok(Some(Range {
                range_id,
                after: row.get::<String>(1)?,
                high_key: row.get::<String>(2)?.unwrap_or_default(),
                partial: partial_of(row.get::<String>(4)?, row.get::<i64>(5)?, row.get::<i64>(6)?),
            }))
        })?;
        match range {
            Some(range) => return Ok(Some(range)),
            None => release(range_id),
        }
    }
    Ok(None)
}

/// Gives a range's lock back. Session locks outlive transactions and errors; the lock
/// manager needs no transaction, so this works in an aborted one too.
pub fn release(range_id: i32) {
    // SAFETY: calls the built-in with two int4 arguments, as SQL would.
    unsafe {
        pgrx::direct_function_call::<bool>(
            pg_sys::pg_advisory_unlock_int4,
            &[pgrx::IntoDatum::into_datum(LOCK_CLASS), pgrx::IntoDatum::into_datum(range_id)],
        );
    }
}

/// The range's checkpoint, in the batch's transaction.
pub fn checkpoint(range_id: i32, last_key: Option<&str>, partial: Option<&Partial>) -> Result<()> {
    let [partial_key, partial_done, partial_fingerprint] = partial_args(partial);
    Spi::run_with_args(
        "UPDATE chat_backfill.run_ranges SET last_key = COALESCE($2::pg_catalog.text, last_key), \
             partial_key = $3::pg_catalog.text, partial_done = $4::pg_catalog.int8, \
             partial_fingerprint = $5::pg_catalog.int8 \
         WHERE range_id OPERATOR(pg_catalog.=) $1::pg_catalog.int4",
        &[range_id.into(), text_or_null(last_key), partial_key, partial_done, partial_fingerprint],
    )?;
    Ok(())
}

/// Marks the range done; true when it was the run's last (the caller then finishes the run
/// in the same transaction). The run's row is locked first: of two ranges ending together,
/// the second to take it sees the first's end.
pub fn finish(run_id: i64, range_id: i32) -> Result<bool> {
    Spi::run_with_args(
        "UPDATE chat_backfill.run_ranges SET finished = true WHERE range_id OPERATOR(pg_catalog.=) $1::pg_catalog.int4",
        &[range_id.into()],
    )?;
    Spi::run_with_args(
        "SELECT FROM chat_backfill.runs r WHERE r.run_id OPERATOR(pg_catalog.=) $1::pg_catalog.int8 FOR NO KEY UPDATE",
        &[run_id.into()],
    )?;
    Ok(unfinished(run_id)? == 0)
}

/// The ranges of every run of this source and target, by id.
/// Its parameters are the source and target names (what identifies a run's tables), numbered
/// from `first`.
fn ranges_of_pair(first: usize) -> String {
    format!(
        "SELECT g.range_id FROM chat_backfill.run_ranges g \
         JOIN chat_backfill.runs r ON r.run_id OPERATOR(pg_catalog.=) g.run_id \
         WHERE r.source OPERATOR(pg_catalog.=) ${first}::pg_catalog.text \
           AND r.target OPERATOR(pg_catalog.=) ${}::pg_catalog.text",
        first + 1
    )
}

/// The condition that a lock `l` of `advisory` is held by a chat_backfill worker: its
/// backend holds the workers' mark (the shared advisory lock (1667329894, 0), which pg_locks
/// shows every role) and is not, where pg_stat_activity shows it (its own role's backends, or
/// to pg_read_all_stats), anything but a worker. The mark is looked up in the same snapshot
/// of the lock table as the range lock: each read of pg_locks is a new snapshot, and a worker
/// that exits between two reads would hold the range in one and no mark in the other.
const BY_A_WORKER: &str = "(EXISTS (SELECT FROM advisory m WHERE m.pid OPERATOR(pg_catalog.=) l.pid \
       AND m.objid OPERATOR(pg_catalog.=) 0::pg_catalog.oid) \
     AND NOT EXISTS (SELECT FROM pg_catalog.pg_stat_activity a WHERE a.pid OPERATOR(pg_catalog.=) l.pid \
       AND a.backend_type OPERATOR(pg_catalog.<>) 'chat_backfill worker'::pg_catalog.text))";

/// Every worker holds this shared lock while it lives: how many run on the server, and which
/// backends they are, whoever asks.
pub fn mark_as_worker() -> Result<()> {
    Spi::run_with_args(
        "SELECT pg_catalog.pg_advisory_lock_shared($1::pg_catalog.int4, 0::pg_catalog.int4)",
        &[LOCK_CLASS.into()],
    )?;
    Ok(())
}

/// Whether backend `pid` holds the workers' mark.
pub fn is_marked(pid: i32) -> Result<bool> {
    Ok(Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_locks m \
         WHERE m.locktype OPERATOR(pg_catalog.=) 'advisory'::pg_catalog.text AND m.granted \
           AND m.pid OPERATOR(pg_catalog.=) $2::pg_catalog.int4 \
           AND m.objsubid OPERATOR(pg_catalog.=) 2::pg_catalog.int2 \
           AND m.classid OPERATOR(pg_catalog.=) $1::pg_catalog.int4::pg_catalog.oid \
           AND m.objid OPERATOR(pg_catalog.=) 0::pg_catalog.oid)",
        &[LOCK_CLASS.into(), pid.into()],
    )?
    .unwrap_or(false))
}

/// chat_backfill workers running on the whole server.
pub fn workers_on_server() -> Result<usize> {
    Ok(Spi::get_one_with_args::<i64>(
        "SELECT pg_catalog.count(DISTINCT m.pid) FROM pg_catalog.pg_locks m \
         WHERE m.locktype OPERATOR(pg_catalog.=) 'advisory'::pg_catalog.text AND m.granted \
           AND m.objsubid OPERATOR(pg_catalog.=) 2::pg_catalog.int2 \
           AND m.classid OPERATOR(pg_catalog.=) $1::pg_catalog.int4::pg_catalog.oid \
           AND m.objid OPERATOR(pg_catalog.=) 0::pg_catalog.oid",
        &[LOCK_CLASS.into()],
    )?
    .unwrap_or(0) as usize)
}

/// Other backends holding the lock of a range among `ranges` (a query of range ids whose
/// parameters start at $2), workers or not as `workers` says; their pids. $1 is LOCK_CLASS.
fn lockers(ranges: &str, workers: bool, args: Vec<DatumWithOid<'_>>) -> Result<Vec<i32>> {
    let not = if workers { "" } else { "NOT " };
    let query = format!(
        "WITH advisory AS MATERIALIZED ( \
             SELECT l.pid, l.database, l.objid FROM pg_catalog.pg_locks l \
             WHERE l.locktype OPERATOR(pg_catalog.=) 'advisory'::pg_catalog.text AND l.granted \
               AND l.objsubid OPERATOR(pg_catalog.=) 2::pg_catalog.int2 \
               AND l.classid OPERATOR(pg_catalog.=) $1::pg_catalog.int4::pg_catalog.oid) \
         SELECT DISTINCT l.pid FROM advisory l \
         WHERE l.pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid() \
           AND l.database OPERATOR(pg_catalog.=) (SELECT d.oid FROM pg_catalog.pg_database d \
                                                  WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()) \
           AND l.objid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT x.range_id::pg_catalog.oid FROM ({ranges}) x)) \
           AND {not}{BY_A_WORKER} \
         ORDER BY 1"
    );
    let all: Vec<DatumWithOid<'_>> = std::iter::once(LOCK_CLASS.into()).chain(args).collect();
    Spi::connect(|client| {
        let table = client.select(&query, None, &all)?;
        table.into_iter().map(|row| Ok(row.get::<i32>(1)?.unwrap_or_default())).collect::<std::result::Result<Vec<i32>, pgrx::spi::Error>>()
    })
    .map_err(Into::into)
}

/// Workers (other than this backend) holding a range of any run of this source and target:
/// those an earlier CALL left running with wait_for_workers => false. Only chat_backfill
/// workers count: any session can take an advisory lock, and one that holds a range's lock
/// is reported as in the way (`strangers`), not taken for a runner.
pub fn holders(source: &str, target: &str) -> Result<Vec<i32>> {
    lockers(&ranges_of_pair(2), true, vec![source.into(), target.into()])
}

/// Waits, as an ordinary lock wait (cancel, statement_timeout and lock_timeout end it),
/// until nobody holds a range of any run of this source and target.
pub fn wait_for_holders(source: &str, target: &str) -> Result<()> {
    let ranges = Spi::connect(|client| {
        let table = client.select(&ranges_of_pair(1), None, &[source.into(), target.into()])?;
        table.into_iter().map(|row| Ok(row.get::<i32>(1)?.unwrap_or_default())).collect::<std::result::Result<Vec<i32>, pgrx::spi::Error>>()
    })?;
    // A worker may claim a range already waited for: go round until none is held.
    while !holders(source, target)?.is_empty() {
        for &range_id in &ranges {
            Spi::run_with_args(
                "SELECT pg_catalog.pg_advisory_lock($1::pg_catalog.int4, $2::pg_catalog.int4)",
                &[LOCK_CLASS.into(), range_id.into()],
            )?;
            release(range_id);
        }
    }
    Ok(())
}

/// Backends other than this one and chat_backfill workers that hold a lock of an unfinished
/// range of the run: a session that took the advisory lock (1667329894, range_id) itself.
/// While they hold it, nobody can work that range.
pub fn strangers(run_id: i64) -> Result<Vec<i32>> {
    let ranges = "SELECT g.range_id FROM chat_backfill.run_ranges g \
                  WHERE g.run_id OPERATOR(pg_catalog.=) $2::pg_catalog.int8 AND NOT g.finished";
    lockers(ranges, false, vec![run_id.into()])
}

/// The ranges of the run that some backend holds right now (pg_locks is read live, not in
/// the statement's snapshot).
pub fn held(run_id: i64) -> Result<Vec<i32>> {
    Spi::connect(|client| {
        let table = client.select(
            "SELECT g.range_id FROM chat_backfill.run_ranges g \
             WHERE g.run_id OPERATOR(pg_catalog.=) $1::pg_catalog.int8 \
               AND EXISTS (SELECT FROM pg_catalog.pg_locks l \
                           WHERE l.locktype OPERATOR(pg_catalog.=) 'advisory'::pg_catalog.text AND l.granted \
                             AND l.objsubid OPERATOR(pg_catalog.=) 2::pg_catalog.int2 \
                             AND l.classid OPERATOR(pg_catalog.=) $2::pg_catalog.int4::pg_catalog.oid \
                             AND l.objid OPERATOR(pg_catalog.=) g.range_id::pg_catalog.oid \
                             AND l.database OPERATOR(pg_catalog.=) (SELECT d.oid FROM pg_catalog.pg_database d \
                                 WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()))",
            None,
            &[run_id.into(), LOCK_CLASS.into()],
        )?;
        table.into_iter().map(|row| Ok(row.get::<i32>(1)?.unwrap_or_default())).collect::<std::result::Result<Vec<i32>, pgrx::spi::Error>>()
    })
    .map_err(Into::into)
}

/// Of the ranges `held` did not see held, those still unfinished. Called in a transaction
/// that began after `held` read the locks: a worker commits a range's end before it gives
/// the lock back, so a range finished meanwhile is seen finished here. Read in one
/// statement, the snapshot predates the lock scan, and a range finished and released in
/// between looked orphaned. While the run is active such a range means a worker died: a
/// worker stops on its own only when every unfinished range is held, and one that gives a
/// range back unfinished first records why in the run's status.
pub fn orphaned(run_id: i64, held: &[i32]) -> Result<i64> {
    Ok(Spi::get_one_with_args::<i64>(
        "SELECT pg_catalog.count(*) FROM chat_backfill.run_ranges g \
         WHERE g.run_id OPERATOR(pg_catalog.=) $1::pg_catalog.int8 AND NOT g.finished \
           AND g.range_id OPERATOR(pg_catalog.<>) ALL ($2::pg_catalog.int4[])",
        &[run_id.into(), held.to_vec().into()],
    )?
    .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pair's parameters are numbered from where the caller's own end.
    #[test]
    fn ranges_of_pair_numbers_its_parameters_from_first() {
        let sql = ranges_of_pair(3);
        assert!(sql.contains("$3::pg_catalog.text") && sql.contains("$4::pg_catalog.text"), "{sql}");
        assert!(!sql.contains("$1") && !sql.contains("$2"), "{sql}");
    }
}
