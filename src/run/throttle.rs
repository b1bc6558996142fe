//! Between the committing form's batches: wait while the standbys (or one replication
//! slot) are further behind than the caller allows, and keep the WAL this backend writes
//! under a rate. A backfill writes WAL as fast as the server can; replicas that replay one
//! process at a time fall behind, and a slot that does not advance fills the WAL disk.

use std::cell::Cell;
use std::time::{Duration, Instant};

use pgrx::PgSqlErrorCode::*;
use pgrx::prelude::*;

use crate::pg::error::{Error, Result};
use crate::pg::wal::wal_written;
use crate::run::state;

/// How often a throttled run looks at the lag again, and writes it to its status.
const POLL: Duration = Duration::from_millis(100);
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// 10 kB/s: below that a single batch would pace for hours.
pub const MIN_WAL_RATE_MIB: f64 = 0.01;

/// Where the lag is read from.
enum Watch {
    /// Every standby and logical subscriber connected to this server.
    Standbys,
    /// One replication slot's WAL not yet confirmed (a slot outlives its disconnections).
    Slot(String),
}

/// What the throttle says before a batch.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Go {
    Ahead,
    /// max_runtime ended the wait.
    OutOfTime,
    /// The run was stopped meanwhile (another worker failed, or the CALL is gone).
    Halted,
}

pub struct Throttle {
    max_lag: Option<(i64, Watch)>,
    /// Bytes per second of this backend's WAL.
    max_wal_rate: Option<f64>,
    wal_at_start: u64,
    started: Instant,
    /// Whether the run was told that no standby is connected (said once per CALL).
    said_none: Cell<bool>,
}

