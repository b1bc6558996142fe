//! The backfill engine: read chats through an SPI portal a batch at a time, expand them
//! with the core rules, write each batch with one prepared multi-row INSERT in its own
//! subtransaction, and isolate bad rows by halving the failed batch.
//!
//! Memory stays bounded by one batch: each batch is read in its own SPI session (tuple
//! tables are only freed when a session ends), chats are copied out as owned strings and
//! dropped as soon as their messages are in the batch buffers.

use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::datum::DatumWithOid;

use crate::datums::{bool_array, datum_array, int8_array, text_datum, text_str, varlena_array, BorrowedText, OwnedText};
use crate::expand::{self, ChatSkip, Column, Entry, Message};
use crate::copy_writer::{copy_allowed, copy_rows, push_escaped, CopySource};
use crate::relations::{Relation, TARGET_COLUMNS};
use crate::scalar::Unstorable;
use crate::subxact::{in_subtransaction, Failure};

/// A batch also ends when this much chat text has been read, so a run of huge chats
/// cannot hold more than this (plus one chat) in memory.
const MAX_BATCH_BYTES: usize = 64 << 20;

pub struct Settings {
    pub source: Relation,
    pub target: Relation,
    pub batch_size: usize,
    pub now: i64,
    /// A SQL boolean expression over the source's columns (caller's own privileges).
    pub source_filter: Option<String>,
    pub id_column: String,
    pub user_id_column: String,
    pub chat_column: String,
    pub dry_run: bool,
    pub run_id: i64,
    /// The SQL type of the id column, for keyset reading.
    pub id_type: String,
}

/// What one batch did; `sum()` over batches gives the run's totals.
#[derive(Default, Clone, Debug)]
pub struct BatchReport {
    pub batch: i32,
    pub chats_read: i64,
    pub messages_inserted: i64,
    pub messages_rejected: i64,
    pub messages_existing: i64,
    pub last_chat_id: Option<String>,
    pub elapsed_ms: f64,
    pub messages_skipped: i64,
    pub chats_skipped: i64,
}

/// One batch of rows, column by column, in the target's column order. Values are
/// PostgreSQL `text` datums, written once into a memory context of the batch's own: the
/// array parameters of the INSERT (of the whole batch or of any half being retried) are
/// built from them without another copy, and the context goes when the batch does.
struct Rows {
    context: pg_sys::MemoryContext,
    /// id, chat_id, user_id, role, parent_id, model_id (NULL: `None`)
    text: [Vec<Option<pg_sys::Datum>>; 6],
    /// content, output, files, sources, embeds, status_history, error, usage
    json: [Vec<pg_sys::Datum>; 8],
    done: Vec<Option<bool>>,
    timestamp: Vec<i64>,
}

impl Rows {
    fn new() -> Rows {
        let context = unsafe {
            pg_sys::AllocSetContextCreateExtended(
                pg_sys::TopTransactionContext,
                c"chat_backfill batch".as_ptr(),
                pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
            )
        };
        Rows { context, text: Default::default(), json: Default::default(), done: Vec::new(), timestamp: Vec::new() }
    }

    fn len(&self) -> usize {
        self.timestamp.len()
    }

    fn push(&mut self, chat_id: &str, user_id: Option<&str>, m: Message<'_>) {
        unsafe {
            let caller = pg_sys::MemoryContextSwitchTo(self.context);
            let [id, chat, user, role, parent, model] = &mut self.text;
            id.push(Some(text_datum(&m.id(chat_id))));
            chat.push(Some(text_datum(chat_id)));
            user.push(user_id.map(text_datum));
            role.push(Some(text_datum(&m.role)));
            parent.push(m.parent_id.as_deref().map(text_datum));
            model.push(m.model_id.as_deref().map(text_datum));
            let values = [m.content, m.output, m.files, m.sources, m.embeds, m.status_history, m.error, m.usage];
            for (column, value) in self.json.iter_mut().zip(values) {
                column.push(text_datum(value));
            }
            pg_sys::MemoryContextSwitchTo(caller);
        }
        self.done.push(m.done);
        self.timestamp.push(m.timestamp);
    }

