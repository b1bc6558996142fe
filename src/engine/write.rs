//! Writing one batch: PostgreSQL's COPY FROM first (the fastest way in), and where COPY
//! cannot take the batch whole, one prepared `INSERT ... SELECT FROM unnest(...) ON
//! CONFLICT (id) DO NOTHING` per range, halving failed ranges down to the bad rows, each
//! in its own subtransaction. A row whose chat the application deleted meanwhile is not
//! a bad row: its chat is counted as vanished.

use std::collections::HashSet;
use std::ops::Range;
use std::panic::AssertUnwindSafe;

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;

use crate::engine::copy_feed::{copy_allowed, copy_rows};
use crate::pg::catalog::{column_types, has_rules, target_columns};
use crate::pg::datums::varlena_array;
use crate::pg::error::Result;
use crate::pg::subxact::{in_rolled_back_subtransaction, in_subtransaction, Failure};
use super::batch::{fields, Rows};
use super::rejections::Rejection;
use super::report::BatchReport;
use super::request::Settings;

pub struct Writer {
    target: pg_sys::Oid,
    insert: OwnedPreparedStatement,
    /// For a target with rules, where INSERT cannot say ON CONFLICT: which of the given
    /// ids the target lacks, so that only those go to a plain INSERT (and its rules).
    missing: Option<String>,
    /// Whether a chat id is still in the source (typed like the source's id column).
    exists: String,
    /// How many of the given message ids the target holds.
    present: String,
    /// Whether to try COPY first (if `copy_allowed` still agrees); given up after a few
    /// batches in a row that it could not write (e.g. a re-run, where ids are already present).
    copy_first: bool,
    copy_misses: u32,
    /// App rows: a chat's rows are written all or nothing.
    app: bool,
    columns: Vec<&'static str>,
    /// The columns' types as checked when the run began (COPY's binary format is taken only
    /// while they are still these).
    types: Vec<pg_sys::Oid>,
    /// The target's INITIALLY DEFERRED constraints, checked at the end of each write (set
    /// IMMEDIATE, which fires the checks pending, then DEFERRED again, their own mode): a
    /// violating row then fails its write and is found and recorded like any other bad row,
    /// instead of failing the COMMIT and with it every row. Checks that pass stay done, so
    /// each row is checked once.
    deferred: Option<[String; 2]>,
}

/// What one INSERT did with the rows sent.
struct Sent {
    inserted: usize,
    /// Dropped by a BEFORE trigger (it returned NULL).
    dropped: usize,
}

impl Sent {
    /// Counts `len` rows sent: inserted, dropped, and the rest already there.
    fn count(&self, len: usize, report: &mut BatchReport) {
        report.messages_inserted += self.inserted as i64;
        report.messages_dropped += self.dropped as i64;
        report.messages_existing += len.saturating_sub(self.inserted + self.dropped) as i64;
    }
}

/// What writing a batch found besides rows written.
#[derive(Default)]
pub struct Outcome {
    pub rejections: Vec<Rejection>,
    pub vanished: HashSet<String>,
}

impl Writer {
    pub fn prepare(settings: &Settings) -> Result<Writer> {
        let app = settings.rows.is_app();
        let types: Vec<PgOid> = fields(app).iter().map(|f| PgOid::from(f.array_type())).collect();
        let rules = has_rules(settings.target.oid);
        let insert =
            Spi::connect(|client| client.prepare_mut(insert_sql(settings, rules).as_str(), &types).map(|s| s.keep()))?;
        let missing = rules.then(|| {
            format!(
                "SELECT pg_catalog.array_agg(u.n OPERATOR(pg_catalog.-) 1::pg_catalog.int8) \
                 FROM pg_catalog.unnest($1::pg_catalog.text[]) WITH ORDINALITY AS u(id, n) \
                 WHERE NOT EXISTS (SELECT FROM {} t WHERE t.id OPERATOR(pg_catalog.=) u.id)",
                settings.target.name
            )
        });
        let exists = format!("SELECT EXISTS (SELECT FROM {} WHERE {})", settings.source.name, settings.key_equals(1));
        // Counted per id sent: an id twice in a batch (ids of two chats can collide) is there twice.
        let present = format!(
            "SELECT pg_catalog.count(*) FROM pg_catalog.unnest($1::pg_catalog.text[]) AS u(id) \
             WHERE EXISTS (SELECT FROM {} t WHERE t.id OPERATOR(pg_catalog.=) u.id)",
            settings.target.name
        );
        let columns: Vec<&'static str> = target_columns(app).into_iter().map(|(n, _)| n).collect();
        let types = column_types(&settings.target, &columns)?.into_iter().map(|t| t.unwrap_or(pg_sys::InvalidOid)).collect();
        let deferred = deferred_constraints(settings.target.oid)?
            .map(|names| [format!("SET CONSTRAINTS {names} IMMEDIATE"), format!("SET CONSTRAINTS {names} DEFERRED")]);
        let writer = Writer {
            target: settings.target.oid,
            insert,
            missing,
            exists,
            present,
            copy_first: !settings.dry_run,
            copy_misses: 0,
            app,
            columns,
            types,
            deferred,
        };
        if !settings.dry_run {
            // Checks the caller's transaction has pending on these constraints are its own:
            // fired here, before any batch, a violation of theirs fails their statement and
            // is never taken for a bad row of ours.
            writer.check_deferred()?;
        }
        Ok(writer)
    }

