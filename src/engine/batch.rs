//! One batch of rows, column by column, in the target's column order. Values are
//! PostgreSQL `text` datums, written once into a memory context of the batch's own: the
//! array parameters of the INSERT (of the whole batch or of any half being retried) and
//! the COPY lines are built from them without another copy, and the context goes when
//! the batch does.

use std::ops::Range;

use chat_backfill_rules::app_rows::AppMessage;
use chat_backfill_rules::migration_rows::Message;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;

use crate::engine::copy_feed::{push_binary_field, push_binary_null, push_escaped, CopySource};
use crate::engine::direct_insert::DatumSource;
use crate::pg::datums::{bool_array, datum_array, int8_array, text_datum, text_str};

pub struct Rows {
    context: pg_sys::MemoryContext,
    /// Whether the rows are app rows (19 columns) rather than the migration's (17).
    app: bool,
    /// id, chat_id, user_id, role, parent_id, model_id, context_summary (NULL: `None`)
    text: [Vec<Option<pg_sys::Datum>>; 7],
    /// content, output, files, sources, embeds, status_history, error, usage, meta
    json: [Vec<pg_sys::Datum>; 9],
    done: Vec<Option<bool>>,
    timestamp: Vec<i64>,
    /// updated_at where it differs from created_at (app rows: the run's clock).
    updated: Vec<i64>,
    /// Bytes of text held, so a batch of big messages ends before memory grows.
    bytes: usize,
}

impl Rows {
    pub fn new(app: bool) -> Rows {
        // SAFETY: a child of the transaction's context, deleted by `drop` (or with the
        // transaction if an error ends it first).
        let context = unsafe {
            pg_sys::AllocSetContextCreateExtended(
                pg_sys::TopTransactionContext,
                c"chat_backfill batch".as_ptr(),
                pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
            )
        };
        Rows {
            context,
            app,
            text: Default::default(),
            json: Default::default(),
            done: Vec::new(),
            timestamp: Vec::new(),
            updated: Vec::new(),
            bytes: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.timestamp.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn push(&mut self, chat_id: &str, user_id: Option<&str>, m: Message<'_>) {
        let id = m.id(chat_id);
        let json = [m.content, m.output, m.files, m.sources, m.embeds, m.status_history, m.error, m.usage];
        let text = [m.parent_id.as_deref(), m.model_id.as_deref(), user_id].iter().flatten().map(|v| v.len()).sum::<usize>();
        self.bytes += id.len() + chat_id.len() + m.role.len() + text + json.iter().map(|v| v.len()).sum::<usize>();
        // SAFETY: switches to the batch's own context for the copies and back.
        let caller = unsafe { pg_sys::MemoryContextSwitchTo(self.context) };
        let [ids, chats, users, roles, parents, models, _] = &mut self.text;
        ids.push(Some(text_datum(&id)));
        chats.push(Some(text_datum(chat_id)));
        users.push(user_id.map(text_datum));
        roles.push(Some(text_datum(&m.role)));
        parents.push(m.parent_id.as_deref().map(text_datum));
        models.push(m.model_id.as_deref().map(text_datum));
        for (column, value) in self.json.iter_mut().zip(json) {
            column.push(text_datum(value));
        }
        // SAFETY: restores the caller's context.
        unsafe { pg_sys::MemoryContextSwitchTo(caller) };
        self.done.push(m.done);
        self.timestamp.push(m.timestamp);
    }

    /// An app row (`app_rows`): the message's own user_id if it has one, else the chat's.
    pub fn push_app(&mut self, chat_id: &str, chat_user_id: Option<&str>, m: &AppMessage<'_>, now: i64) {
        let mut id = String::with_capacity(chat_id.len() + 1 + m.key.len());
        id.push_str(chat_id);
        id.push('-');
        id.push_str(&m.key);
        let user_id = m.user_id.as_deref().or(chat_user_id);
        let json = [&m.content, &m.output, &m.files, &m.sources, &m.embeds, &m.status_history, &m.error, &m.usage, &m.meta];
        let texts = [Some(id.as_str()), Some(chat_id), user_id, Some(&*m.role), m.parent_id.as_deref(), m.model_id.as_deref(),
            m.context_summary.as_deref()];
        self.bytes += texts.iter().flatten().map(|v| v.len()).sum::<usize>() + json.iter().map(|v| v.len()).sum::<usize>();
        // SAFETY: switches to the batch's own context for the copies and back.
        let caller = unsafe { pg_sys::MemoryContextSwitchTo(self.context) };
        for (column, value) in self.text.iter_mut().zip(texts) {
            column.push(value.map(text_datum));
        }
        for (column, value) in self.json.iter_mut().zip(json) {
            column.push(text_datum(value));
        }
        // SAFETY: restores the caller's context.
        unsafe { pg_sys::MemoryContextSwitchTo(caller) };
        self.done.push(m.done);
        self.timestamp.push(m.created_at);
        self.updated.push(now);
    }

    /// The fields of these rows, in the order of `target_columns`.
    pub fn fields(&self) -> &'static [Field] {
        fields(self.app)
    }

    /// Where each chat's rows lie (rows are pushed a chat at a time).
    pub fn chats(&self) -> Vec<Range<usize>> {
        let mut out: Vec<Range<usize>> = Vec::new();
        for i in 0..self.len() {
            match out.last_mut() {
                Some(last) if self.ids(last.start).1 == self.ids(i).1 => last.end = i + 1,
                _ => out.push(i..i + 1),
            }
        }
        out
    }

    /// The INSERT's array parameters for rows `r`, one per target column, in order.
    pub fn arguments(&self, r: Range<usize>) -> Vec<DatumWithOid<'static>> {
        self.arguments_of(&r.collect::<Vec<_>>())
    }

