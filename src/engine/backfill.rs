//! One backfill from start to end: reads chats (`read`), expands them with the rules into a
//! batch of rows (`batch`), writes each batch (`write`), and records what could not be
//! written (`rejections`).
//!
//! Memory is bounded by the batch, not by the largest chat: a batch ends once it holds
//! `batch_size` messages or `MAX_BATCH_ROW_BYTES` of them, even in the middle of a chat,
//! and the next batch goes on with that chat's next message. Only the chat being expanded
//! is held (once, detoasted), with a 16-byte index entry per message. App rows
//! (`rows => 'app'`) are written all or nothing per chat, as the app writes them: a chat
//! bigger than a batch is a batch of its own, written a slice of rows at a time inside one
//! subtransaction (`Backfill::write_whole`), so memory is bounded the same way.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use chat_backfill_rules::app_rows::{self, AppEntry, AppSkip};
use chat_backfill_rules::migration_rows::{self, Body, Column, Document, Entry, Span};
use pgrx::PgMemoryContexts;
use pgrx::prelude::*;

use pgrx::PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE;

use crate::pg::datums::{Chat, ChatText};
use crate::pg::error::{Error, Result};
use crate::pg::subxact::in_subtransaction;
use crate::pg::toast_read::ToastStream;
use super::batch::Rows;
use super::read::{self, Fetched, Reader};
use super::rejections::{chat_sqlstate, rule_sqlstate, Recorder, Rejection};
use super::report::{BatchReport, Partial};
use super::request::Settings;
use super::streamed::{fingerprint, index_app_streamed, index_streamed, repair_check, AppIndexed, Indexed, Messages, Streamed};
use super::write::{Outcome, Writer};

/// A batch stops taking new chats once this much chat text has been read.
const MAX_BATCH_BYTES: usize = 64 << 20;
/// A batch ends once its rows hold this much text, so the INSERT path's arrays (a second
/// copy) and its halves stay small whatever the messages weigh.
const MAX_BATCH_ROW_BYTES: usize = 8 << 20;

/// A chat whose messages are being expanded, possibly over several batches.
struct OpenChat {
    chat_id: String,
    user_id: Option<String>,
    text: Option<ChatText>,
    /// Instead of `text`: the chat read a slice at a time.
    streamed: Option<Streamed>,
    /// The text's size, decompressed.
    len: usize,
    body: Body,
    spans: Vec<Span>,
    next: usize,
    /// App rows: how the app's codec reads the chat, and where its currentId is.
    codec: app_rows::Codec,
    current_id: Option<std::ops::Range<usize>>,
    /// The text's fingerprint, computed once for a chat that spans batches.
    fingerprint: std::cell::Cell<Option<i64>>,
}

impl OpenChat {
    fn partial(&self) -> Partial {
        let fingerprint = self.fingerprint.get().unwrap_or_else(|| {
            // (A streamed chat's was taken as it was indexed.)
            let text = self.text.as_ref().and_then(ChatText::as_str).unwrap_or_default();
            let f = fingerprint(text.as_bytes());
            self.fingerprint.set(Some(f));
            f
        });
        Partial { chat_id: self.chat_id.clone(), done: self.next as i64, fingerprint }
    }

    /// Resumes inside this chat where `partial` says an earlier CALL left it, if it is the
    /// same chat with the same text.
    fn resume(&mut self, partial: &Partial) {
        if partial.chat_id == self.chat_id
            && (0..=self.spans.len() as i64).contains(&partial.done)
            && self.partial().fingerprint == partial.fingerprint
        {
            self.next = partial.done as usize;
        }
    }
}

/// The entries of a chat held whole, and where its document lies in the text (a JSON
/// string holding one is decoded into a copy of its own).
fn index_held(chat: Option<&ChatText>) -> std::result::Result<(Vec<Span>, Body), migration_rows::ChatSkip> {
    let column = match chat.map(ChatText::as_str) {
        Some(None) => return Err(migration_rows::ChatSkip::NotJson),
        column => column.flatten(),
    };
    let doc = Document::open(column)?;
    let spans = doc.index_polling(&mut || {
        pgrx::check_for_interrupts!();
    })?;
    Ok((spans, doc.into_body(column.unwrap_or_default())))
}

/// App rows of a chat held whole: the app's `open` and `index`, and where the document
/// lies in the text.
fn open_app_held(
    chat: Option<&ChatText>,
    user_id: Option<&str>,
) -> std::result::Result<(Vec<Span>, Body, app_rows::Codec, Option<std::ops::Range<usize>>), AppSkip> {
    let column = chat.and_then(ChatText::as_str);
    if chat.is_some() && column.is_none() {
        return Err(AppSkip::NotObject);
    }
    let opened = app_rows::open(column, user_id, app_rows::APP_MAX_DEPTH)?;
    let indexed = app_rows::index(opened.doc, &mut || {
        pgrx::check_for_interrupts!();
    })?;
    let start = opened.doc.as_ptr() as usize - column.unwrap_or_default().as_ptr() as usize;
    Ok((indexed.spans, Body::Within(start..start + opened.doc.len()), opened.codec, indexed.current_id))
}