impl Throttle {
    /// Checks the arguments, and that the lag can be read at all: a throttle that cannot
    /// see the standbys would silently do nothing.
    /// `max_wal_rate`: MiB per second, and where it came from (the argument or the setting),
    /// to name in an error.
    pub fn new(max_replica_lag: Option<&str>, replica_slot: Option<&str>, max_wal_rate: Option<(f64, &str)>) -> Result<Throttle> {
        let max_lag = match (max_replica_lag, replica_slot) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(Error::new(
                    ERRCODE_INVALID_PARAMETER_VALUE,
                    "replica_slot is given without max_replica_lag",
                    "Pass max_replica_lag => '256MB' (say) too: replica_slot only says where the lag is read.",
                ))
            }
            (Some(size), slot) => {
                // pg_size_bytes raises 22023 itself for what is not a size.
                let bytes = Spi::get_one_with_args::<i64>(
                    "SELECT pg_catalog.pg_size_bytes($1::pg_catalog.text)",
                    &[size.into()],
                )?
                .unwrap_or(-1);
                if bytes < 0 {
                    return Err(Error::new(
                        ERRCODE_INVALID_PARAMETER_VALUE,
                        format!("max_replica_lag must be a size of zero or more, not '{size}'"),
                        "Write it as PostgreSQL writes sizes: '64kB', '256MB', '1GB'.",
                    ));
                }
                let watch = match slot {
                    Some(slot) => {
                        check_slot(slot)?;
                        Watch::Slot(slot.to_owned())
                    }
                    None => {
                        check_can_read_standbys()?;
                        Watch::Standbys
                    }
                };
                Some((bytes, watch))
            }
        };
        let max_wal_rate = match max_wal_rate {
            None => None,
            Some((mib, name)) => {
                if !(mib.is_finite() && mib >= MIN_WAL_RATE_MIB) {
                    let hint = if name == "max_wal_rate" {
                        "It is a positive number of MiB of WAL per second; NULL takes chat_backfill.max_wal_rate (0 there: no limit)."
                    } else {
                        "Set it to 0 (no limit) or to a rate of MiB of WAL per second, or pass max_wal_rate to the CALL."
                    };
                    return Err(Error::new(
                        ERRCODE_INVALID_PARAMETER_VALUE,
                        format!("{name} must be at least {MIN_WAL_RATE_MIB} MiB per second, not {mib}"),
                        hint,
                    ));
                }
                Some(mib * 1024.0 * 1024.0)
            }
        };
        Ok(Throttle { max_lag, max_wal_rate, wal_at_start: wal_written(), started: Instant::now(), said_none: Cell::new(false) })
    }

    /// The run starts now (after waiting for the runner lock, which must not count as
    /// time in which WAL could have been written).
    pub fn start(&mut self) {
        self.wal_at_start = wal_written();
        self.started = Instant::now();
    }

    /// Waits until the next batch may start; false when `deadline` (max_runtime) came
    /// first. `commit` ends the current transaction: the waits must not hold a snapshot,
    /// and the status must be visible to others.
    /// `halted` is asked at least once a second while waiting: a worker whose run was
    /// stopped, or whose CALL is gone, must not wait on (holding its range) for replicas
    /// that may never catch up.
    pub fn before_batch(
        &self,
        run_id: i64,
        commit: &dyn Fn(),
        deadline: Option<Instant>,
        halted: &dyn Fn() -> Result<bool>,
    ) -> Result<Go> {
        match self.pace(commit, deadline, halted)? {
            Go::Ahead => self.wait_for_replicas(run_id, commit, deadline, halted),
            other => Ok(other),
        }
    }

    /// Sleeps until this backend's WAL since the run began is within the rate.
    fn pace(&self, commit: &dyn Fn(), deadline: Option<Instant>, halted: &dyn Fn() -> Result<bool>) -> Result<Go> {
        let Some(rate) = self.max_wal_rate else { return Ok(Go::Ahead) };
        let written = wal_written().saturating_sub(self.wal_at_start);
        let due = self.started + Duration::from_secs_f64(written as f64 / rate);
        if due <= Instant::now() {
            return Ok(Go::Ahead);
        }
        commit();
        let until = deadline.map_or(due, |d| d.min(due));
        while Instant::now() < until {
            sleep_interruptibly(until.saturating_duration_since(Instant::now()).min(STATUS_EVERY));
            if halted()? {
                return Ok(Go::Halted);
            }
        }
        Ok(if deadline.is_none_or(|d| due <= d) { Go::Ahead } else { Go::OutOfTime })
    }

    fn wait_for_replicas(
        &self,
        run_id: i64,
        commit: &dyn Fn(),
        deadline: Option<Instant>,
        halted: &dyn Fn() -> Result<bool>,
    ) -> Result<Go> {
        let Some((max, watch)) = &self.max_lag else { return Ok(Go::Ahead) };
        let mut throttled_since: Option<Instant> = None;
        let mut reported = Instant::now();
        let mut asked = Instant::now();
        loop {
            pgrx::check_for_interrupts!();
            let lag = lag(watch)?;
            if throttled_since.is_some() && deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(Go::OutOfTime);
            }
            if throttled_since.is_some() && asked.elapsed() >= STATUS_EVERY {
                asked = Instant::now();
                if halted()? {
                    return Ok(Go::Halted);
                }
            }
            match lag {
                Some(lag) if lag > *max => {
                    if throttled_since.is_none() {
                        notice!(
                            "chat_backfill: {} {lag} bytes behind (max_replica_lag {max}); run {run_id} waits",
                            describe(watch)
                        );
                        throttled_since = Some(Instant::now());
                        state::set_throttled(run_id, Some(lag))?;
                        commit();
                        reported = Instant::now();
                    } else if reported.elapsed() >= STATUS_EVERY {
                        state::set_throttled(run_id, Some(lag))?;
                        commit();
                        reported = Instant::now();
                    }
                    sleep_interruptibly(POLL);
                }
                _ => {
                    if lag.is_none() && !self.said_none.replace(true) {
                        notice!("chat_backfill: no standby is connected; max_replica_lag has nothing to wait for until one is");
                    }
                    if let Some(since) = throttled_since {
                        state::set_throttled(run_id, None)?;
                        commit();
                        notice!(
                            "chat_backfill: {} caught up after {:.1} s; run {run_id} goes on",
                            describe(watch),
                            since.elapsed().as_secs_f64()
                        );
                    }
                    return Ok(Go::Ahead);
                }
            }
        }
    }
}