    /// The INSERT's array parameters for rows `r`, one per target column, in order.
    fn arguments(&self, r: Range<usize>) -> Vec<DatumWithOid<'static>> {
        FIELDS
            .iter()
            .map(|field| {
                let array = match *field {
                    Field::Text(c) => datum_array(&self.text[c][r.clone()], pg_sys::TEXTOID),
                    Field::Json(c) => {
                        let values: Vec<Option<pg_sys::Datum>> = self.json[c][r.clone()].iter().copied().map(Some).collect();
                        datum_array(&values, pg_sys::JSONOID)
                    }
                    Field::Done => bool_array(&self.done[r.clone()]),
                    Field::Timestamp => int8_array(&self.timestamp[r.clone()]),
                };
                unsafe { DatumWithOid::new(array, field.array_type()) }
            })
            .collect()
    }

    fn text(&self, column: usize, i: usize) -> Option<&str> {
        self.text[column][i].map(|d| unsafe { text_str(d) })
    }

    /// The row as a JSON object, for the rejected-rows table.
    fn as_json(&self, i: usize) -> String {
        let mut out = String::from("{");
        let texts = ["id", "chat_id", "user_id", "role", "parent_id", "model_id"];
        for (col, name) in texts.iter().enumerate() {
            let value = self.text(col, i).map_or("null".to_owned(), |s| serde_json::to_string(s).unwrap());
            out.push_str(&format!("\"{name}\":{value},"));
        }
        let jsons = ["content", "output", "files", "sources", "embeds", "status_history", "error", "usage"];
        for (name, col) in jsons.iter().zip(&self.json) {
            out.push_str(&format!("\"{name}\":{},", unsafe { text_str(col[i]) }));
        }
        let done = self.done[i].map_or("null".to_owned(), |b| b.to_string());
        out.push_str(&format!("\"done\":{done},\"created_at\":{}}}", self.timestamp[i]));
        out
    }
}

impl CopySource for Rows {
    fn rows(&self) -> usize {
        self.len()
    }

    fn write_line(&self, i: usize, out: &mut Vec<u8>) {
        let text = |out: &mut Vec<u8>, col: usize| match self.text(col, i) {
            Some(s) => push_escaped(out, s),
            None => out.extend_from_slice(b"\\N"),
        };
        let json = |out: &mut Vec<u8>, col: usize| push_escaped(out, unsafe { text_str(self.json[col][i]) });
        for (n, field) in FIELDS.into_iter().enumerate()
        {
            if n > 0 {
                out.push(b'\t');
            }
            match field {
                Field::Text(c) => text(out, c),
                Field::Json(c) => json(out, c),
                Field::Done => match self.done[i] {
                    Some(true) => out.push(b't'),
                    Some(false) => out.push(b'f'),
                    None => out.extend_from_slice(b"\\N"),
                },
                Field::Timestamp => out.extend_from_slice(self.timestamp[i].to_string().as_bytes()),
            }
        }
        out.push(b'\n');
    }
}

/// Where each target column's value lives in `Rows`.
#[derive(Clone, Copy)]
enum Field {
    /// `Rows::text[i]`
    Text(usize),
    /// `Rows::json[i]`
    Json(usize),
    Done,
    Timestamp,
}

/// The target's columns (`TARGET_COLUMNS`, same order) as stored in `Rows`: the one
/// layout that the INSERT, its parameters and the COPY lines all follow.
const FIELDS: [Field; 17] = [
    Field::Text(0),   // id
    Field::Text(1),   // chat_id
    Field::Text(2),   // user_id
    Field::Text(3),   // role
    Field::Text(4),   // parent_id
    Field::Json(0),   // content
    Field::Json(1),   // output
    Field::Text(5),   // model_id
    Field::Json(2),   // files
    Field::Json(3),   // sources
    Field::Json(4),   // embeds
    Field::Done,      // done
    Field::Json(5),   // status_history
    Field::Json(6),   // error
    Field::Json(7),   // usage
    Field::Timestamp, // created_at
    Field::Timestamp, // updated_at
];

impl Field {
    fn sql_type(self) -> &'static str {
        match self {
            Field::Text(_) => "text",
            Field::Json(_) => "json",
            Field::Done => "bool",
            Field::Timestamp => "int8",
        }
    }

    fn array_type(self) -> pg_sys::Oid {
        match self {
            Field::Text(_) => pg_sys::TEXTARRAYOID,
            Field::Json(_) => json_array_oid(),
            Field::Done => pg_sys::BOOLARRAYOID,
            Field::Timestamp => pg_sys::INT8ARRAYOID,
        }
    }
}