/// How far `expand_entries` got.
enum Progress {
    Done,
    BatchFull,
    /// A streamed chat's TOAST value is gone.
    Gone,
}

/// Times a streamed chat is read again when it changes under a run before the run stops.
const MAX_REREADS: u32 = 3;

/// A batch being filled.
struct Batch {
    rows: Rows,
    rejections: Vec<Rejection>,
    /// Bytes the rejections hold (each keeps its message's JSON to record it).
    rejection_bytes: usize,
    report: BatchReport,
    chat_bytes: usize,
    /// App rows: a chat bigger than a batch, alone in this one (see `write_whole`).
    whole: Option<OpenChat>,
    /// Streamed chats deleted while they were being expanded (counted as vanished).
    gone: Vec<String>,
}

impl Batch {
    /// Messages held: rows to write and rejections to record both count toward the limits,
    /// so a chat of a million bad messages is recorded a batch at a time too.
    fn held(&self) -> (usize, usize) {
        (self.rows.len() + self.rejections.len(), self.rows.bytes() + self.rejection_bytes)
    }

    fn room_for_rows(&self, settings: &Settings) -> bool {
        let (messages, bytes) = self.held();
        messages < settings.batch_size && bytes < MAX_BATCH_ROW_BYTES
    }

    fn room_for_chats(&self, settings: &Settings) -> bool {
        self.whole.is_none() && self.room_for_rows(settings) && self.chat_bytes < MAX_BATCH_BYTES
    }

    /// App rows: whether the chat is bigger than a batch, so written a slice at a time (a
    /// streamed chat always is: its passes read the stream again rather than hold it).
    fn too_big(chat: &OpenChat, settings: &Settings) -> bool {
        chat.spans.len() > settings.batch_size || chat.len > MAX_BATCH_ROW_BYTES || chat.streamed.is_some()
    }

    /// Whether `chat` fits whole in what is left of the batch. A chat that does not is
    /// left for the next batch, so batches end at chat boundaries and a resume re-reads no
    /// partly written chat; only a chat bigger than a whole batch is split.
    /// App rows go whole into a batch (all or nothing, as Open WebUI writes them): a chat
    /// bigger than a batch is one batch of its own.
    fn fits(&self, chat: &OpenChat, settings: &Settings) -> bool {
        let text = chat.len;
        let (messages, bytes) = self.held();
        if settings.rows.is_app() && Batch::too_big(chat, settings) {
            return messages == 0 && self.report.chats_read == 0;
        }
        messages == 0 || (messages + chat.spans.len() - chat.next <= settings.batch_size && bytes + text <= MAX_BATCH_ROW_BYTES)
    }

    /// Takes a fetched chat: `Some` when it has messages to expand.
    fn open(&mut self, fetched: Fetched, settings: &Settings) -> Result<Option<OpenChat>> {
        let Fetched { chat_id, user_id, chat } = fetched;
        let Some(chat_id) = chat_id else {
            self.report.chats_read += 1;
            self.report.chats_skipped += 1;
            return Ok(None);
        };
        let len = chat.as_ref().map_or(0, Chat::len);
        self.chat_bytes += len;
        let (chat, mut streamed) = match chat {
            None => (None, None),
            Some(Chat::Held(text)) => (Some(text), None),
            Some(Chat::Toasted(stream)) => (None, Some(stream)),
        };
        if settings.rows.is_app() {
            return self.open_app(chat_id, user_id, chat, streamed, len);
        }
        let mut fingerprint = None;
        let opened = match &mut streamed {
            Some(stream) => index_streamed(stream, &mut fingerprint)?,
            None => index_held(chat.as_ref()).map(|(spans, body)| Indexed::Held(spans, body)),
        };
        let (spans, body, streamed, chat) = match opened {
            Ok(Indexed::Held(spans, body)) => (spans, body, None, chat),
            Ok(Indexed::Streamed(spans)) => {
                debug1!("chat_backfill: chat {chat_id} streams from its TOAST table ({len} bytes, {} messages)", spans.len());
                let stream = streamed.take().map(|mut stream| {
                    stream.restart();
                    Streamed::new(stream)
                });
                (spans, Body::Within(0..0), stream, None)
            }
            // A document the stream cannot take (not an object, or a key repeated in its
            // messages): read whole, as any other.
            Ok(Indexed::Whole(text)) => match index_held(Some(&text)) {
                Ok((spans, body)) => (spans, body, None, Some(text)),
                Err(skip) => return Ok(self.skip_chat(chat_id, skip)),
            },
            Err(skip) => return Ok(self.skip_chat(chat_id, skip)),
        };
        if spans.is_empty() {
            // Counted as read when its last message is in a batch; this one has none.
            self.read_to_end(chat_id);
            return Ok(None);
        }
        Ok(Some(OpenChat {
            chat_id,
            user_id,
            text: chat,
            streamed,
            len,
            body,
            spans,
            next: 0,
            codec: app_rows::Codec { exact_ints: false, plain: true },
            current_id: None,
            fingerprint: std::cell::Cell::new(fingerprint),
        }))
    }

