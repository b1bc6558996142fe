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

use super::batch::{fields, Rows};
use super::rejections::Rejection;
use super::settings::Settings;
use super::BatchReport;
use crate::copy_writer::{copy_allowed, copy_rows};
use crate::datums::varlena_array;
use crate::error::Result;
use crate::relations::{has_rules, target_columns};
use crate::subxact::{in_rolled_back_subtransaction, in_subtransaction, Failure};

pub struct Writer {
    target: pg_sys::Oid,
    insert: OwnedPreparedStatement,
    /// For a target with rules, where INSERT cannot say ON CONFLICT: which of the given
    /// ids the target lacks, so that only those go to a plain INSERT (and its rules).
    missing: Option<String>,
    /// Whether a chat id is still in the source (typed like the source's id column).
    exists: String,
    /// Whether to try COPY first (if `copy_allowed` still agrees); given up after a few
    /// batches in a row that it could not write (e.g. a re-run, where ids are already present).
    copy_first: bool,
    copy_misses: u32,
    /// App rows: a chat's rows are written all or nothing.
    app: bool,
    columns: Vec<&'static str>,
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
        let exists = format!(
            "SELECT EXISTS (SELECT FROM {} WHERE {} OPERATOR(pg_catalog.=) CAST($1::pg_catalog.text AS {}))",
            settings.source.name,
            pgrx::spi::quote_identifier(&settings.id_column),
            settings.id_type
        );
        let columns = target_columns(app).into_iter().map(|(n, _)| n).collect();
        Ok(Writer { target: settings.target.oid, insert, missing, exists, copy_first: !settings.dry_run, copy_misses: 0, app, columns })
    }

    pub fn write(&mut self, rows: &Rows, report: &mut BatchReport, outcome: &mut Outcome) -> Result<()> {
        if rows.len() == 0 || self.copy(rows, report) {
            return Ok(());
        }
        if self.app {
            return self.insert_chats(rows, &rows.chats(), report, outcome);
        }
        self.insert(rows, 0..rows.len(), report, outcome)
    }

    /// App rows: chats whole, halving the list of chats on failure. A chat that fails
    /// alone gets no rows, as Open WebUI's one INSERT per chat would leave it; its bad
    /// rows are found in a subtransaction that is rolled back, and recorded.
    fn insert_chats(&self, rows: &Rows, chats: &[Range<usize>], report: &mut BatchReport, outcome: &mut Outcome) -> Result<()> {
        pgrx::check_for_interrupts!();
        let (Some(first), Some(last)) = (chats.first(), chats.last()) else { return Ok(()) };
        let all = first.start..last.end;
        match in_subtransaction(|| self.send(rows, all.clone())) {
            Ok(Ok(inserted)) => {
                report.messages_inserted += inserted as i64;
                report.messages_existing += (all.len() - inserted) as i64;
            }
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
    fn send(&self, rows: &Rows, r: Range<usize>) -> std::result::Result<usize, pgrx::spi::Error> {
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
        Spi::connect_mut(|client| client.update(&self.insert, None, &arguments).map(|t| sent.unwrap_or(t.len())))
    }

    /// The fast path: the whole batch through COPY in one subtransaction. False when COPY
    /// could not write it (nothing was written then; the INSERT path takes over).
    fn copy(&mut self, rows: &Rows, report: &mut BatchReport) -> bool {
        if !self.copy_first || !copy_allowed(self.target) {
            return false;
        }
        match in_subtransaction(AssertUnwindSafe(|| copy_rows(self.target, rows, &self.columns))) {
            Ok(written) => {
                report.messages_inserted += written as i64;
                self.copy_misses = 0;
                true
            }
            Err(_) => {
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
            Ok(Ok(inserted)) => {
                report.messages_inserted += inserted as i64;
                report.messages_existing += (r.len() - inserted) as i64;
            }
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