impl Drop for Rows {
    fn drop(&mut self) {
        unsafe { pg_sys::MemoryContextDelete(self.context) };
    }
}

fn json_array_oid() -> pg_sys::Oid {
    unsafe { pg_sys::get_array_type(pg_sys::JSONOID) }
}

/// A message or chat that did not make it into the target, and why.
struct Rejection {
    chat_id: String,
    message_key: Option<String>,
    message_id: Option<String>,
    /// PostgreSQL's own SQLSTATE for a failed insert; ours for what the rules reject.
    sqlstate: String,
    error: String,
    detail: Option<String>,
    message: Option<String>,
}

fn rule_sqlstate(problem: Unstorable) -> &'static str {
    match problem {
        Unstorable::ContainsNul => "22P05",
        Unstorable::UnpairedSurrogate => "22021",
        Unstorable::ObjectInTextColumn | Unstorable::ListNotArrayLiteral => "42804",
        Unstorable::NotBoolean => "22P02",
    }
}

fn chat_sqlstate(skip: ChatSkip) -> &'static str {
    match skip {
        ChatSkip::NotJson => "22P02",
        _ => "22023",
    }
}

/// How the source is read.
enum Reading {
    /// One portal for the whole run, which is one transaction.
    Portal(String),
    /// A fresh portal per batch over `key > last key ORDER BY key`, up to the high-water
    /// mark captured when the run started: a portal does not survive COMMIT.
    Keyset { query: String, high_water: String },
    Done,
}

pub struct Backfill {
    settings: Settings,
    reading: Reading,
    /// The id of the last chat read (keyset reading resumes after it).
    last_key: Option<String>,
    insert: OwnedPreparedStatement,
    record: OwnedPreparedStatement,
    /// Whether to try COPY first for each batch; given up after a few batches in a row
    /// that it could not write (e.g. a re-run, where ids are already present).
    copy_first: bool,
    copy_misses: u32,
    batch: i32,
    totals: BatchReport,
    started: Instant,
    last_notice: Instant,
}

impl Backfill {
    /// Opens one portal over the whole source and prepares the INSERT once.
    pub fn start(settings: Settings) -> Backfill {
        let read = select_sql(&settings, None, "");
        let cursor = open_portal(&settings, &read, None, None);
        Backfill::new(settings, Reading::Portal(cursor), None)
    }

    /// Reads the source in key order after `last_key` (all of it when `None`) up to
    /// `high_water`, one portal per batch, so the caller may COMMIT between batches.
    pub fn keyset(settings: Settings, last_key: Option<String>, high_water: String) -> Backfill {
        let key = pgrx::spi::quote_identifier(&settings.id_column);
        let t = &settings.id_type;
        let condition = format!("($1::text IS NULL OR {key} > CAST($1 AS {t})) AND {key} <= CAST($2 AS {t})");
        // A batch never needs more chats than messages; the LIMIT keeps the plan an index scan.
        let tail = format!(" ORDER BY {key} LIMIT {}", settings.batch_size);
        let query = select_sql(&settings, Some(&condition), &tail);
        Backfill::new(settings, Reading::Keyset { query, high_water }, last_key)
    }

    /// The key of the last chat of the last batch read.
    pub fn last_key(&self) -> Option<&str> {
        self.last_key.as_deref()
    }

    fn new(settings: Settings, reading: Reading, last_key: Option<String>) -> Backfill {
        let (settings_dry_run, target_oid) = (settings.dry_run, settings.target.oid);
        let (insert, record) = Spi::connect(|client| {
            let insert = client
                .prepare_mut(insert_sql(&settings.target).as_str(), &insert_arg_types())
                .expect("preparing the batch INSERT")
                .keep();
            let record = client.prepare_mut(RECORD_SQL, &record_arg_types()).expect("preparing the rejection INSERT").keep();
            (insert, record)
        });
        let now = Instant::now();
        Backfill {
            settings,
            reading,
            last_key,
            insert,
            record,
            copy_first: !settings_dry_run && copy_allowed(target_oid),
            copy_misses: 0,
            batch: 0,
            totals: BatchReport::default(),
            started: now,
            last_notice: now,
        }
    }

