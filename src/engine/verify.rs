//! `chat_backfill.verify()`: compares a target table with the rows the rules give for the
//! source, chat by chat, without writing anything. For an operator checking a database
//! after a crashed or skipped migration, before and after running the backfill.
//!
//! The source is read through one portal and the target a batch of chats at a time
//! (by `chat_id`), so memory is bounded by a batch. A chat of more than `SLICE` messages or
//! `SLICE_BYTES` of text is checked on its own, a slice of its messages at a time (the
//! target's rows looked up by id), its extra rows last by their ids alone: memory follows the
//! slice and the chat's text, not the chat's rows (app rows too: the app's repair check and
//! whether it fails on a message, which leaves the chat without rows, are read off the text
//! first, keeping what the repair needs of each message). A chat over `stream_chats_over` in
//! its TOAST table is such a chat whose text streams (issue 26): memory follows the slice. Text,
//! boolean and bigint columns are compared exactly, JSON columns as values; `updated_at`, and `created_at` where it came
//! from the clock (the rules give `now`), are not compared.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

use chat_backfill_rules::app_rows::{self, AppEntry};
use chat_backfill_rules::migration_rows::{self, Body, Document, Entry, Span};
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;

use crate::pg::datums::varlena_array;
use crate::pg::error::Result;
use crate::pg::datums::{Chat, ChatText};
use super::read::{Fetched, Reader};
use super::request::Settings;
use super::streamed::{index_app_streamed, index_streamed, repair_check, AppIndexed, Indexed, Messages, Streamed};

/// A batch of the check ends after this many chats or this much chat text.
const CHATS_PER_BATCH: usize = 500;
const BYTES_PER_BATCH: usize = 16 << 20;
/// Target rows per fetch of the cursor over a batch's chats.
const TARGET_ROWS_PER_FETCH: i64 = 1000;
/// A chat of more messages or more text than this is checked on its own, a slice of at
/// most this many messages and this much of their text (or one message) at a time.
const SLICE: usize = 2000;
const SLICE_BYTES: usize = 8 << 20;

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
    /// The same columns, for the rows of one chat with the given ids.
    slice_sql: String,
    started: Instant,
    /// A chat of more than `SLICE` messages being checked, and the chats fetched after it.
    long: Option<LongChat>,
    carried: VecDeque<ToCheck>,
}

/// A chat read for the check: its text held, or (a chat over `stream_chats_over`) opened
/// as a long chat whose text streams.
enum ToCheck {
    Held(Fetched<ChatText>),
    Long(Box<LongChat>),
}

/// A long chat part way through its check.
struct LongChat {
    chat: Fetched<ChatText>,
    chat_id: String,
    body: Body,
    spans: Vec<Span>,
    /// The first message not checked yet.
    next: usize,
    /// App rows: how the app's codec reads the chat (`None`: the migration's rows).
    app: Option<app_rows::Codec>,
    /// Instead of the chat's text: its stream (spans count from the text's first byte).
    streamed: Option<Streamed>,
    /// Hashes of the row ids the rules give (8 bytes a row, reserved once), sorted before
    /// the extra rows are told by them.
    expected: Vec<u64>,
    found_any: bool,
    missing_any: bool,
}

impl LongChat {
    fn new(chat: Fetched<ChatText>, body: Body, spans: Vec<Span>, app: Option<app_rows::Codec>, streamed: Option<Streamed>) -> LongChat {
        let chat_id = chat.chat_id.clone().unwrap_or_default();
        let expected = Vec::with_capacity(spans.len());
        LongChat { chat, chat_id, body, spans, next: 0, app, streamed, expected, found_any: false, missing_any: false }
    }
}