    pub fn write(&mut self, rows: &Rows, report: &mut BatchReport, outcome: &mut Outcome) -> Result<()> {
        if rows.len() == 0 || self.copy(rows, report) {
            return Ok(());
        }
        report.write_path = Some("insert");
        if self.app {
            return self.insert_chats(rows, &rows.chats(), report, outcome);
        }
        self.insert(rows, 0..rows.len(), report, outcome)
    }

    /// One slice of a chat written all or nothing across several slices (app rows of a
    /// chat bigger than a batch), inside the caller's subtransaction around the chat: COPY
    /// first (in a subtransaction of its own), else the INSERT, whose error is not caught
    /// here: it rolls back the caller's subtransaction, and with it the chat's other slices.
    pub fn write_or_raise(&mut self, rows: &Rows, report: &mut BatchReport) -> Result<()> {
        if rows.len() == 0 || self.copy(rows, report) {
            return Ok(());
        }
        report.write_path = Some("insert");
        pgrx::check_for_interrupts!();
        self.send(rows, 0..rows.len())?.count(rows.len(), report);
        Ok(())
    }

    /// Finds the bad rows of a slice whose chat failed as a whole (see `write_or_raise`),
    /// in a subtransaction that is rolled back: nothing of it stays written.
    pub fn probe(&self, rows: &Rows, outcome: &mut Outcome) -> Result<()> {
        let mut scratch = BatchReport::default();
        in_rolled_back_subtransaction(AssertUnwindSafe(|| self.insert(rows, 0..rows.len(), &mut scratch, outcome)))
    }