    /// App rows of a streamed chat opened before the last COMMIT, about to be written in
    /// passes over its stream: read again in this batch's snapshot, which keeps the value
    /// it points at until the batch ends. The same value goes on as opened; a new one (the
    /// chat updated) is opened again; a deleted chat counts as vanished.
    fn reopen_streamed(&mut self, chat: OpenChat, settings: &Settings) -> Result<Option<OpenChat>> {
        let Some(fetched) = read::reread(settings, &chat.chat_id)? else {
            self.gone.push(chat.chat_id.clone());
            self.read_to_end(chat.chat_id);
            return Ok(None);
        };
        let unchanged = match (&fetched.chat, &chat.streamed) {
            (Some(Chat::Toasted(now)), Some(opened)) => now.same_value(opened.stream()),
            _ => false,
        };
        debug1!("chat_backfill: chat {} read again before it is written: {}", chat.chat_id, if unchanged { "unchanged" } else { "changed" });
        if unchanged && fetched.user_id == chat.user_id {
            return Ok(Some(chat));
        }
        self.open(fetched, settings)
    }

    /// The chat is done with in this batch: counted as read, and the checkpoint moves past it.
    fn read_to_end(&mut self, chat_id: String) {
        self.report.chats_read += 1;
        self.report.last_chat_id = Some(chat_id);
    }

    /// A chat the migration writes nothing of; recorded unless it is simply empty.
    fn skip_chat(&mut self, chat_id: String, skip: migration_rows::ChatSkip) -> Option<OpenChat> {
        if skip.is_problem() {
            self.reject_chat(
                &chat_id,
                chat_sqlstate(skip),
                skip.describe(),
                "The chat stays in the source table unchanged; no message of it was written.",
            );
        }
        self.read_to_end(chat_id);
        None
    }

    /// `open` for app rows: the checks of the app's read path (`app_rows::open`, `index`),
    /// on the text held or as it streams.
    fn open_app(
        &mut self,
        chat_id: String,
        user_id: Option<String>,
        mut chat: Option<ChatText>,
        stream: Option<ToastStream>,
        len: usize,
    ) -> Result<Option<OpenChat>> {
        let mut streamed = None;
        let opened = match stream {
            None => open_app_held(chat.as_ref(), user_id.as_deref()),
            Some(mut stream) => match index_app_streamed(&mut stream, user_id.as_deref())? {
                Ok(AppIndexed::Streamed(indexed, codec)) => {
                    debug1!("chat_backfill: chat {chat_id} streams from its TOAST table ({len} bytes, {} messages)", indexed.spans.len());
                    stream.restart();
                    streamed = Some(Streamed::new(stream));
                    Ok((indexed.spans, Body::Within(0..0), codec, indexed.current_id))
                }
                Ok(AppIndexed::Whole(text)) => {
                    let opened = open_app_held(Some(&text), user_id.as_deref());
                    chat = Some(text);
                    opened
                }
                Err(skip) => Err(skip),
            },
        };
        match opened {
            Ok((spans, body, codec, current_id)) if !spans.is_empty() => {
                return Ok(Some(OpenChat {
                    chat_id,
                    user_id,
                    text: chat,
                    streamed,
                    len,
                    body,
                    spans,
                    next: 0,
                    codec,
                    current_id,
                    fingerprint: Default::default(),
                }))
            }
            Ok(_) => {}
            Err(skip) => self.skip_app_chat(&chat_id, skip),
        }
        self.read_to_end(chat_id);
        Ok(None)
    }

    /// A chat the app loads no messages from; recorded unless it is simply empty.
    fn skip_app_chat(&mut self, chat_id: &str, skip: AppSkip) {
        if skip.is_problem() {
            self.reject_chat(
                chat_id,
                skip.sqlstate(),
                skip.describe(),
                "Open WebUI writes no rows for this chat either and keeps reading its JSON.",
            );
        }
    }

    /// Records a whole chat as unusable (a rejection without a message).
    fn reject_chat(&mut self, chat_id: &str, sqlstate: &str, error: &str, detail: &str) {
        self.report.chats_skipped += 1;
        self.rejections.push(Rejection {
            chat_id: chat_id.to_owned(),
            message_key: None,
            message_id: None,
            sqlstate: sqlstate.to_owned(),
            error: error.to_owned(),
            detail: Some(detail.to_owned()),
            message: None,
        });
    }

