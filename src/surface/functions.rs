//! The SQL surface: thin `#[pg_extern]` wrappers over the plain-Rust core and the engine.
//! Errors travel as values up to here and are raised once.

use chat_backfill_rules::migration_rows::{self, Document, Entry, Span};
use pgrx::datum::Interval;
use pgrx::prelude::*;

use crate::engine::backfill::Backfill;
use crate::engine::request::{next_run_id, transaction_start_epoch, Request};
use crate::engine::streamed::{index_streamed, Indexed, Streamed};
use crate::pg::datums::{server_takes_utf8, to_server, ArgText, ChatArg, RawJson, RegClass, ServerText};
use crate::pg::error::{Error, OrRaise};
use pgrx::PgSqlErrorCode::ERRCODE_DATA_CORRUPTED;

/// One chat's entries, expanded one at a time as rows are asked for: a chat of a million
/// messages costs its text and its index, not a million rows at once, and a cancel lands
/// between any two messages. A chat that streams (issue 26) costs its index and the
/// current message.
struct ChatEntries<T> {
    chat_id: String,
    user_id: Option<String>,
    /// The document and where its messages are; `None`: no messages.
    doc: Option<ChatDoc>,
    next: usize,
    now: i64,
    /// Turns an entry into an output row, or `None` to leave it out.
    pick: fn(&str, Option<&str>, Entry<'_>) -> Option<T>,
    /// A last row for the chat as a whole (why it gives no messages).
    tail: Option<T>,
}

/// A chat's document: its text held, or its stream (spans count from the text's first byte).
enum ChatDoc {
    Held(String, Vec<Span>),
    Streamed(Streamed, Vec<Span>),
}

impl<T> Iterator for ChatEntries<T> {
    type Item = T;
    fn next(&mut self) -> Option<T> {
        if let Some(doc) = &mut self.doc {
            loop {
                pgrx::check_for_interrupts!();
                let n = self.next;
                let entry = match doc {
                    ChatDoc::Held(text, spans) if n < spans.len() => migration_rows::entry_at(text, spans[n], self.now),
                    ChatDoc::Streamed(streamed, spans) if n < spans.len() => {
                        let bytes = spans[n].bytes();
                        let text = streamed.text(bytes.clone()).or_raise().unwrap_or_else(|| {
                            // One statement's snapshot keeps the value it was called with.
                            Error::new(
                                ERRCODE_DATA_CORRUPTED,
                                format!("chat {}: its TOAST value went while it was being read", self.chat_id),
                                "Run the statement again.",
                            )
                            .raise()
                        });
                        migration_rows::entry_at(text, spans[n].shifted_back(bytes.start), self.now)
                    }
                    _ => break,
                };
                self.next += 1;
                if let Some(row) = (self.pick)(&self.chat_id, self.user_id.as_deref(), entry) {
                    return Some(row);
                }
            }
        }
        self.tail.take()
    }
}

/// Opens and indexes one chat, held or as it streams; the `Err` is why it has no messages.
fn open_chat(chat: Option<ChatArg>) -> Result<ChatDoc, migration_rows::ChatSkip> {
    let held = |text: Option<&str>| -> Result<ChatDoc, migration_rows::ChatSkip> {
        let doc = Document::open(text)?;
        let spans = doc.index_polling(&mut || {
            pgrx::check_for_interrupts!();
        })?;
        Ok(ChatDoc::Held(doc.text().to_owned(), spans))
    };
    let mut stream = match chat {
        None => return held(None),
        Some(ChatArg::Held(text)) => return held(readable(Some(text))?.as_deref()),
        Some(ChatArg::Toasted(stream)) => stream,
    };
    match index_streamed(&mut stream, &mut None).or_raise()? {
        Indexed::Streamed(spans) => {
            debug1!("chat_backfill: a chat argument streams from its TOAST table ({} bytes)", stream.raw_size());
            stream.restart();
            Ok(ChatDoc::Streamed(Streamed::new(stream), spans))
        }
        Indexed::Whole(text) => match text.as_str() {
            Some(text) => held(Some(text)),
            None => Err(migration_rows::ChatSkip::NotJson),
        },
        Indexed::Held(..) => unreachable!("a stream is indexed as a stream or read whole"),
    }
}

/// Every message of one chat as `chat_message` rows, following Open WebUI's migration
/// 8452d01d26d7. Never raises on data: what cannot be stored is left out (see
/// `chat_message_problems`). The `json` and `jsonb` overloads are SQL wrappers that
/// PostgreSQL inlines.
#[pg_extern(sql = r#"
CREATE FUNCTION chat_messages(chat_id text, user_id text, chat text, now bigint DEFAULT NULL)
RETURNS TABLE (id text, chat_id text, user_id text, role text, parent_id text, content json, output json,
               model_id text, files json, sources json, embeds json, done boolean, status_history json, error json,
               usage json, created_at bigint, updated_at bigint)
STABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
"#)]
fn chat_messages_text(
    chat_id: Option<ArgText>,
    user_id: Option<ArgText>,
    chat: Option<ChatArg>,
    now: Option<i64>,
) -> TableIterator<
    'static,
    (
        name!(id, ServerText),
        name!(chat_id, ServerText),
        name!(user_id, Option<ServerText>),
        name!(role, ServerText),
        name!(parent_id, Option<ServerText>),
        name!(content, RawJson),
        name!(output, RawJson),
        name!(model_id, Option<ServerText>),
        name!(files, RawJson),
        name!(sources, RawJson),
        name!(embeds, RawJson),
        name!(done, Option<bool>),
        name!(status_history, RawJson),
        name!(error, RawJson),
        name!(usage, RawJson),
        name!(created_at, i64),
        name!(updated_at, i64),
    ),
> {
    // In a database that is not UTF8, arguments that cannot be read as UTF-8 give no rows
    // (chat_message_problems says why), as a document that is not JSON does.
    let (chat_id, user_id) = (chat_id.and_then(|t| t.0), user_id.map(|t| t.0));
    let doc = match (&chat_id, &user_id) {
        (Some(_), None | Some(Some(_))) => open_chat(chat).ok(),
        _ => None,
    };
    TableIterator::new(ChatEntries {
        chat_id: chat_id.unwrap_or_default(),
        user_id: user_id.flatten(),
        doc,
        next: 0,
        now: now.unwrap_or_else(transaction_start_epoch),
        pick: message_row,
        tail: None,
    })
}

/// A text argument as UTF-8: `Err` when the database's encoding holds it in bytes that are
/// not.
fn readable(arg: Option<ArgText>) -> Result<Option<String>, migration_rows::ChatSkip> {
    match arg {
        None => Ok(None),
        Some(ArgText(Some(text))) => Ok(Some(text)),
        Some(ArgText(None)) => Err(migration_rows::ChatSkip::NotJson),
    }
}

/// One `chat_message` row, in the table's column order.
type MessageRow = (
    ServerText,
    ServerText,
    Option<ServerText>,
    ServerText,
    Option<ServerText>,
    RawJson,
    RawJson,
    Option<ServerText>,
    RawJson,
    RawJson,
    RawJson,
    Option<bool>,
    RawJson,
    RawJson,
    RawJson,
    i64,
    i64,
);

fn message_row(chat_id: &str, user_id: Option<&str>, entry: Entry<'_>) -> Option<MessageRow> {
    let Entry::Row(m) = entry else { return None };
    server_row(chat_id, user_id, &m).ok()
}

/// The row in the database's encoding; `Err` names the first column with a character the
/// encoding lacks (a `\u` escape in the JSON can name any character; a UTF8 database takes
/// every one).
fn server_row(chat_id: &str, user_id: Option<&str>, m: &migration_rows::Message<'_>) -> Result<MessageRow, &'static str> {
    let text = |s: &str, column: &'static str| to_server(s).map(ServerText).ok_or(column);
    let optional = |s: Option<&str>, column| s.map(|s| text(s, column)).transpose();
    let json = |s: &str, column: &'static str| to_server(s).map(RawJson).ok_or(column);
    Ok((
        text(&m.id(chat_id), "id")?,
        text(chat_id, "chat_id")?,
        optional(user_id, "user_id")?,
        text(&m.role, "role")?,
        optional(m.parent_id.as_deref(), "parent_id")?,
        json(m.content, "content")?,
        json(m.output, "output")?,
        optional(m.model_id.as_deref(), "model_id")?,
        json(m.files, "files")?,
        json(m.sources, "sources")?,
        json(m.embeds, "embeds")?,
        m.done,
        json(m.status_history, "status_history")?,
        json(m.error, "error")?,
        json(m.usage, "usage")?,
        m.timestamp,
        m.timestamp,
    ))
}

fn problem_row(_: &str, _: Option<&str>, entry: Entry<'_>) -> Option<(Option<String>, String)> {
    match entry {
        Entry::Row(_) if server_takes_utf8() => None,
        Entry::Row(m) => server_row("", None, &m).err().map(|column| {
            // SAFETY: the encoding's name is a static string of PostgreSQL's.
            let encoding = unsafe { core::ffi::CStr::from_ptr(pg_sys::GetDatabaseEncodingName()) };
            (
                Some(m.key.into_owned()),
                format!(
                    "message skipped: column {column} holds a character that the database encoding {} cannot hold",
                    encoding.to_string_lossy()
                ),
            )
        }),
        entry => entry.problem().map(|(key, reason)| (Some(key), reason)),
    }
}

/// Why messages of one chat are left out by `chat_messages`: one row per message
/// skipped by the rules or impossible to store; `message_key` is NULL when the whole
/// chat is unusable.
#[pg_extern(sql = r#"
CREATE FUNCTION chat_message_problems(chat_id text, chat text) RETURNS TABLE (message_key text, reason text)
IMMUTABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
"#)]
fn chat_message_problems_text(
    chat_id: Option<ArgText>,
    chat: Option<ChatArg>,
) -> TableIterator<'static, (name!(message_key, Option<String>), name!(reason, String))> {
    let unreadable = |what: &str| Some((None, format!("chat skipped: its {what} is not valid UTF-8 in this database's encoding")));
    let (doc, tail) = match chat_id {
        None => (None, Some((None, "chat skipped: chat_id is NULL, so no message id can be formed".to_owned()))),
        Some(ArgText(None)) => (None, unreadable("id")),
        Some(ArgText(Some(_))) => match chat {
            Some(ChatArg::Held(ArgText(None))) => (None, unreadable("document")),
            chat => match open_chat(chat) {
                Ok(doc) => (Some(doc), None),
                Err(skip) => (None, skip.is_problem().then(|| (None, skip.describe().to_owned()))),
            },
        },
    };
    // `now` does not change which messages are left out.
    TableIterator::new(ChatEntries { chat_id: String::new(), user_id: None, doc, next: 0, now: 0, pick: problem_row, tail })
}

extension_sql_file!(
    "../../sql/json_overloads.sql",
    name = "json_overloads",
    requires = [chat_messages_text, chat_message_problems_text]
);

/// Open WebUI's whole chat_message backfill in one call: one row per batch as it
/// completes, a NOTICE with totals and rate as it goes. Never aborts on bad data: bad
/// messages and chats go to `chat_backfill.rejected_messages`. Runs with the caller's
/// privileges. Refuses (53400) a run whose estimated WAL is over
/// `chat_backfill.max_atomic_wal`, unless `force`.
#[allow(clippy::too_many_arguments)]
#[pg_extern(sql = r#"
CREATE FUNCTION backfill_chat_messages(
    source regclass DEFAULT NULL,
    target regclass DEFAULT NULL,
    batch_size integer DEFAULT NULL,
    now bigint DEFAULT NULL,
    source_filter text DEFAULT $$user_id OPERATOR(pg_catalog.!~~) 'shared-%'::pg_catalog.text$$,
    id_column text DEFAULT 'id',
    user_id_column text DEFAULT 'user_id',
    chat_column text DEFAULT 'chat',
    dry_run boolean DEFAULT false,
    force boolean DEFAULT false,
    batch_time interval DEFAULT NULL,
    "rows" text DEFAULT 'migration')
RETURNS TABLE (batch integer, chats_read bigint, messages_inserted bigint, messages_rejected bigint,
               messages_existing bigint, last_chat_id text, elapsed_ms double precision, messages_skipped bigint,
               chats_skipped bigint, chats_vanished bigint, batch_size integer, messages_dropped bigint,
               write_path text)
VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
"#)]
fn backfill_chat_messages(
    source: Option<RegClass>,
    target: Option<RegClass>,
    batch_size: Option<i32>,
    now: Option<i64>,
    source_filter: Option<&str>,
    id_column: Option<&str>,
    user_id_column: Option<&str>,
    chat_column: Option<&str>,
    dry_run: Option<bool>,
    force: Option<bool>,
    batch_time: Option<Interval>,
    rows: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(batch, i32),
        name!(chats_read, i64),
        name!(messages_inserted, i64),
        name!(messages_rejected, i64),
        name!(messages_existing, i64),
        name!(last_chat_id, Option<String>),
        name!(elapsed_ms, f64),
        name!(messages_skipped, i64),
        name!(chats_skipped, i64),
        name!(chats_vanished, i64),
        name!(batch_size, i32),
        name!(messages_dropped, i64),
        name!(write_path, Option<String>),
    ),
> {
    // NULL means the default, as in the CALL and plan().
    let (dry_run, force) = (dry_run.unwrap_or(false), force.unwrap_or(false));
    if !dry_run {
        crate::pg::read_only::refuse("run the backfill", crate::pg::read_only::WRITES_HINT).or_raise();
    }
    let mut settings = Request {
        batch_size,
        now,
        source_filter,
        dry_run,
        batch_time: batch_time.map(|t| t.as_micros()),
        ..Request::new(source.map(|r| r.0), target.map(|r| r.0))
    }
    .columns(id_column, user_id_column, chat_column)
    .rows(rows)
    .check()
    .or_raise();
    if !dry_run && !force {
        crate::planning::admission::admit(&settings).or_raise();
    }
    // A dry run writes nothing and records nothing: on a standby it draws no run id either.
    if crate::pg::read_only::cannot_write().is_none() {
        settings.run_id = next_run_id().or_raise();
    }
    let mut run = Backfill::start(settings).or_raise();
    TableIterator::new(std::iter::from_fn(move || crate::pg::key_text::pinned(|| run.next_batch()).or_raise()).map(|b| {
        (
            b.batch,
            b.chats_read,
            b.messages_inserted,
            b.messages_rejected,
            b.messages_existing,
            b.last_chat_id,
            b.elapsed_ms,
            b.messages_skipped,
            b.chats_skipped,
            b.chats_vanished,
            b.batch_size,
            b.messages_dropped,
            b.write_path.map(str::to_owned),
        )
    }))
}

/// Compares `target` with the rows the rules (`rows`: 'migration' or 'app') give for
/// `source`, chat by chat, and returns what differs: `missing` (a row the rules give that
/// the target lacks), `different` (the listed columns differ; JSON compared as values;
/// updated_at and values that came from the clock are not compared), `extra` (a row the
/// rules do not give, e.g. of a message no longer in the document) and `partial_chat`
/// (some but not all of a chat's rows present). Writes nothing; summary in a NOTICE. Takes
/// the backfill's own `source_filter` and column names (`rows` stays third, where 0.6.0 had
/// it), so it checks exactly the chats a backfill with the same arguments writes.
#[allow(clippy::too_many_arguments)]
#[pg_extern(
    sql = r#"
CREATE FUNCTION chat_backfill.verify(
    source regclass DEFAULT NULL,
    target regclass DEFAULT NULL,
    "rows" text DEFAULT 'migration',
    source_filter text DEFAULT $$user_id OPERATOR(pg_catalog.!~~) 'shared-%'::pg_catalog.text$$,
    id_column text DEFAULT 'id',
    user_id_column text DEFAULT 'user_id',
    chat_column text DEFAULT 'chat')
RETURNS TABLE (chat_id text, message_key text, kind text, columns text[])
VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
"#,
    requires = ["state_schema"]
)]
fn verify(
    source: Option<pg_sys::Oid>,
    target: Option<pg_sys::Oid>,
    rows: Option<&str>,
    source_filter: Option<&str>,
    id_column: Option<&str>,
    user_id_column: Option<&str>,
    chat_column: Option<&str>,
) -> TableIterator<
    'static,
    (name!(chat_id, String), name!(message_key, Option<String>), name!(kind, String), name!(columns, Option<Vec<String>>)),
> {
    let settings = Request { source_filter, dry_run: true, ..Request::new(source, target) }
        .columns(id_column, user_id_column, chat_column)
        .rows(rows)
        .check()
        .or_raise();
    crate::pg::catalog::check_readable(&settings.target, "verify()").or_raise();
    let mut verifier = crate::engine::verify::Verifier::start(settings).or_raise();
    TableIterator::new(std::iter::from_fn(move || crate::pg::key_text::pinned(|| verifier.next()).or_raise()).map(|f| (f.chat_id, f.message_key, f.kind.to_owned(), f.columns)))
}