    /// App rows: chats whole, halving the list of chats on failure. A chat that fails
    /// alone gets no rows, as Open WebUI's one INSERT per chat would leave it; its bad
    /// rows are found in a subtransaction that is rolled back, and recorded.
    fn insert_chats(&self, rows: &Rows, chats: &[Range<usize>], report: &mut BatchReport, outcome: &mut Outcome) -> Result<()> {
        pgrx::check_for_interrupts!();
        let (Some(first), Some(last)) = (chats.first(), chats.last()) else { return Ok(()) };
        let all = first.start..last.end;
        match in_subtransaction(|| self.send(rows, all.clone())) {
            Ok(Ok(sent)) => sent.count(all.len(), report),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) if chats.len() > 1 => {
                let middle = chats.len() / 2;
                self.insert_chats(rows, &chats[..middle], report, outcome)?;
                self.insert_chats(rows, &chats[middle..], report, outcome)?;
            }
            Err(failure) => {
                let mut probe = Outcome::default();
                let mut scratch = BatchReport::default();
                in_rolled_back_subtransaction(AssertUnwindSafe(|| self.insert(rows, all.clone(), &mut scratch, &mut probe)))?;
                let chat_id = rows.ids(all.start).1.to_owned();
                if !probe.vanished.is_empty() {
                    outcome.vanished.extend(probe.vanished);
                    return Ok(());
                }
                let held_back = all.len() - probe.rejections.len();
                let note = format!(
                    "No row of this chat was written: Open WebUI writes a chat's rows all or nothing ({held_back} other \
                     message(s) held back), and keeps reading its JSON."
                );
                if probe.rejections.is_empty() {
                    outcome.rejections.push(Rejection {
                        chat_id,
                        message_key: None,
                        message_id: None,
                        sqlstate: failure.sqlstate,
                        error: format!("chat not written: {}", failure.message),
                        detail: Some(note),
                        message: None,
                    });
                } else {
                    for mut r in probe.rejections {
                        r.detail = Some(match r.detail {
                            Some(d) => format!("{d} {note}"),
                            None => note.clone(),
                        });
                        outcome.rejections.push(r);
                    }
                }
                report.messages_skipped += held_back as i64;
            }
        }
        Ok(())
    }

    /// Sends rows `r` to the INSERT (only the missing ones to a target with rules).
    fn send(&self, rows: &Rows, r: Range<usize>) -> std::result::Result<Sent, pgrx::spi::Error> {
        let (arguments, sent) = match &self.missing {
            None => (rows.arguments(r.clone()), None),
            Some(missing) => {
                let ids: Vec<Option<&str>> = r.clone().map(|i| Some(rows.ids(i).0)).collect();
                // SAFETY: a text[] of the batch's ids.
                let ids = unsafe { DatumWithOid::new(varlena_array(ids.into_iter(), pg_sys::TEXTOID), pg_sys::TEXTARRAYOID) };
                let new: Vec<i64> = Spi::get_one_with_args::<Vec<i64>>(missing, &[ids])?.unwrap_or_default();
                let picked: Vec<usize> = new.iter().map(|&n| r.start + n as usize).collect();
                (rows.arguments_of(&picked), Some(picked.len()))
            }
        };
        // What rules do is theirs to count: with rules, the rows sent are the rows inserted.
        let inserted = Spi::connect_mut(|client| client.update(&self.insert, None, &arguments).map(|t| sent.unwrap_or(t.len())))?;
        self.check_deferred()?;
        // Rows not inserted are there already, or a BEFORE trigger dropped them (returned
        // NULL): the ids now in the target tell which. Rules are theirs to count.
        let dropped = if sent.is_none() && inserted < r.len() { r.len() - self.present(rows, r)? } else { 0 };
        Ok(Sent { inserted, dropped })
    }

    /// How many of the ids of rows `r` the target holds.
    fn present(&self, rows: &Rows, r: Range<usize>) -> std::result::Result<usize, pgrx::spi::Error> {
        let ids: Vec<Option<&str>> = r.map(|i| Some(rows.ids(i).0)).collect();
        // SAFETY: a text[] of the batch's ids.
        let ids = unsafe { DatumWithOid::new(varlena_array(ids.into_iter(), pg_sys::TEXTOID), pg_sys::TEXTARRAYOID) };
        Ok(Spi::get_one_with_args::<i64>(&self.present, &[ids])?.unwrap_or(0) as usize)
    }

    /// Checks the target's deferred constraints on what this subtransaction wrote.
    fn check_deferred(&self) -> std::result::Result<(), pgrx::spi::Error> {
        let Some([immediate, deferred]) = &self.deferred else { return Ok(()) };
        Spi::run(immediate)?;
        Spi::run(deferred)
    }

    /// The fast path: the whole batch through COPY in one subtransaction. False when COPY
    /// could not write it (nothing was written then; the INSERT path takes over).
    fn copy(&mut self, rows: &Rows, report: &mut BatchReport) -> bool {
        if !self.copy_first || !copy_allowed(self.target) {
            return false;
        }
        let copied = in_subtransaction(AssertUnwindSafe(|| {
            let written = copy_rows(self.target, rows, &self.columns, Some(&self.types));
            self.check_deferred().map(|()| written)
        }));
        match copied {
            Ok(Ok((written, path))) => {
                report.write_path = Some(path);
                // COPY stops at an id already there: a row it did not write was dropped by a
                // BEFORE trigger.
                report.messages_inserted += written as i64;
                report.messages_dropped += (rows.len() as u64).saturating_sub(written) as i64;
                self.copy_misses = 0;
                true
            }
            Ok(Err(_)) | Err(_) => {
                self.copy_misses += 1;
                self.copy_first = self.copy_misses < 3;
                false
            }
        }
    }

    /// Inserts rows `r` in one subtransaction; on failure, halves the range until each
    /// failing row is alone, so k bad rows cost about k·log2(n) small subtransactions.
    fn insert(&self, rows: &Rows, r: Range<usize>, report: &mut BatchReport, outcome: &mut Outcome) -> Result<()> {
        pgrx::check_for_interrupts!();
        let written = in_subtransaction(|| self.send(rows, r.clone()));
        match written {
            Ok(Ok(sent)) => sent.count(r.len(), report),
            Ok(Err(e)) => return Err(e.into()),
            Err(failure) if r.len() == 1 => {
                let (id, chat_id) = rows.ids(r.start);
                if failure.sqlstate == "23503" && !self.chat_exists(chat_id)? {
                    outcome.vanished.insert(chat_id.to_owned());
                } else {
                    outcome.rejections.push(Rejection {
                        message_key: id.strip_prefix(&format!("{chat_id}-")).map(str::to_owned),
                        message_id: Some(id.to_owned()),
                        chat_id: chat_id.to_owned(),
                        sqlstate: failure.sqlstate,
                        error: failure.message,
                        detail: failure.detail,
                        message: Some(rows.as_json(r.start)),
                    });
                }
            }
            Err(Failure { .. }) => {
                let middle = r.start + r.len() / 2;
                self.insert(rows, r.start..middle, report, outcome)?;
                self.insert(rows, middle..r.end, report, outcome)?;
            }
        }
        Ok(())
    }

    fn chat_exists(&self, chat_id: &str) -> Result<bool> {
        Ok(Spi::get_one_with_args::<bool>(&self.exists, &[chat_id.into()])?.unwrap_or(false))
    }
}