    /// App rows: expands the whole chat and takes its rows only if the app writes them
    /// all; otherwise records the messages the app fails on, and no row of the chat.
    fn expand_app(&mut self, chat: OpenChat, settings: &Settings) {
        let column = chat.text.as_ref().and_then(ChatText::as_str).unwrap_or_default();
        let doc = chat.body.text(column);
        let server = app_rows::Server { major: crate::pg::version::major() };
        // Spans and currentId are offsets within the document, as for the migration's rows.
        let indexed = app_rows::Indexed { spans: chat.spans.clone(), current_id: chat.current_id.clone() };
        let entries = match app_rows::expand(doc, &indexed, settings.now, server, chat.codec, &mut || {
            pgrx::check_for_interrupts!();
        }) {
            Ok(entries) => entries,
            Err(skip) => {
                self.skip_app_chat(&chat.chat_id, skip);
                self.read_to_end(chat.chat_id);
                return;
            }
        };
        let failed = entries.iter().filter(|e| matches!(e, AppEntry::Failed { .. })).count();
        if failed == 0 {
            for entry in &entries {
                match entry {
                    AppEntry::Row(m) => self.rows.push_app(&chat.chat_id, chat.user_id.as_deref(), m, settings.now),
                    _ => self.report.messages_skipped += 1,
                }
            }
        } else {
            let held_back = entries.len() - failed;
            self.report.messages_skipped += held_back as i64;
            for entry in entries {
                if let AppEntry::Failed { key, failure, raw } = entry {
                    self.rejection_bytes += raw.len() + 2 * key.len() + chat.chat_id.len();
                    self.rejections.push(app_failure(&chat.chat_id, key, &failure, raw, held_back));
                }
            }
        }
        self.read_to_end(chat.chat_id);
    }

    /// Expands the chat's next messages while the batch has room; `Some` if some are left.
    fn expand(&mut self, mut chat: OpenChat, settings: &Settings) -> Result<Option<OpenChat>> {
        if settings.rows.is_app() {
            if Batch::too_big(&chat, settings) {
                self.whole = Some(chat);
            } else {
                self.expand_app(chat, settings);
            }
            return Ok(None);
        }
        let mut rereads = 0;
        loop {
            match self.expand_entries(&mut chat, settings)? {
                Progress::BatchFull => return Ok(Some(chat)),
                Progress::Done => break,
                Progress::Gone => {
                    // Updated or deleted since the chat was opened (its TOAST value is gone
                    // after a COMMIT): read again. An update is expanded from its start (the
                    // rows written already count as present); a deleted chat counts as
                    // vanished, as a held one does when its rows cannot be written.
                    rereads += 1;
                    if rereads > MAX_REREADS {
                        return Err(Error::new(
                            ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                            format!("chat {} changed {rereads} times while it was being expanded", chat.chat_id),
                            "CALL the backfill again: it goes on from its checkpoint and reads the chat again.",
                        ));
                    }
                    match read::reread(settings, &chat.chat_id)? {
                        None => {
                            notice!(
                                "chat_backfill: chat {} was deleted while it was being expanded (its TOAST value is gone): \
                                 its messages from the {}th on were not written",
                                chat.chat_id,
                                chat.next + 1
                            );
                            self.gone.push(chat.chat_id.clone());
                            break;
                        }
                        Some(fetched) => match self.open(fetched, settings)? {
                            Some(again) => chat = again,
                            // Counted by `open`: the chat has no messages any more, or is not
                            // a chat any more (then recorded).
                            None => return Ok(None),
                        },
                    }
                }
            }
        }
        self.read_to_end(chat.chat_id);
        Ok(None)
    }

    /// Expands entries from the chat's next while the batch has room.
    fn expand_entries(&mut self, chat: &mut OpenChat, settings: &Settings) -> Result<Progress> {
        let column = chat.text.as_ref().and_then(ChatText::as_str).unwrap_or_default();
        let doc = chat.body.text(column);
        while chat.next < chat.spans.len() {
            if !self.room_for_rows(settings) {
                return Ok(Progress::BatchFull);
            }
            pgrx::check_for_interrupts!();
            let span = chat.spans[chat.next];
            let entry = match &mut chat.streamed {
                None => migration_rows::entry_at(doc, span, settings.now),
                Some(streamed) => {
                    let bytes = span.bytes();
                    let Some(text) = streamed.text(bytes.clone())? else { return Ok(Progress::Gone) };
                    migration_rows::entry_at(text, span.shifted_back(bytes.start), settings.now)
                }
            };
            self.add(&chat.chat_id, chat.user_id.as_deref(), entry);
            chat.next += 1;
        }
        Ok(Progress::Done)
    }

