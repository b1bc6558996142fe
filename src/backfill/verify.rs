//! `chat_backfill.verify()`: compares a target table with the rows the rules give for the
//! source, chat by chat, without writing anything. For an operator checking a database
//! after a crashed or skipped migration, before and after running the backfill.
//!
//! The source is read through one portal and the target a batch of chats at a time
//! (by `chat_id`), so memory is bounded by a batch. Text, boolean and bigint columns are
//! compared exactly, JSON columns as values; `updated_at`, and `created_at` where it came
//! from the clock (the rules give `now`), are not compared.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;

use super::read::{Fetched, Reader};
use super::settings::Settings;
use crate::app_rows::{self, AppEntry};
use crate::datums::varlena_array;
use crate::error::Result;
use crate::expand::{self, Document, Entry, Span};

/// A batch of the check ends after this many chats or this much chat text.
const CHATS_PER_BATCH: usize = 500;
const BYTES_PER_BATCH: usize = 16 << 20;
/// Target rows per fetch of the cursor over a batch's chats.
const TARGET_ROWS_PER_FETCH: i64 = 1000;

/// Columns compared, in the order of `Row::values` (text-valued) after the fixed ones.
const TEXT_COLUMNS: [&str; 5] = ["user_id", "role", "parent_id", "model_id", "context_summary"];
const JSON_COLUMNS: [&str; 9] = ["content", "output", "files", "sources", "embeds", "status_history", "error", "usage", "meta"];

/// One finding: a row of verify's result.
pub struct Finding {
    pub chat_id: String,
    pub message_key: Option<String>,
    pub kind: &'static str,
    pub columns: Option<Vec<String>>,
}

/// A row, expected or found, as comparable values.
struct Row {
    key: String,
    text: [Option<String>; 5],
    json: [Option<String>; 9],
    done: Option<bool>,
    /// `None`: not compared (it came from the clock).
    created_at: Option<i64>,
    /// Where the message is, to work out its created_at under another clock.
    span: Option<Span>,
}

/// A target row: one the rules give (kept whole, to compare), or one they do not (its key).
enum Found {
    Row(Row),
    Extra(String),
}

#[derive(Default)]
struct Counts {
    chats: i64,
    expected: i64,
    missing: i64,
    different: i64,
    extra: i64,
    partial: i64,
}

pub struct Verifier {
    settings: Settings,
    reader: Reader,
    pending: VecDeque<Finding>,
    exhausted: bool,
    counts: Counts,
    target_sql: String,
    started: Instant,
}

impl Verifier {
    pub fn start(settings: Settings) -> Result<Verifier> {
        let reader = Reader::whole(&settings)?;
        let app = settings.rows.is_app();
        let t = |c: &str| format!("t.{}", pgrx::spi::quote_identifier(c));
        let mut columns = vec![t("id"), t("chat_id")];
        for c in TEXT_COLUMNS {
            columns.push(if c == "context_summary" && !app { "NULL::pg_catalog.text".into() } else { t(c) });
        }
        for c in JSON_COLUMNS {
            columns.push(if c == "meta" && !app { "NULL::pg_catalog.text".into() } else { format!("{}::pg_catalog.text", t(c)) });
        }
        columns.push(t("done"));
        columns.push(t("created_at"));
        let target_sql = format!(
            "SELECT {} FROM {} t WHERE t.chat_id OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.text[])",
            columns.join(", "),
            settings.target.name
        );
        Ok(Verifier {
            settings,
            reader,
            pending: VecDeque::new(),
            exhausted: false,
            counts: Counts::default(),
            target_sql,
            started: Instant::now(),
        })
    }