    /// The same for the rows at positions `rows`.
    pub fn arguments_of(&self, rows: &[usize]) -> Vec<DatumWithOid<'static>> {
        let pick = |column: &[Option<pg_sys::Datum>]| rows.iter().map(|&i| column[i]).collect::<Vec<_>>();
        self.fields()
            .iter()
            .map(|field| {
                let array = match *field {
                    Field::Text(c) => datum_array(&pick(&self.text[c]), pg_sys::TEXTOID),
                    Field::Json(c) => {
                        let values: Vec<Option<pg_sys::Datum>> = rows.iter().map(|&i| Some(self.json[c][i])).collect();
                        datum_array(&values, pg_sys::JSONOID)
                    }
                    Field::Done => bool_array(&rows.iter().map(|&i| self.done[i]).collect::<Vec<_>>()),
                    Field::Timestamp => int8_array(&rows.iter().map(|&i| self.timestamp[i]).collect::<Vec<_>>()),
                    Field::Updated => int8_array(&rows.iter().map(|&i| self.updated[i]).collect::<Vec<_>>()),
                };
                // SAFETY: `array` is an array of exactly `array_type()`'s element type.
                unsafe { DatumWithOid::new(array, field.array_type()) }
            })
            .collect()
    }

    pub fn text(&self, column: usize, i: usize) -> Option<&str> {
        // SAFETY: made by `text_datum` in this batch's context, which lives as long as `self`.
        self.text[column][i].map(|d| unsafe { text_str(d) })
    }

    fn json(&self, column: usize, i: usize) -> &str {
        // SAFETY: as for `text`.
        unsafe { text_str(self.json[column][i]) }
    }

    /// The row's id and chat id.
    pub fn ids(&self, i: usize) -> (&str, &str) {
        (self.text(0, i).unwrap_or_default(), self.text(1, i).unwrap_or_default())
    }

    /// The row as a JSON object, for the rejected-rows table.
    pub fn as_json(&self, i: usize) -> String {
        let mut out = String::from("{");
        let texts = ["id", "chat_id", "user_id", "role", "parent_id", "model_id"];
        for (col, name) in texts.iter().enumerate() {
            let value = self.text(col, i).map_or("null".to_owned(), |s| serde_json::Value::from(s).to_string());
            out.push_str(&format!("\"{name}\":{value},"));
        }
        let jsons = ["content", "output", "files", "sources", "embeds", "status_history", "error", "usage"];
        for (col, name) in jsons.iter().enumerate() {
            out.push_str(&format!("\"{name}\":{},", self.json(col, i)));
        }
        if self.app {
            let summary = self.text(6, i).map_or("null".to_owned(), |s| serde_json::Value::from(s).to_string());
            out.push_str(&format!("\"meta\":{},\"context_summary\":{summary},", self.json(8, i)));
        }
        let done = self.done[i].map_or("null".to_owned(), |b| b.to_string());
        out.push_str(&format!("\"done\":{done},\"created_at\":{}}}", self.timestamp[i]));
        out
    }
}

impl Drop for Rows {
    fn drop(&mut self) {
        // SAFETY: the context is this batch's alone; no datum in it outlives `self`.
        unsafe { pg_sys::MemoryContextDelete(self.context) };
    }
}

impl CopySource for Rows {