    fn add(&mut self, chat_id: &str, user_id: Option<&str>, entry: Entry<'_>) {
        match entry {
            Entry::Row(m) => self.rows.push(chat_id, user_id, m),
            Entry::Skipped { .. } => self.report.messages_skipped += 1,
            Entry::Rejected { key, column, problem, raw } => {
                self.rejection_bytes += raw.len() + 2 * key.len() + chat_id.len();
                self.rejections.push(Rejection {
                chat_id: chat_id.to_owned(),
                message_id: Some(format!("{chat_id}-{key}")),
                message_key: Some(key),
                sqlstate: rule_sqlstate(problem).to_owned(),
                error: migration_rows::reject_reason(column, problem),
                detail: Some(match column {
                    Column::Key => "Open WebUI's migration fails on this message too.".to_owned(),
                    _ => format!("Open WebUI's migration fails on this message too (column {}).", column.name()),
                }),
                message: Some(raw.to_owned()),
            })
            }
        }
    }
}

/// The rejection of a message the app cannot write, which leaves its whole chat unwritten.
fn app_failure(chat_id: &str, key: String, failure: &app_rows::Failure, raw: &str, held_back: usize) -> Rejection {
    Rejection {
        chat_id: chat_id.to_owned(),
        message_id: Some(format!("{chat_id}-{key}")),
        message_key: Some(key),
        sqlstate: failure.sqlstate.to_owned(),
        error: format!("Open WebUI cannot write this message: {}", failure.reason),
        detail: Some(format!(
            "Column {}. No row of this chat was written: Open WebUI writes a chat's rows all or nothing \
             ({held_back} other message(s) held back), and keeps reading its JSON.",
            failure.column
        )),
        message: Some(raw.to_owned()),
    }
}

pub struct Backfill {
    settings: Settings,
    reader: Reader,
    writer: Writer,
    recorder: Recorder,
    /// The chat a full batch left unfinished.
    open_chat: Option<OpenChat>,
    /// Where an earlier CALL left the first chat this one reads.
    resume: Option<Partial>,
    exhausted: bool,
    /// The chat last counted as vanished, so a chat spanning batches counts once.
    last_vanished: Option<String>,
    batch: i32,
    totals: BatchReport,
    /// Chat text read so far (as detoasted), in bytes.
    chat_bytes_read: usize,
    /// Time spent writing rows (a trial prices it apart from reading and expanding), and
    /// the bytes of the rows given (written or, counting only, not), and of those written.
    writing: Duration,
    row_bytes: usize,
    row_bytes_written: usize,
    started: Instant,
    last_notice: Instant,
}

impl Backfill {
    /// The one-transaction form: one portal over the whole source.
    pub fn start(settings: Settings) -> Result<Backfill> {
        let reader = Reader::whole(&settings)?;
        Backfill::new(settings, reader)
    }

    /// The committing form: reads after `last_key` (all when `None`) up to `high_water`,
    /// a portal per batch, so the caller may COMMIT between batches; inside the chat that
    /// `resume` names, if an earlier CALL left one unfinished.
    pub fn keyset(settings: Settings, last_key: Option<String>, high_water: String, resume: Option<Partial>) -> Result<Backfill> {
        let reader = Reader::keyset(&settings, last_key, high_water);
        let mut backfill = Backfill::new(settings, reader)?;
        backfill.resume = resume;
        Ok(backfill)
    }

    fn new(settings: Settings, reader: Reader) -> Result<Backfill> {
        let writer = Writer::prepare(&settings)?;
        let recorder = Recorder::prepare()?;
        let now = Instant::now();
        Ok(Backfill {
            settings,
            reader,
            writer,
            recorder,
            open_chat: None,
            resume: None,
            exhausted: false,
            last_vanished: None,
            batch: 0,
            totals: BatchReport::default(),
            chat_bytes_read: 0,
            writing: Duration::ZERO,
            row_bytes: 0,
            row_bytes_written: 0,
            started: now,
            last_notice: now,
        })
    }