    pub fn next(&mut self) -> Result<Option<Finding>> {
        loop {
            if let Some(f) = self.pending.pop_front() {
                return Ok(Some(f));
            }
            if self.exhausted {
                return Ok(None);
            }
            self.batch()?;
            if self.exhausted {
                self.reader.close();
                let c = &self.counts;
                notice!(
                    "chat_backfill.verify ({} rows): {} chats checked in {:.1} s, {} rows expected: {} missing, {} \
                     different, {} extra, {} partial chats",
                    self.settings.rows.name(),
                    c.chats,
                    self.started.elapsed().as_secs_f64(),
                    c.expected,
                    c.missing,
                    c.different,
                    c.extra,
                    c.partial
                );
            }
        }
    }

    fn batch(&mut self) -> Result<()> {
        let mut chats: Vec<Fetched> = Vec::new();
        let mut bytes = 0;
        let (settings, reader) = (&self.settings, &mut self.reader);
        let exhausted = Spi::connect(|client| -> Result<bool> {
            while chats.len() < CHATS_PER_BATCH && bytes < BYTES_PER_BATCH {
                pgrx::check_for_interrupts!();
                match reader.next(client, settings)? {
                    None => return Ok(true),
                    Some(f) if f.chat_id.is_none() => {}
                    Some(f) => {
                        bytes += f.chat.as_ref().map_or(0, |c| c.len());
                        chats.push(f);
                    }
                }
            }
            Ok(false)
        })?;
        self.exhausted = exhausted;
        if chats.is_empty() {
            return Ok(());
        }
        let expected: Vec<Vec<(String, Row)>> = chats
            .iter()
            .map(|chat| {
                pgrx::check_for_interrupts!();
                self.expected(chat)
            })
            .collect();
        let wanted: HashSet<&str> = expected.iter().flatten().map(|(id, _)| id.as_str()).collect();
        let mut found = self.target_rows(&chats, &wanted)?;
        for (chat, expected) in chats.iter().zip(expected) {
            pgrx::check_for_interrupts!();
            let chat_id = chat.chat_id.clone().unwrap_or_default();
            let present = found.remove(&chat_id).unwrap_or_default();
            // The migration's rules bound a timestamp by the run's clock (now + 1 day), and
            // verify's clock is later than the run's: a row is right if some clock explains it.
            let column = chat.chat.as_ref().and_then(|c| c.as_str());
            let doc = Document::open(column).ok();
            let retime = |span: Span, now: i64| match doc.as_ref().map(|d| expand::entry_at(d.text(), span, now)) {
                Some(Entry::Row(m)) => Some(m.timestamp),
                _ => None,
            };
            self.compare(chat_id, expected, present, &retime);
        }
        Ok(())
    }