    fn write_line(&self, i: usize, out: &mut Vec<u8>) {
        for (n, &field) in self.fields().iter().enumerate() {
            if n > 0 {
                out.push(b'\t');
            }
            match field {
                Field::Text(c) => match self.text(c, i) {
                    Some(s) => push_escaped(out, s),
                    None => out.extend_from_slice(b"\\N"),
                },
                Field::Json(c) => push_escaped(out, self.json(c, i)),
                Field::Done => match self.done[i] {
                    Some(true) => out.push(b't'),
                    Some(false) => out.push(b'f'),
                    None => out.extend_from_slice(b"\\N"),
                },
                Field::Timestamp => out.extend_from_slice(self.timestamp[i].to_string().as_bytes()),
                Field::Updated => out.extend_from_slice(self.updated[i].to_string().as_bytes()),
            }
        }
        out.push(b'\n');
    }

    fn write_binary(&self, i: usize, jsonb: &[bool], out: &mut Vec<u8>) {
        let fields = self.fields();
        out.extend_from_slice(&(fields.len() as i16).to_be_bytes());
        for (n, &field) in fields.iter().enumerate() {
            match field {
                Field::Text(c) => match self.text(c, i) {
                    Some(s) => push_binary_field(out, &[], s.as_bytes()),
                    None => push_binary_null(out),
                },
                Field::Json(c) => {
                    let version: &[u8] = if jsonb.get(n).copied().unwrap_or(false) { &[1] } else { &[] };
                    push_binary_field(out, version, self.json(c, i).as_bytes());
                }
                Field::Done => match self.done[i] {
                    Some(done) => push_binary_field(out, &[], &[u8::from(done)]),
                    None => push_binary_null(out),
                },
                Field::Timestamp => push_binary_field(out, &[], &self.timestamp[i].to_be_bytes()),
                Field::Updated => push_binary_field(out, &[], &self.updated[i].to_be_bytes()),
            }
        }
    }
}

impl DatumSource for Rows {
    fn rows(&self) -> usize {
        self.len()
    }

    fn value(&self, n: usize, i: usize) -> Option<pg_sys::Datum> {
        match self.fields()[n] {
            Field::Text(c) => self.text[c][i],
            Field::Json(c) => Some(self.json[c][i]),
            Field::Done => self.done[i].map(pg_sys::Datum::from),
            Field::Timestamp => Some(pg_sys::Datum::from(self.timestamp[i])),
            Field::Updated => Some(pg_sys::Datum::from(self.updated[i])),
        }
    }

    fn value_type(&self, n: usize) -> pg_sys::Oid {
        match self.fields()[n] {
            Field::Text(_) => pg_sys::TEXTOID,
            Field::Json(_) => pg_sys::JSONOID,
            Field::Done => pg_sys::BOOLOID,
            Field::Timestamp | Field::Updated => pg_sys::INT8OID,
        }
    }
}

/// Where each target column's value lives in `Rows`.
#[derive(Clone, Copy)]
pub enum Field {
    /// `Rows::text[i]`
    Text(usize),
    /// `Rows::json[i]`
    Json(usize),
    Done,
    Timestamp,
    /// `Rows::updated`
    Updated,
}

/// The fields of a run's rows: the migration's 17 columns, or the app's 19.
pub fn fields(app: bool) -> &'static [Field] {
    if app {
        &APP_FIELDS
    } else {
        &FIELDS
    }
}

/// `target_columns(true)`, same order: the migration's columns (updated_at is the run's
/// clock), then meta and context_summary.
const APP_FIELDS: [Field; 19] = [
    Field::Text(0),
    Field::Text(1),
    Field::Text(2),
    Field::Text(3),
    Field::Text(4),
    Field::Json(0),
    Field::Json(1),
    Field::Text(5),
    Field::Json(2),
    Field::Json(3),
    Field::Json(4),
    Field::Done,
    Field::Json(5),
    Field::Json(6),
    Field::Json(7),
    Field::Timestamp,
    Field::Updated,
    Field::Json(8),   // meta
    Field::Text(6),   // context_summary
];

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
    /// The element type, spelled so that no search_path can change it.
    pub fn sql_type(self) -> &'static str {
        match self {
            Field::Text(_) => "pg_catalog.text",
            Field::Json(_) => "pg_catalog.json",
            Field::Done => "pg_catalog.bool",
            Field::Timestamp | Field::Updated => "pg_catalog.int8",
        }
    }

    pub fn array_type(self) -> pg_sys::Oid {
        match self {
            Field::Text(_) => pg_sys::TEXTARRAYOID,
            Field::Json(_) => json_array_oid(),
            Field::Done => pg_sys::BOOLARRAYOID,
            Field::Timestamp | Field::Updated => pg_sys::INT8ARRAYOID,
        }
    }
}

pub fn json_array_oid() -> pg_sys::Oid {
    // SAFETY: a syscache lookup of a built-in type.
    unsafe { pg_sys::get_array_type(pg_sys::JSONOID) }
}