    /// Reads, expands and writes the next batch; `None` once the source is exhausted.
    pub fn next_batch(&mut self) -> Result<Option<BatchReport>> {
        if self.exhausted && self.open_chat.is_none() {
            return Ok(None);
        }
        let began = Instant::now();
        let mut batch = Batch {
            rows: Rows::new(self.settings.rows.is_app()),
            rejections: Vec::new(),
            rejection_bytes: 0,
            report: BatchReport { batch: self.batch + 1, batch_size: self.settings.batch_size as i32, ..Default::default() },
            chat_bytes: 0,
            whole: None,
            gone: Vec::new(),
        };
        if let Some(chat) = self.open_chat.take() {
            let chat = match chat.streamed.is_some() && self.settings.rows.is_app() {
                true => batch.reopen_streamed(chat, &self.settings)?,
                false => Some(chat),
            };
            if let Some(chat) = chat {
                self.open_chat = batch.expand(chat, &self.settings)?;
            }
        }
        if self.open_chat.is_none() && !self.exhausted {
            let (settings, reader, resume) = (&self.settings, &mut self.reader, &mut self.resume);
            let (open_chat, exhausted) = Spi::connect(|client| -> Result<(Option<OpenChat>, bool)> {
                while batch.room_for_chats(settings) {
                    let Some(fetched) = reader.next(client, settings)? else { return Ok((None, true)) };
                    // Only the first chat read can be the one an earlier CALL left.
                    let resume = resume.take();
                    if let Some(mut chat) = batch.open(fetched, settings)? {
                        if let Some(partial) = &resume {
                            chat.resume(partial);
                        }
                        if !batch.fits(&chat, settings) {
                            return Ok((Some(chat), false));
                        }
                        if let Some(unfinished) = batch.expand(chat, settings)? {
                            return Ok((Some(unfinished), false));
                        }
                    }
                }
                Ok((None, false))
            })?;
            self.reader.end_batch();
            self.open_chat = open_chat;
            self.exhausted = exhausted;
        }
        let finished = self.exhausted && self.open_chat.is_none();
        let Batch { rows, mut rejections, mut report, chat_bytes, whole, gone, .. } = batch;
        report.partial = self.open_chat.as_ref().map(OpenChat::partial);
        self.chat_bytes_read += chat_bytes;
        self.row_bytes += rows.bytes();
        if !self.settings.dry_run {
            self.row_bytes_written += rows.bytes();
        }
        if report.chats_read == 0
            && rows.len() == 0
            && rejections.is_empty()
            && report.messages_skipped == 0
            && whole.is_none()
            && finished
        {
            self.finish();
            return Ok(None);
        }
        if self.settings.dry_run {
            report.messages_inserted = rows.len() as i64;
            report.chats_vanished = gone.len() as i64;
        } else {
            let mut outcome = Outcome::default();
            let writing = Instant::now();
            in_scratch(|| self.writer.write(&rows, &mut report, &mut outcome))?;
            self.writing += writing.elapsed();
            outcome.vanished.extend(gone);
            if let Some(last) = &self.last_vanished {
                outcome.vanished.remove(last);
            }
            report.chats_vanished = outcome.vanished.len() as i64;
            if let Some(chat) = &self.open_chat {
                if outcome.vanished.contains(&chat.chat_id) {
                    self.last_vanished = Some(chat.chat_id.clone());
                }
            }
            rejections.append(&mut outcome.rejections);
        }
        drop(rows);
        if let Some(chat) = whole {
            let writing = Instant::now();
            let counting = self.settings.dry_run;
            self.write_whole(chat, &mut report)?;
            if !counting {
                self.writing += writing.elapsed();
            }
        }
        report.messages_rejected += rejections.iter().filter(|r| r.message_key.is_some()).count() as i64;
        if !self.settings.dry_run && !self.settings.trial {
            in_scratch(|| self.recorder.record(&self.settings, &rejections))?;
        }
        report.elapsed_ms = began.elapsed().as_secs_f64() * 1000.0;
        if let Some(tuner) = self.settings.tuner {
            let handled = report.messages_inserted
                + report.messages_rejected
                + report.messages_existing
                + report.messages_skipped
                + report.messages_dropped;
            self.settings.batch_size = tuner.next(self.settings.batch_size, handled as usize, began.elapsed());
        }
        self.batch += 1;
        self.add_to_totals(&report);
        if finished {
            self.finish();
        } else if !self.settings.trial && (self.last_notice.elapsed().as_secs_f64() >= 2.0 || self.batch == 1) {
            self.last_notice = Instant::now();
            notice!("chat_backfill: {}", self.summary("so far"));
        }
        Ok(Some(report))
    }