    /// Reads, expands and writes the next batch; `None` once the source is exhausted.
    pub fn next_batch(&mut self) -> Option<BatchReport> {
        let began = Instant::now();
        let cursor = match &self.reading {
            Reading::Done => return None,
            Reading::Portal(cursor) => cursor.clone(),
            Reading::Keyset { query, high_water } => {
                open_portal(&self.settings, query, self.last_key.as_deref(), Some(high_water))
            }
        };
        let mut report = BatchReport { batch: self.batch + 1, ..Default::default() };
        let mut rows = Rows::new();
        let mut rejections = Vec::new();
        let mut exhausted = self.read_batch(&cursor, &mut rows, &mut rejections, &mut report);
        if let Reading::Keyset { .. } = self.reading {
            // The portal ended at its LIMIT: more may follow.
            exhausted &= (report.chats_read as usize) < self.settings.batch_size;
        }
        if exhausted || matches!(self.reading, Reading::Keyset { .. }) {
            Spi::connect(|client| drop(client.find_cursor(&cursor)));
        }
        if report.last_chat_id.is_some() {
            self.last_key.clone_from(&report.last_chat_id);
        }
        if exhausted {
            self.reading = Reading::Done;
            if report.chats_read == 0 {
                self.finish_notice();
                return None;
            }
        }
        if self.settings.dry_run {
            report.messages_inserted = rows.len() as i64;
        } else if rows.len() > 0 && !self.copy_batch(&rows, &mut report) {
            self.write(&rows, 0..rows.len(), &mut report, &mut rejections);
        }
        report.messages_rejected += rejections.iter().filter(|r| r.message_key.is_some()).count() as i64;
        if !self.settings.dry_run && !rejections.is_empty() {
            self.record(&rejections);
        }
        report.elapsed_ms = began.elapsed().as_secs_f64() * 1000.0;
        self.batch += 1;
        self.add_to_totals(&report);
        if matches!(self.reading, Reading::Done) {
            self.finish_notice();
        } else if self.last_notice.elapsed().as_secs_f64() >= 2.0 || self.batch == 1 {
            self.progress_notice();
        }
        Some(report)
    }

    /// Fetches chats one at a time (so a batch never holds more than it needs) until the
    /// batch is full. Returns true when the source is exhausted.
    fn read_batch(&self, cursor: &str, rows: &mut Rows, rejections: &mut Vec<Rejection>, report: &mut BatchReport) -> bool {
        Spi::connect(|client| {
            let mut portal = client.find_cursor(cursor).expect("the backfill's portal is open");
            let mut bytes = 0;
            let mut exhausted = false;
            while rows.len() < self.settings.batch_size && bytes < MAX_BATCH_BYTES {
                pgrx::check_for_interrupts!();
                let table = portal.fetch(1).expect("fetching from the source");
                let Some(row) = table.into_iter().next() else {
                    exhausted = true;
                    break;
                };
                let chat_id = row.get::<OwnedText>(1).ok().flatten().map(|t| t.0);
                let user_id = row.get::<OwnedText>(2).ok().flatten().map(|t| t.0);
                // The document is read where it lies (detoasted once), never copied whole.
                let chat = row.get::<BorrowedText>(3).ok().flatten();
                let chat = chat.as_ref().map(BorrowedText::as_str);
                report.chats_read += 1;
                bytes += chat.map_or(0, str::len);
                let Some(chat_id) = chat_id else {
                    report.chats_skipped += 1;
                    continue;
                };
                self.expand_into(&chat_id, user_id.as_deref(), chat, rows, rejections, report);
                report.last_chat_id = Some(chat_id);
            }
            // Keep the portal open for the next batch (dropping it would close it).
            portal.detach_into_name();
            exhausted
        })
    }