/// A fetched chat as the check takes it: held (read whole if it streams but the stream
/// cannot take it), or a streamed chat opened as a long chat. A chat the rules give no rows
/// for is held without text: its target rows are all extra.
fn to_check(fetched: Fetched, settings: &Settings) -> Result<ToCheck> {
    let Fetched { chat_id, user_id, chat } = fetched;
    let held = |text: Option<ChatText>| ToCheck::Held(Fetched { chat_id: chat_id.clone(), user_id: user_id.clone(), chat: text });
    let mut stream = match chat {
        Some(Chat::Toasted(stream)) => stream,
        chat => return Ok(ToCheck::Held(Fetched { chat_id, user_id, chat }.held()?)),
    };
    let long = |spans, app, streamed: Streamed| {
        let chat = Fetched { chat_id: chat_id.clone(), user_id: user_id.clone(), chat: None };
        Ok(ToCheck::Long(Box::new(LongChat::new(chat, Body::Within(0..0), spans, app, Some(streamed)))))
    };
    if !settings.rows.is_app() {
        return match index_streamed(&mut stream, &mut None)? {
            Ok(Indexed::Streamed(spans)) => {
                stream.restart();
                long(spans, None, Streamed::new(stream))
            }
            Ok(Indexed::Whole(text)) => Ok(held(Some(text))),
            Ok(Indexed::Held(..)) | Err(_) => Ok(held(None)),
        };
    }
    let (indexed, codec) = match index_app_streamed(&mut stream, user_id.as_deref())? {
        Ok(AppIndexed::Streamed(indexed, codec)) => (indexed, codec),
        Ok(AppIndexed::Whole(text)) => return Ok(held(Some(text))),
        Err(_) => return Ok(held(None)),
    };
    // The app's check, and whether it fails on a message (then it writes no row of the
    // chat): read off the stream first, in one pass.
    stream.restart();
    let mut streamed = Streamed::new(stream);
    let mut messages = Messages::Streamed(&mut streamed);
    let mut poll = || {
        pgrx::check_for_interrupts!();
    };
    let server = app_rows::Server { major: crate::pg::version::major() };
    let mut fails = false;
    let checked = repair_check(&mut messages, &indexed.spans, indexed.current_id.clone(), &mut poll, |text, span| {
        fails = fails || matches!(app_rows::entry_at(text, span, settings.now, server, codec), AppEntry::Failed { .. });
    })?;
    if checked.is_err() || fails {
        return Ok(held(None));
    }
    streamed.rewind();
    long(indexed.spans, Some(codec), streamed)
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
        let slice_sql = format!(
            "SELECT {} FROM {} t WHERE t.chat_id OPERATOR(pg_catalog.=) $1::pg_catalog.text \
             AND t.id OPERATOR(pg_catalog.=) ANY ($2::pg_catalog.text[])",
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
            slice_sql,
            started: Instant::now(),
            long: None,
            carried: VecDeque::new(),
        })
    }

    pub fn next(&mut self) -> Result<Option<Finding>> {
        loop {
            if let Some(f) = self.pending.pop_front() {
                return Ok(Some(f));
            }
            if self.long.is_some() {
                self.long_slice()?;
                continue;
            }
            if self.exhausted && self.carried.is_empty() {
                return Ok(None);
            }
            self.batch()?;
            if self.exhausted && self.carried.is_empty() && self.long.is_none() {
                self.summarize();
            }
        }
    }

    /// The portal closed and the summary NOTICE, once every chat is checked.
    fn summarize(&mut self) {
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

    fn batch(&mut self) -> Result<()> {
        let mut chats: Vec<Fetched<ChatText>> = Vec::new();
        let mut bytes = 0;
        // A streamed chat waiting in `carried` ends the batch before it.
        let mut blocked = false;
        while chats.len() < CHATS_PER_BATCH && bytes < BYTES_PER_BATCH {
            match self.carried.pop_front() {
                None => break,
                Some(ToCheck::Held(f)) => {
                    bytes += f.chat.as_ref().map_or(0, |c| c.len());
                    chats.push(f);
                }
                Some(ToCheck::Long(long)) if chats.is_empty() => {
                    self.long = Some(*long);
                    return Ok(());
                }
                Some(long) => {
                    self.carried.push_front(long);
                    blocked = true;
                    break;
                }
            }
        }
        if !self.exhausted && !blocked {
            let (settings, reader) = (&self.settings, &mut self.reader);
            let (exhausted, long) = Spi::connect(|client| -> Result<(bool, Option<Box<LongChat>>)> {
                while chats.len() < CHATS_PER_BATCH && bytes < BYTES_PER_BATCH {
                    pgrx::check_for_interrupts!();
                    match reader.next(client, settings)? {
                        None => return Ok((true, None)),
                        Some(f) if f.chat_id.is_none() => {}
                        Some(f) => match to_check(f, settings)? {
                            ToCheck::Held(f) => {
                                bytes += f.chat.as_ref().map_or(0, |c| c.len());
                                chats.push(f);
                            }
                            ToCheck::Long(long) => return Ok((false, Some(long))),
                        },
                    }
                }
                Ok((false, None))
            })?;
            self.exhausted = exhausted;
            match long {
                Some(long) if chats.is_empty() => {
                    self.long = Some(*long);
                    return Ok(());
                }
                Some(long) => self.carried.push_back(ToCheck::Long(long)),
                None => {}
            }
        }
        if chats.is_empty() {
            return Ok(());
        }
        let mut expected: Vec<Vec<(String, Row)>> = Vec::with_capacity(chats.len());
        for (n, chat) in chats.iter().enumerate() {
            pgrx::check_for_interrupts!();
            match self.expected(chat) {
                Expected::Rows(rows) => expected.push(rows),
                // A long chat is checked on its own, after the chats before it; the chats
                // after it wait for its end.
                Expected::Long { body, spans, app } => {
                    let mut rest = chats.split_off(n);
                    let chat = rest.remove(0);
                    for later in rest.into_iter().rev() {
                        self.carried.push_front(ToCheck::Held(later));
                    }
                    self.long = Some(LongChat::new(chat, body, spans, app, None));
                    break;
                }
            }
        }
        if chats.is_empty() {
            return Ok(());
        }
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
            let retime = |span: Span, now: i64| match doc.as_ref().map(|d| migration_rows::entry_at(d.text(), span, now)) {
                Some(Entry::Row(m)) => Some(m.timestamp),
                _ => None,
            };
            self.compare(chat_id, expected, present, &retime);
        }
        Ok(())
    }

    /// The target's rows of these chats, by chat id, then row id (see `fetch_rows`).
    fn target_rows(&self, chats: &[Fetched<ChatText>], wanted: &HashSet<&str>) -> Result<HashMap<String, HashMap<String, Found>>> {
        let ids = chats.iter().map(|c| c.chat_id.as_deref());
        // SAFETY: a text[] of the batch's chat ids.
        let ids = unsafe { DatumWithOid::new(varlena_array(ids, pg_sys::TEXTOID), pg_sys::TEXTARRAYOID) };
        fetch_rows(&self.target_sql, vec![ids], wanted)
    }

    /// The rows the rules give for one chat, by row id; or, for a chat of more than `SLICE`
    /// messages (migration rows), where its messages lie, to be checked a slice at a time.
    fn expected(&self, chat: &Fetched<ChatText>) -> Expected {
        let chat_id = chat.chat_id.as_deref().unwrap_or_default();
        let column = chat.chat.as_ref().and_then(|c| c.as_str());
        let now = self.settings.now;
        let mut out = Vec::new();
        if self.settings.rows.is_app() {
            let Ok(opened) = app_rows::open(column, chat.user_id.as_deref(), app_rows::APP_MAX_DEPTH) else {
                return Expected::Rows(out);
            };
            let (doc, codec) = (opened.doc, opened.codec);
            let mut poll = || {
                pgrx::check_for_interrupts!();
            };
            let Ok(indexed) = app_rows::index(doc, &mut poll) else { return Expected::Rows(out) };
            if app_rows::check(doc, &indexed, &mut poll).is_err() {
                return Expected::Rows(out);
            }
            let server = app_rows::Server { major: crate::pg::version::major() };
            // A message the app fails on: the app writes no row of the chat.
            for (n, &span) in indexed.spans.iter().enumerate() {
                if n % 1024 == 0 {
                    poll();
                }
                if let AppEntry::Failed { .. } = app_rows::entry_at(doc, span, now, server, codec) {
                    return Expected::Rows(out);
                }
            }
            if indexed.spans.len() > SLICE || doc.len() > SLICE_BYTES {
                let start = doc.as_ptr() as usize - column.unwrap_or_default().as_ptr() as usize;
                return Expected::Long { body: Body::Within(start..start + doc.len()), spans: indexed.spans, app: Some(codec) };
            }
            out = app_rows_of(chat_id, chat.user_id.as_deref(), doc, &indexed.spans, now, codec);
        } else {
            let Some(column) = column else { return Expected::Rows(out) };
            let Ok(doc) = Document::open(Some(column)) else { return Expected::Rows(out) };
            let Ok(spans) = doc.index_polling(&mut || {
                pgrx::check_for_interrupts!();
            }) else {
                return Expected::Rows(out);
            };
            if spans.len() > SLICE || doc.text().len() > SLICE_BYTES {
                return Expected::Long { body: doc.into_body(column), spans, app: None };
            }
            out = migration_rows(chat_id, chat.user_id.as_deref(), doc.text(), &spans, now);
        }
        Expected::Rows(out)
    }

    /// One slice of a long chat's messages: its rows checked against the target's rows of
    /// those ids; after the last slice, the target's other rows of the chat are the extras.
    fn long_slice(&mut self) -> Result<()> {
        let Some(long) = self.long.as_mut() else { return Ok(()) };
        let now = self.settings.now;
        if long.next < long.spans.len() {
            let column = long.chat.chat.as_ref().and_then(|c| c.as_str()).unwrap_or_default();
            let user_id = long.chat.user_id.as_deref();
            // At most SLICE messages and SLICE_BYTES of their text (or one message): the
            // slice's expected rows and the target's rows of it are held, each about that much.
            let from = long.spans[long.next].bytes().start;
            let mut end = long.next + 1;
            while end < long.spans.len() && end - long.next < SLICE && long.spans[end].bytes().end - from <= SLICE_BYTES {
                end += 1;
            }
            let (text, slice) = match &mut long.streamed {
                None => (long.body.text(column), std::borrow::Cow::Borrowed(&long.spans[long.next..end])),
                // The slice's messages as one piece of the text, the spans shifted into it.
                Some(streamed) => {
                    let text = streamed.text(from..long.spans[end - 1].bytes().end)?.ok_or_else(|| {
                        crate::pg::error::Error::new(
                            pgrx::PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
                            format!("chat {}: its TOAST value went during the check", long.chat_id),
                            "Run verify() again.",
                        )
                    })?;
                    let slice = long.spans[long.next..end].iter().map(|s| s.shifted_back(from)).collect::<Vec<_>>();
                    (text, std::borrow::Cow::Owned(slice))
                }
            };
            let expected = match long.app {
                Some(codec) => app_rows_of(&long.chat_id, user_id, text, &slice, now, codec),
                None => migration_rows(&long.chat_id, user_id, text, &slice, now),
            };
            long.next = end;
            long.expected.extend(expected.iter().map(|(id, _)| id_hash(id)));
            let ids = expected.iter().map(|(id, _)| Some(id.as_str()));
            // SAFETY: a text[] of the slice's row ids.
            let ids = unsafe { DatumWithOid::new(varlena_array(ids, pg_sys::TEXTOID), pg_sys::TEXTARRAYOID) };
            let args = vec![DatumWithOid::from(long.chat_id.as_str()), ids];
            let wanted: HashSet<&str> = expected.iter().map(|(id, _)| id.as_str()).collect();
            let mut found = fetch_rows(&self.slice_sql, args, &wanted)?;
            let present = found.remove(&long.chat_id).unwrap_or_default();
            let retime = |span: Span, now: i64| match migration_rows::entry_at(text, span, now) {
                Entry::Row(m) => Some(m.timestamp),
                _ => None,
            };
            let chat_id = long.chat_id.clone();
            let mut present = present;
            let (found_any, missing) =
                compare_rows(&self.settings, &mut self.counts, &mut self.pending, &chat_id, expected, &mut present, &retime);
            let long = self.long.as_mut().expect("the long chat being checked");
            long.found_any |= found_any;
            long.missing_any |= !missing.is_empty();
            push_missing(&mut self.pending, &chat_id, missing);
            return Ok(());
        }
        // The target's rows of this chat that the rules do not give, by id alone.
        let Some(mut long) = self.long.take() else { return Ok(()) };
        // The text and the message positions are no longer needed; the hashes are looked up.
        long.spans = Vec::new();
        long.chat.chat = None;
        long.streamed = None;
        long.expected.sort_unstable();
        let mut extra = Vec::new();
        Spi::connect(|client| -> Result<()> {
            let sql = format!(
                "SELECT t.id FROM {} t WHERE t.chat_id OPERATOR(pg_catalog.=) $1::pg_catalog.text",
                self.settings.target.name
            );
            let mut cursor = client.try_open_cursor(&sql, &[long.chat_id.as_str().into()])?;
            loop {
                pgrx::check_for_interrupts!();
                let table = cursor.fetch(TARGET_ROWS_PER_FETCH)?;
                if table.is_empty() {
                    break;
                }
                for row in table {
                    let id = row.get::<String>(1)?.unwrap_or_default();
                    if long.expected.binary_search(&id_hash(&id)).is_err() {
                        extra.push(id.strip_prefix(&format!("{}-", long.chat_id)).unwrap_or(&id).to_owned());
                    }
                }
            }
            Ok(())
        })?;
        self.counts.chats += 1;
        if long.found_any && long.missing_any {
            self.counts.partial += 1;
            self.pending.push_back(Finding { chat_id: long.chat_id.clone(), message_key: None, kind: "partial_chat", columns: None });
        }
        push_extras(&mut self.counts, &mut self.pending, &long.chat_id, extra);
        if self.exhausted && self.carried.is_empty() {
            self.summarize();
        }
        Ok(())
    }

    /// A whole chat: its rows, whether it is partly there, and the target's other rows.
    fn compare(
        &mut self,
        chat_id: String,
        expected: Vec<(String, Row)>,
        mut present: HashMap<String, Found>,
        retime: &dyn Fn(Span, i64) -> Option<i64>,
    ) {
        self.counts.chats += 1;
        let (found_any, missing) = compare_rows(&self.settings, &mut self.counts, &mut self.pending, &chat_id, expected, &mut present, retime);
        if found_any && !missing.is_empty() {
            self.counts.partial += 1;
            self.pending.push_back(Finding { chat_id: chat_id.clone(), message_key: None, kind: "partial_chat", columns: None });
        }
        push_missing(&mut self.pending, &chat_id, missing);
        let extra = present
            .into_values()
            .map(|f| match f {
                Found::Extra(key) => key,
                Found::Row(row) => row.key,
            })
            .collect();
        push_extras(&mut self.counts, &mut self.pending, &chat_id, extra);
    }
}