/// The target's INITIALLY DEFERRED constraints (foreign keys, unique and exclusion
/// constraints, constraint triggers), schema-qualified for SET CONSTRAINTS, which also
/// reaches their copies on partitions; `None` when it has none. SET CONSTRAINTS names a
/// constraint by schema and name only, so it would also reach another table's constraint
/// of the same name (a NOT DEFERRABLE one fails every write; a deferrable one would be left
/// DEFERRED in the caller's transaction): a name that another table in the schema also
/// uses, other than the target's own partitions, is left out, and its checks run at COMMIT
/// as PostgreSQL defers them (the eighteenth review's low).
fn deferred_constraints(target: pg_sys::Oid) -> Result<Option<String>> {
    Ok(crate::pg::read_only::get_one::<String>(
        "SELECT pg_catalog.string_agg(pg_catalog.format('%I.%I'::pg_catalog.text, n.nspname, c.conname), \
                                      ', '::pg_catalog.text ORDER BY c.conname) \
         FROM pg_catalog.pg_constraint c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.connamespace \
         WHERE c.conrelid OPERATOR(pg_catalog.=) $1 AND c.condeferred \
           AND NOT EXISTS (SELECT FROM pg_catalog.pg_constraint o \
                           WHERE o.connamespace OPERATOR(pg_catalog.=) c.connamespace \
                             AND o.conname OPERATOR(pg_catalog.=) c.conname \
                             AND o.conrelid OPERATOR(pg_catalog.<>) c.conrelid \
                             AND o.conparentid OPERATOR(pg_catalog.<>) c.oid)",
        &[target.into()],
    )?)
}

/// The batch INSERT. PostgreSQL refuses ON CONFLICT on a table with INSERT rules (0A000);
/// there the rows are the missing ones already, so a plain INSERT lets the rules see each.
fn insert_sql(settings: &Settings, rules: bool) -> String {
    let app = settings.rows.is_app();
    let columns: Vec<String> = target_columns(app).iter().map(|(n, _)| pgrx::spi::quote_identifier(n)).collect();
    // `unnest(a, b, ...)` exists only unqualified: spell out what it means.
    let arrays: Vec<String> =
        fields(app).iter().enumerate().map(|(n, f)| format!("pg_catalog.unnest(${}::{}[])", n + 1, f.sql_type())).collect();
    format!(
        "INSERT INTO {} ({}) SELECT * FROM ROWS FROM ({}){}",
        settings.target.name,
        columns.join(", "),
        arrays.join(", "),
        if rules { "" } else { " ON CONFLICT (id) DO NOTHING" }
    )
}