    /// The target's rows of these chats, by chat id, then row id: read through a cursor a
    /// chunk at a time, and kept whole only where the rules give the row (`wanted`); of the
    /// others only the key, so memory follows the source's batch, not the target's size.
    fn target_rows(&self, chats: &[Fetched], wanted: &HashSet<&str>) -> Result<HashMap<String, HashMap<String, Found>>> {
        let ids = chats.iter().map(|c| c.chat_id.as_deref());
        // SAFETY: a text[] of the batch's chat ids.
        let ids = unsafe { DatumWithOid::new(varlena_array(ids, pg_sys::TEXTOID), pg_sys::TEXTARRAYOID) };
        let mut out: HashMap<String, HashMap<String, Found>> = HashMap::new();
        Spi::connect(|client| -> Result<()> {
            let mut cursor = client.try_open_cursor(&self.target_sql, &[ids])?;
            loop {
                pgrx::check_for_interrupts!();
                let table = cursor.fetch(TARGET_ROWS_PER_FETCH)?;
                if table.is_empty() {
                    break;
                }
                for row in table {
                    let id = row.get::<String>(1)?.unwrap_or_default();
                    let chat_id = row.get::<String>(2)?.unwrap_or_default();
                    let key = id.strip_prefix(&format!("{chat_id}-")).unwrap_or(&id).to_owned();
                    if !wanted.contains(id.as_str()) {
                        out.entry(chat_id).or_default().insert(id, Found::Extra(key));
                        continue;
                    }
                    let mut text: [Option<String>; 5] = Default::default();
                    for (n, slot) in text.iter_mut().enumerate() {
                        *slot = row.get::<String>(3 + n)?;
                    }
                    let mut json: [Option<String>; 9] = Default::default();
                    for (n, slot) in json.iter_mut().enumerate() {
                        *slot = row.get::<String>(8 + n)?;
                    }
                    let (done, created_at) = (row.get::<bool>(17)?, row.get::<i64>(18)?);
                    let found = Row { key, text, json, done, created_at, span: None };
                    out.entry(chat_id).or_default().insert(id, Found::Row(found));
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// The rows the rules give for one chat, by row id.
    fn expected(&self, chat: &Fetched) -> Vec<(String, Row)> {
        let chat_id = chat.chat_id.as_deref().unwrap_or_default();
        let column = chat.chat.as_ref().and_then(|c| c.as_str());
        let (now, later) = (self.settings.now, self.settings.now + 7919);
        let mut out = Vec::new();
        if self.settings.rows.is_app() {
            let Ok(opened) = app_rows::open(column, chat.user_id.as_deref(), app_rows::APP_MAX_DEPTH) else { return out };
            let (doc, codec) = (opened.doc, opened.codec);
            let mut poll = || {
                pgrx::check_for_interrupts!();
            };
            let Ok(indexed) = app_rows::index(doc, &mut poll) else { return out };
            let server = app_rows::Server { major: crate::version::major() };
            let (Ok(at_now), Ok(later_entries)) = (
                app_rows::expand(doc, &indexed, now, server, codec, &mut poll),
                app_rows::expand(doc, &indexed, later, server, codec, &mut poll),
            ) else {
                return out;
            };
            for (entry, later_entry) in at_now.into_iter().zip(later_entries) {
                match (entry, later_entry) {
                    (AppEntry::Row(m), AppEntry::Row(m2)) => {
                        let user = m.user_id.as_deref().or(chat.user_id.as_deref()).map(str::to_owned);
                        let row = Row {
                            key: m.key.to_string(),
                            text: [user, Some(m.role.to_string()), owned(&m.parent_id), owned(&m.model_id), owned(&m.context_summary)],
                            json: [&m.content, &m.output, &m.files, &m.sources, &m.embeds, &m.status_history, &m.error, &m.usage, &m.meta]
                                .map(|v| Some(v.to_string())),
                            done: m.done,
                            created_at: (m.created_at == m2.created_at).then_some(m.created_at),
                            span: None,
                        };
                        out.push((format!("{chat_id}-{}", m.key), row));
                    }
                    // A message the app fails on: the app writes no row of the chat.
                    (AppEntry::Failed { .. }, _) => return Vec::new(),
                    _ => {}
                }
            }
        } else {
            let Ok(doc) = Document::open(column) else { return out };
            let Ok(spans) = doc.index_polling(&mut || {
                pgrx::check_for_interrupts!();
            }) else { return out };
            for span in spans {
                if let (Entry::Row(m), Entry::Row(m2)) = (expand::entry_at(doc.text(), span, now), expand::entry_at(doc.text(), span, later)) {
                    let json = [m.content, m.output, m.files, m.sources, m.embeds, m.status_history, m.error, m.usage];
                    let mut row = Row {
                        key: m.key.to_string(),
                        text: [chat.user_id.clone(), Some(m.role.to_string()), owned(&m.parent_id), owned(&m.model_id), None],
                        json: Default::default(),
                        done: m.done,
                        created_at: (m.timestamp == m2.timestamp).then_some(m.timestamp),
                        span: Some(span),
                    };
                    for (slot, value) in row.json.iter_mut().zip(json) {
                        *slot = Some(value.to_owned());
                    }
                    out.push((m.id(chat_id), row));
                }
            }
        }
        out
    }

    fn compare(
        &mut self,
        chat_id: String,
        expected: Vec<(String, Row)>,
        mut present: HashMap<String, Found>,
        retime: &dyn Fn(Span, i64) -> Option<i64>,
    ) {
        self.counts.chats += 1;
        self.counts.expected += expected.len() as i64;
        let app = self.settings.rows.is_app();
        let mut missing = Vec::new();
        let mut found_any = false;
        for (id, want) in expected {
            let Some(Found::Row(got)) = present.remove(&id) else {
                missing.push(want.key);
                continue;
            };
            found_any = true;
            let mut columns = Vec::new();
            for (n, name) in TEXT_COLUMNS.iter().enumerate() {
                if (app || *name != "context_summary") && want.text[n] != got.text[n] {
                    columns.push(name.to_string());
                }
            }
            for (n, name) in JSON_COLUMNS.iter().enumerate() {
                if (app || *name != "meta") && !same_json(want.json[n].as_deref(), got.json[n].as_deref()) {
                    columns.push(name.to_string());
                }
            }
            if want.done != got.done {
                columns.push("done".into());
            }
            let explained = |span: Span| got.created_at.is_some_and(|t| retime(span, t) == Some(t));
            if want.created_at.is_some() && want.created_at != got.created_at && !want.span.is_some_and(explained) {
                columns.push("created_at".into());
            }
            if !columns.is_empty() {
                self.counts.different += 1;
                self.pending.push_back(Finding {
                    chat_id: chat_id.clone(),
                    message_key: Some(want.key),
                    kind: "different",
                    columns: Some(columns),
                });
            }
        }
        if found_any && !missing.is_empty() {
            self.counts.partial += 1;
            self.pending.push_back(Finding { chat_id: chat_id.clone(), message_key: None, kind: "partial_chat", columns: None });
        }
        for key in missing {
            self.counts.missing += 1;
            self.pending.push_back(Finding { chat_id: chat_id.clone(), message_key: Some(key), kind: "missing", columns: None });
        }
        let mut extra: Vec<String> = present
            .into_values()
            .map(|f| match f {
                Found::Extra(key) => key,
                Found::Row(row) => row.key,
            })
            .collect();
        extra.sort();
        for (n, key) in extra.into_iter().enumerate() {
            if n % 1024 == 0 {
                pgrx::check_for_interrupts!();
            }
            self.counts.extra += 1;
            self.pending.push_back(Finding { chat_id: chat_id.clone(), message_key: Some(key), kind: "extra", columns: None });
        }
    }
}

fn owned(v: &Option<std::borrow::Cow<'_, str>>) -> Option<String> {
    v.as_deref().map(str::to_owned)
}

/// Two JSON texts hold the same value: objects compared by key (last duplicate wins),
/// numbers by value (an int and a float are equal when Python says so). A text that does
/// not parse (nesting deeper than serde_json's 128 levels, lone surrogates) is compared as
/// text. SQL NULL equals JSON `null`: the application reads both as None (a table the
/// migration's mapping filled has SQL NULL in `meta`, the app writes JSON `null`).
pub fn same_json(a: Option<&str>, b: Option<&str>) -> bool {
    let a = a.filter(|v| v.trim() != "null");
    let b = b.filter(|v| v.trim() != "null");
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) if a == b => true,
        (Some(a), Some(b)) => match (serde_json::from_str::<serde_json::Value>(a), serde_json::from_str::<serde_json::Value>(b)) {
            (Ok(x), Ok(y)) => same_value(&x, &y),
            _ => minified(a) == minified(b),
        },
        _ => false,
    }
}

fn same_value(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value::*;
    match (a, b) {
        (Number(x), Number(y)) => match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
            (Some(p), Some(q), _, _) => p == q,
            (_, _, Some(p), Some(q)) => p == q,
            _ => x.as_f64() == y.as_f64(),
        },
        (Array(x), Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_value(p, q)),
        (Object(x), Object(y)) => x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same_value(v, w))),
        _ => a == b,
    }
}

/// A JSON text without its insignificant whitespace (outside strings), for values too deep
/// to parse: the app's fallback writer puts spaces after `,` and `:`, a jsonb target
/// prints its own spacing. Linear, no recursion.
fn minified(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            out.push(c);
        }
    }
    out
}