    /// App rows of a chat bigger than a batch, all or nothing as the app writes them, in
    /// memory that follows a slice of rows, not the chat: the app's repair check and a
    /// first pass over its messages (does the app fail on one?) read the text without
    /// keeping anything; then its rows go in slices of a batch inside one subtransaction,
    /// rolled back whole if a slice fails. The bad rows are then found a slice at a time,
    /// each in a subtransaction rolled back, and recorded as they are found.
    fn write_whole(&mut self, chat: OpenChat, report: &mut BatchReport) -> Result<()> {
        let settings = &self.settings;
        let OpenChat { chat_id, user_id, text, mut streamed, len, body, spans, codec, current_id, .. } = chat;
        let column = text.as_ref().and_then(ChatText::as_str).unwrap_or_default();
        let mut messages = match streamed.as_mut() {
            Some(streamed) => Messages::Streamed(streamed),
            None => Messages::Held(body.text(column)),
        };
        let now = settings.now;
        let server = app_rows::Server { major: crate::pg::version::major() };
        let mut poll = || {
            pgrx::check_for_interrupts!();
        };
        let spans = &spans;
        let record = !settings.dry_run && !settings.trial;
        report.chats_read += 1;
        report.last_chat_id = Some(chat_id.clone());
        // The repair check, and whether the app fails on a message, in one pass.
        let (mut rows_total, mut failed) = (0usize, 0usize);
        let checked = repair_check(&mut messages, spans, current_id, &mut poll, |text, span| {
            match app_rows::entry_at(text, span, now, server, codec) {
                AppEntry::Row(_) => rows_total += 1,
                AppEntry::Failed { .. } => failed += 1,
                AppEntry::Skipped { .. } => {}
            }
        })?;
        if let Err(skip) = checked {
            if skip.is_problem() {
                report.chats_skipped += 1;
                let rejection = Rejection {
                    chat_id: chat_id.clone(),
                    message_key: None,
                    message_id: None,
                    sqlstate: skip.sqlstate().to_owned(),
                    error: skip.describe().to_owned(),
                    detail: Some("Open WebUI writes no rows for this chat either and keeps reading its JSON.".into()),
                    message: None,
                };
                if record {
                    in_scratch(|| self.recorder.record(settings, &[rejection]))?;
                }
            }
            return Ok(());
        }
        let skipped = spans.len() - rows_total - failed;
        if failed > 0 {
            // The app fails on these messages, so writes none of the chat.
            let held_back = spans.len() - failed;
            report.messages_skipped += held_back as i64;
            let mut pending = Vec::new();
            let mut bytes = 0;
            messages.rewind();
            for &span in spans {
                poll();
                let (text, span) = messages.message(span)?;
                let AppEntry::Failed { key, failure, raw } = app_rows::entry_at(text, span, now, server, codec) else { continue };
                bytes += raw.len() + 2 * key.len() + chat_id.len();
                pending.push(app_failure(&chat_id, key, &failure, raw, held_back));
                if pending.len() >= settings.batch_size || bytes >= MAX_BATCH_ROW_BYTES {
                    report.messages_rejected += pending.len() as i64;
                    if record {
                        in_scratch(|| self.recorder.record(settings, &pending))?;
                    }
                    pending.clear();
                    bytes = 0;
                }
            }
            report.messages_rejected += pending.len() as i64;
            if record {
                in_scratch(|| self.recorder.record(settings, &pending))?;
            }
            return Ok(());
        }
        report.messages_skipped += skipped as i64;
        if settings.dry_run {
            report.messages_inserted += rows_total as i64;
            // Not formed when only counted: the messages' text stands for them.
            self.row_bytes += match &messages {
                Messages::Held(doc) => doc.len(),
                Messages::Streamed(_) => len,
            };
            return Ok(());
        }
        // The rows of the next slice of at most a batch, from message `start` on.
        let user_id = user_id.as_deref();
        let slice = |messages: &mut Messages, start: &mut usize| -> Result<Option<Rows>> {
            if *start >= spans.len() {
                return Ok(None);
            }
            let mut rows = Rows::new(true);
            while *start < spans.len() && rows.len() < settings.batch_size && rows.bytes() < MAX_BATCH_ROW_BYTES {
                if *start % 1024 == 0 {
                    pgrx::check_for_interrupts!();
                }
                let (text, span) = messages.message(spans[*start])?;
                if let AppEntry::Row(m) = app_rows::entry_at(text, span, now, server, codec) {
                    rows.push_app(&chat_id, user_id, &m, now);
                }
                *start += 1;
            }
            Ok(Some(rows))
        };
        let writer = &mut self.writer;
        let mut row_bytes = 0;
        messages.rewind();
        let written = in_subtransaction(AssertUnwindSafe(|| -> Result<BatchReport> {
            let (mut sub, mut start) = (BatchReport::default(), 0);
            while let Some(rows) = slice(&mut messages, &mut start)? {
                row_bytes += rows.bytes();
                in_scratch(|| writer.write_or_raise(&rows, &mut sub))?;
            }
            Ok(sub)
        }));
        self.row_bytes += row_bytes;
        self.row_bytes_written += row_bytes;
        let failure = match written {
            Ok(sub) => {
                let sub = sub?;
                report.messages_inserted += sub.messages_inserted;
                report.messages_existing += sub.messages_existing;
                report.messages_dropped += sub.messages_dropped;
                report.write_path = sub.write_path.or(report.write_path);
                return Ok(());
            }
            Err(failure) => failure,
        };
        // Which rows failed: a slice at a time, each probe rolled back, recorded as found.
        let (mut bad, mut start) = (0usize, 0);
        messages.rewind();
        while let Some(rows) = slice(&mut messages, &mut start)? {
            let mut probe = Outcome::default();
            in_scratch(|| self.writer.probe(&rows, &mut probe))?;
            if !probe.vanished.is_empty() {
                report.chats_vanished += 1;
                return Ok(());
            }
            bad += probe.rejections.len();
            let note = "No row of this chat was written: Open WebUI writes a chat's rows all or nothing, and keeps \
                        reading its JSON.";
            for r in &mut probe.rejections {
                r.detail = Some(match r.detail.take() {
                    Some(d) => format!("{d} {note}"),
                    None => note.to_owned(),
                });
            }
            report.messages_rejected += probe.rejections.len() as i64;
            if record {
                in_scratch(|| self.recorder.record(settings, &probe.rejections))?;
            }
        }
        report.messages_skipped += (rows_total - bad) as i64;
        if bad == 0 {
            let rejection = Rejection {
                chat_id: chat_id.clone(),
                message_key: None,
                message_id: None,
                sqlstate: failure.sqlstate,
                error: format!("chat not written: {}", failure.message),
                detail: Some(format!(
                    "No row of this chat was written: Open WebUI writes a chat's rows all or nothing ({rows_total} \
                     message(s) held back), and keeps reading its JSON."
                )),
                message: None,
            };
            if record {
                in_scratch(|| self.recorder.record(settings, &[rejection]))?;
            }
        }
        Ok(())
    }