fn describe(watch: &Watch) -> String {
    match watch {
        Watch::Standbys => "a standby is".into(),
        Watch::Slot(slot) => format!("replication slot \"{slot}\" is"),
    }
}

/// The largest lag in bytes; `None` when no standby is connected.
fn lag(watch: &Watch) -> Result<Option<i64>> {
    Ok(match watch {
        // pg_receivewal and pg_basebackup's WAL stream never replay: their flush position
        // is how far they are. A connection that reported neither yet is not counted.
        Watch::Standbys => Spi::get_one::<i64>(
            "SELECT pg_catalog.max(pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), \
                    coalesce(s.replay_lsn, s.flush_lsn)))::pg_catalog.int8 \
             FROM pg_catalog.pg_stat_replication s \
             WHERE s.state OPERATOR(pg_catalog.=) ANY ('{streaming,catchup}'::pg_catalog.text[]) \
               AND coalesce(s.replay_lsn, s.flush_lsn) IS NOT NULL",
        )?,
        Watch::Slot(slot) => {
            // A slot dropped or invalidated meanwhile would turn the throttle off, or hold
            // the run forever: either is an error the operator must see.
            let (exists, lost, lag) = Spi::connect(|client| {
                let row = client
                    .select(
                        "SELECT true, s.wal_status OPERATOR(pg_catalog.=) 'lost'::pg_catalog.text, \
                                pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), \
                                    coalesce(s.confirmed_flush_lsn, s.restart_lsn))::pg_catalog.int8 \
                         FROM pg_catalog.pg_replication_slots s \
                         WHERE s.slot_name OPERATOR(pg_catalog.=) $1::pg_catalog.name",
                        None,
                        &[slot.as_str().into()],
                    )?
                    .into_iter()
                    .next();
                Ok::<_, pgrx::spi::Error>(match row {
                    Some(row) => (true, row.get::<bool>(2)?.unwrap_or(false), row.get::<i64>(3)?),
                    None => (false, false, None),
                })
            })?;
            if !exists || lost || lag.is_none() {
                return Err(Error::new(
                    ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!(
                        "replication slot \"{slot}\" {} during the backfill",
                        if exists { "lost its WAL (invalidated)" } else { "was dropped" }
                    ),
                    "The run stopped after its last committed batch. CALL again with another replica_slot, \
                     or without one to watch the connected standbys.",
                ));
            }
            lag
        }
    })
}

/// pg_stat_replication shows the positions only to members of pg_read_all_stats (and
/// superusers); to anyone else they are NULL, and the throttle would never wait.
fn check_can_read_standbys() -> Result<()> {
    let allowed = Spi::get_one::<bool>(
        "SELECT pg_catalog.pg_has_role(CURRENT_USER, 'pg_read_all_stats'::pg_catalog.name, 'USAGE'::pg_catalog.text)",
    )?
    .unwrap_or(false);
    if allowed {
        return Ok(());
    }
    Err(Error::new(
        ERRCODE_INSUFFICIENT_PRIVILEGE,
        "max_replica_lag needs to read the standbys' replay positions, which this role cannot see",
        "GRANT pg_monitor (or pg_read_all_stats) TO the role that runs the backfill, or watch a slot with \
         replica_slot => '...', which any role can read.",
    ))
}

fn check_slot(slot: &str) -> Result<()> {
    let exists = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_replication_slots s \
                        WHERE s.slot_name OPERATOR(pg_catalog.=) $1::pg_catalog.name)",
        &[slot.into()],
    )?
    .unwrap_or(false);
    if exists {
        return Ok(());
    }
    Err(Error::new(
        ERRCODE_UNDEFINED_OBJECT,
        format!("replication slot \"{slot}\" does not exist"),
        "See SELECT slot_name FROM pg_replication_slots; or leave replica_slot NULL to watch every connected standby.",
    ))
}

pub fn sleep_interruptibly(total: Duration) {
    let until = Instant::now() + total;
    while Instant::now() < until {
        pgrx::check_for_interrupts!();
        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
    }
}