    fn expand_into(
        &self,
        chat_id: &str,
        user_id: Option<&str>,
        chat: Option<&str>,
        rows: &mut Rows,
        rejections: &mut Vec<Rejection>,
        report: &mut BatchReport,
    ) {
        let result = expand::expand_chat(chat, self.settings.now, |entry| match entry {
            Entry::Row(m) => rows.push(chat_id, user_id, m),
            Entry::Skipped { .. } => report.messages_skipped += 1,
            Entry::Rejected { key, column, problem, raw } => rejections.push(Rejection {
                chat_id: chat_id.to_owned(),
                message_id: Some(format!("{chat_id}-{key}")),
                message_key: Some(key),
                sqlstate: rule_sqlstate(problem).to_owned(),
                error: expand::reject_reason(column, problem),
                detail: Some(match column {
                    Column::Key => "Open WebUI's migration fails on this message too.".to_owned(),
                    _ => format!("Open WebUI's migration fails on this message too (column {}).", column.name()),
                }),
                message: Some(raw.to_owned()),
            }),
        });
        if let Err(skip) = result {
            if skip.is_problem() {
                report.chats_skipped += 1;
                rejections.push(Rejection {
                    chat_id: chat_id.to_owned(),
                    message_key: None,
                    message_id: None,
                    sqlstate: chat_sqlstate(skip).to_owned(),
                    error: skip.describe().to_owned(),
                    detail: Some("The chat stays in the source table unchanged; no message of it was written.".into()),
                    message: None,
                });
            }
        }
    }