    /// Whether the source is read to its end and nothing of it is left to write.
    pub fn is_done(&self) -> bool {
        self.exhausted && self.open_chat.is_none()
    }

    /// The run so far, and its number of batches.
    pub fn totals(&self) -> (&BatchReport, i32) {
        (&self.totals, self.batch)
    }

    /// Ends a run before its source is exhausted (a trial that has read enough).
    pub fn stop(&mut self) {
        self.reader.close();
    }

    /// From the next batch on, expands and counts without writing (a trial that has
    /// written enough to price rows goes on counting them).
    pub fn count_only(&mut self) {
        self.settings.dry_run = true;
    }

    /// Sets the size of the batches from the next one on.
    pub fn set_batch_size(&mut self, batch_size: usize) {
        self.settings.batch_size = batch_size;
    }

    /// Time spent writing rows so far.
    pub fn writing(&self) -> Duration {
        self.writing
    }

    /// Bytes of the rows given so far, and of those written.
    pub fn row_bytes(&self) -> (usize, usize) {
        (self.row_bytes, self.row_bytes_written)
    }

    /// The size of the next batch (batch_time changes it).
    pub fn batch_size(&self) -> usize {
        self.settings.batch_size
    }

    /// Chat text read so far, in bytes (as detoasted).
    pub fn chat_bytes_read(&self) -> usize {
        self.chat_bytes_read
    }

    fn finish(&mut self) {
        self.reader.close();
        if !self.settings.trial {
            notice!("chat_backfill: {}", self.summary("done"));
        }
    }

    fn add_to_totals(&mut self, b: &BatchReport) {
        let t = &mut self.totals;
        t.chats_read += b.chats_read;
        t.messages_inserted += b.messages_inserted;
        t.messages_rejected += b.messages_rejected;
        t.messages_existing += b.messages_existing;
        t.messages_skipped += b.messages_skipped;
        t.chats_skipped += b.chats_skipped;
        t.chats_vanished += b.chats_vanished;
        t.messages_dropped += b.messages_dropped;
    }

    fn summary(&self, state: &str) -> String {
        let t = &self.totals;
        let secs = self.started.elapsed().as_secs_f64();
        let verb = if self.settings.dry_run { "would insert" } else { "inserted" };
        format!(
            "{state} after {} batches, {:.1} s: {} chats read, {} messages {verb}, {} rejected, {} already present, \
             {} skipped by rule, {} dropped by a trigger, {} chats unusable, {} chats deleted meanwhile \
             ({:.0} messages/s); rejected rows: \
             SELECT * FROM chat_backfill.rejected_messages WHERE run_id = {}",
            self.batch,
            secs,
            t.chats_read,
            t.messages_inserted,
            t.messages_rejected,
            t.messages_existing,
            t.messages_skipped,
            t.messages_dropped,
            t.chats_skipped,
            t.chats_vanished,
            (t.messages_inserted as f64) / secs.max(1e-9),
            self.settings.run_id,
        )
    }
}

/// Runs `work` with a memory context of its own as the current one, deleted after: what a
/// batch's statements palloc there (their argument arrays, a failed COPY's error) goes with
/// it. Left in the caller's context (a set-returning function's multi-call context, or a
/// procedure's portal, both as long as the run) it piled up batch after batch: 0.6.0 grew
/// by 190 kB a batch on a re-run, where every batch takes the INSERT path.
fn in_scratch<T>(work: impl FnOnce() -> T) -> T {
    let mut scratch = PgMemoryContexts::new("chat_backfill write");
    // SAFETY: the context is current only while `work` runs (switch_to restores the caller's
    // on every way out) and is deleted when `scratch` drops; nothing allocated in it is kept
    // (prepared statements are kept in the cache's context, results are Rust values).
    unsafe { scratch.switch_to(|_| work()) }
}