/// What the rules give for one chat: its rows, or (a long chat) where its messages lie.
enum Expected {
    Rows(Vec<(String, Row)>),
    Long { body: Body, spans: Vec<Span>, app: Option<app_rows::Codec> },
}

/// The migration's rows of these messages of one chat, by row id. Each is expanded under
/// two clocks: a created_at the clock does not move is compared, one it moves is not.
fn migration_rows(chat_id: &str, user_id: Option<&str>, doc: &str, spans: &[Span], now: i64) -> Vec<(String, Row)> {
    let later = now + 7919;
    let mut out = Vec::with_capacity(spans.len());
    for (n, &span) in spans.iter().enumerate() {
        if n % 1024 == 0 {
            pgrx::check_for_interrupts!();
        }
        if let (Entry::Row(m), Entry::Row(m2)) = (migration_rows::entry_at(doc, span, now), migration_rows::entry_at(doc, span, later)) {
            let json = [m.content, m.output, m.files, m.sources, m.embeds, m.status_history, m.error, m.usage];
            let mut row = Row {
                key: m.key.to_string(),
                text: [user_id.map(str::to_owned), Some(m.role.to_string()), owned(&m.parent_id), owned(&m.model_id), None],
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
    out
}

/// The app's rows of these messages of one chat (whose check passed and on none of whose
/// messages the app fails), by row id, each under two clocks as `migration_rows`.
fn app_rows_of(chat_id: &str, chat_user_id: Option<&str>, doc: &str, spans: &[Span], now: i64, codec: app_rows::Codec) -> Vec<(String, Row)> {
    let later = now + 7919;
    let server = app_rows::Server { major: crate::pg::version::major() };
    let mut out = Vec::with_capacity(spans.len());
    for (n, &span) in spans.iter().enumerate() {
        if n % 1024 == 0 {
            pgrx::check_for_interrupts!();
        }
        let (AppEntry::Row(m), AppEntry::Row(m2)) =
            (app_rows::entry_at(doc, span, now, server, codec), app_rows::entry_at(doc, span, later, server, codec))
        else {
            continue;
        };
        let user = m.user_id.as_deref().or(chat_user_id).map(str::to_owned);
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
    out
}

/// A row id's hash, to tell a long chat's extra rows without keeping its ids.
fn id_hash(id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

/// The target's rows that `sql` selects (the columns of `Verifier::start`), by chat id, then
/// row id: read through a cursor a chunk at a time, and kept whole only where the rules give
/// the row (`wanted`); of the others only the key, so memory follows the source's batch, not
/// the target's size.
fn fetch_rows(sql: &str, args: Vec<DatumWithOid<'_>>, wanted: &HashSet<&str>) -> Result<HashMap<String, HashMap<String, Found>>> {
    let mut out: HashMap<String, HashMap<String, Found>> = HashMap::new();
    Spi::connect(|client| -> Result<()> {
        let mut cursor = client.try_open_cursor(sql, &args)?;
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

/// Compares the rules' rows with the target's (taking each found one out of `present`),
/// queueing a `different` finding for each row that differs. Returns whether any row was
/// there, and the keys of those missing (counted here, queued by the caller).
fn compare_rows(
    settings: &Settings,
    counts: &mut Counts,
    pending: &mut VecDeque<Finding>,
    chat_id: &str,
    expected: Vec<(String, Row)>,
    present: &mut HashMap<String, Found>,
    retime: &dyn Fn(Span, i64) -> Option<i64>,
) -> (bool, Vec<String>) {
    counts.expected += expected.len() as i64;
    let app = settings.rows.is_app();
    let mut missing = Vec::new();
    let mut found_any = false;
    for (n, (id, want)) in expected.into_iter().enumerate() {
        if n % 1024 == 0 {
            pgrx::check_for_interrupts!();
        }
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
            counts.different += 1;
            pending.push_back(Finding { chat_id: chat_id.to_owned(), message_key: Some(want.key), kind: "different", columns: Some(columns) });
        }
    }
    counts.missing += missing.len() as i64;
    (found_any, missing)
}

fn push_missing(pending: &mut VecDeque<Finding>, chat_id: &str, missing: Vec<String>) {
    for key in missing {
        pending.push_back(Finding { chat_id: chat_id.to_owned(), message_key: Some(key), kind: "missing", columns: None });
    }
}

/// A chat's extra rows, sorted by key.
fn push_extras(counts: &mut Counts, pending: &mut VecDeque<Finding>, chat_id: &str, mut extra: Vec<String>) {
    extra.sort();
    for (n, key) in extra.into_iter().enumerate() {
        if n % 1024 == 0 {
            pgrx::check_for_interrupts!();
        }
        counts.extra += 1;
        pending.push_back(Finding { chat_id: chat_id.to_owned(), message_key: Some(key), kind: "extra", columns: None });
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