    /// The fast path: the whole batch through COPY in one subtransaction. False when COPY
    /// could not write it (nothing was written then; the INSERT path takes over).
    fn copy_batch(&mut self, rows: &Rows, report: &mut BatchReport) -> bool {
        if !self.copy_first {
            return false;
        }
        let target = self.settings.target.oid;
        match in_subtransaction(AssertUnwindSafe(|| copy_rows(target, rows))) {
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
    fn write(&self, rows: &Rows, r: Range<usize>, report: &mut BatchReport, rejections: &mut Vec<Rejection>) {
        pgrx::check_for_interrupts!();
        let outcome = in_subtransaction(|| {
            Spi::connect_mut(|client| {
                client.update(&self.insert, None, &rows.arguments(r.clone())).map(|t| t.len()).expect("batch INSERT status")
            })
        });
        match outcome {
            Ok(inserted) => {
                report.messages_inserted += inserted as i64;
                report.messages_existing += (r.len() - inserted) as i64;
            }
            Err(failure) if r.len() == 1 => rejections.push(self.insert_rejection(rows, r.start, failure)),
            Err(_) => {
                let middle = r.start + r.len() / 2;
                self.write(rows, r.start..middle, report, rejections);
                self.write(rows, middle..r.end, report, rejections);
            }
        }
    }

    fn insert_rejection(&self, rows: &Rows, i: usize, failure: Failure) -> Rejection {
        let id = rows.text(0, i).unwrap_or_default().to_owned();
        let chat_id = rows.text(1, i).unwrap_or_default().to_owned();
        Rejection {
            message_key: id.strip_prefix(&format!("{chat_id}-")).map(str::to_owned),
            message_id: Some(id),
            chat_id,
            sqlstate: failure.sqlstate,
            error: failure.message,
            detail: failure.detail,
            message: Some(rows.as_json(i)),
        }
    }

    fn record(&self, rejections: &[Rejection]) {
        let text = |f: &dyn Fn(&Rejection) -> Option<&str>| {
            varlena_array(rejections.iter().map(f), pg_sys::TEXTOID)
        };
        let s = &self.settings;
        let args = unsafe {
            vec![
                DatumWithOid::from(s.run_id),
                DatumWithOid::from(s.source.name.as_str()),
                DatumWithOid::from(s.target.name.as_str()),
                DatumWithOid::new(text(&|r| Some(r.chat_id.as_str())), pg_sys::TEXTARRAYOID),
                DatumWithOid::new(text(&|r| r.message_key.as_deref()), pg_sys::TEXTARRAYOID),
                DatumWithOid::new(text(&|r| r.message_id.as_deref()), pg_sys::TEXTARRAYOID),
                DatumWithOid::new(text(&|r| Some(r.sqlstate.as_str())), pg_sys::TEXTARRAYOID),
                DatumWithOid::new(text(&|r| Some(r.error.as_str())), pg_sys::TEXTARRAYOID),
                DatumWithOid::new(text(&|r| r.detail.as_deref()), pg_sys::TEXTARRAYOID),
                DatumWithOid::new(
                    varlena_array(rejections.iter().map(|r| r.message.as_deref()), pg_sys::JSONOID),
                    json_array_oid(),
                ),
            ]
        };
        Spi::connect_mut(|client| {
            client.update(&self.record, None, &args).expect("recording rejected messages");
        });
    }

    fn add_to_totals(&mut self, b: &BatchReport) {
        let t = &mut self.totals;
        t.chats_read += b.chats_read;
        t.messages_inserted += b.messages_inserted;
        t.messages_rejected += b.messages_rejected;
        t.messages_existing += b.messages_existing;
        t.messages_skipped += b.messages_skipped;
        t.chats_skipped += b.chats_skipped;
    }

    fn progress_notice(&mut self) {
        self.last_notice = Instant::now();
        notice!("chat_backfill: {}", self.summary("so far"));
    }

    fn finish_notice(&mut self) {
        notice!("chat_backfill: {}", self.summary("done"));
    }

    fn summary(&self, state: &str) -> String {
        let t = &self.totals;
        let secs = self.started.elapsed().as_secs_f64();
        let verb = if self.settings.dry_run { "would insert" } else { "inserted" };
        format!(
            "{state} after {} batches, {:.1} s: {} chats read, {} messages {verb}, {} rejected, {} already present, \
             {} skipped by rule, {} chats unusable ({:.0} messages/s); rejected rows: \
             SELECT * FROM chat_backfill.rejected_messages WHERE run_id = {}",
            self.batch,
            secs,
            t.chats_read,
            t.messages_inserted,
            t.messages_rejected,
            t.messages_existing,
            t.messages_skipped,
            t.chats_skipped,
            (t.messages_inserted as f64) / secs.max(1e-9),
            self.settings.run_id,
        )
    }
}

impl Iterator for Backfill {
    type Item = BatchReport;
    fn next(&mut self) -> Option<BatchReport> {
        self.next_batch()
    }
}

/// ` WHERE ...` combining the caller's source_filter with `condition` (empty: none).
pub fn source_where(settings: &Settings, condition: Option<&str>) -> String {
    let conditions: Vec<String> =
        settings.source_filter.iter().map(|f| format!("({f})")).chain(condition.map(str::to_owned)).collect();
    if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    }
}

/// The three source columns as text, filtered, then `tail` (ORDER BY / LIMIT, or empty).
fn select_sql(settings: &Settings, condition: Option<&str>, tail: &str) -> String {
    let q = pgrx::spi::quote_identifier;
    format!(
        "SELECT {}::text, {}::text, {}::text FROM {}{}{tail}",
        q(&settings.id_column),
        q(&settings.user_id_column),
        q(&settings.chat_column),
        settings.source.name,
        source_where(settings, condition)
    )
}

/// Opens a portal that outlives the SPI session (until it is closed or the transaction ends).
fn open_portal(settings: &Settings, query: &str, after: Option<&str>, high_water: Option<&String>) -> String {
    Spi::connect(|client| {
        let args: Vec<DatumWithOid> = match high_water {
            None => Vec::new(),
            Some(hw) => vec![
                after.map_or(DatumWithOid::null_oid(pg_sys::TEXTOID), DatumWithOid::from),
                DatumWithOid::from(hw.as_str()),
            ],
        };
        let cursor = client.try_open_cursor(query, &args).unwrap_or_else(|e| {
            crate::error::UsageError::new(
                pgrx::PgSqlErrorCode::ERRCODE_SYNTAX_ERROR,
                format!("cannot read source table {}: {e}", settings.source.name),
                "Check source_filter: it must be a boolean SQL expression over the source's columns.",
            )
            .raise()
        });
        cursor.detach_into_name()
    })
}

fn insert_sql(target: &Relation) -> String {
    let columns: Vec<&str> = TARGET_COLUMNS.iter().map(|(n, _)| *n).collect();
    let arrays: Vec<String> =
        FIELDS.iter().enumerate().map(|(n, f)| format!("${}::{}[]", n + 1, f.sql_type())).collect();
    format!(
        "INSERT INTO {} ({}) SELECT * FROM unnest({}) ON CONFLICT (id) DO NOTHING",
        target.name,
        columns.join(", "),
        arrays.join(", ")
    )
}

fn insert_arg_types() -> Vec<PgOid> {
    FIELDS.iter().map(|f| PgOid::from(f.array_type())).collect()
}

const RECORD_SQL: &str = "SELECT chat_backfill.record_rejections($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";

fn record_arg_types() -> Vec<PgOid> {
    let text = PgOid::from(pg_sys::TEXTARRAYOID);
    vec![
        PgOid::from(pg_sys::INT8OID),
        PgOid::from(pg_sys::TEXTOID),
        PgOid::from(pg_sys::TEXTOID),
        text, text, text, text, text, text,
        PgOid::from(json_array_oid()),
    ]
}
