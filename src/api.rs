//! The SQL surface: thin `#[pg_extern]` wrappers over the plain-Rust core and the engine.
//! Errors travel as values up to here and are raised once.

use pgrx::prelude::*;
use pgrx::datum::Interval;
use pgrx::PgRelation;

use crate::backfill::settings::{next_run_id, transaction_start_epoch, Request};
use crate::backfill::Backfill;
use crate::datums::RawJson;
use crate::error::OrRaise;
use crate::expand::{self, Document, Entry, Span};

/// One chat's entries, expanded one at a time as rows are asked for: a chat of a million
/// messages costs its text and its index, not a million rows at once, and a cancel lands
/// between any two messages.
struct ChatEntries<T> {
    chat_id: String,
    user_id: Option<String>,
    /// The document's text and where its messages are; `None`: no messages.
    doc: Option<(String, Vec<Span>)>,
    next: usize,
    now: i64,
    /// Turns an entry into an output row, or `None` to leave it out.
    pick: fn(&str, Option<&str>, Entry<'_>) -> Option<T>,
    /// A last row for the chat as a whole (why it gives no messages).
    tail: Option<T>,
}

impl<T> Iterator for ChatEntries<T> {
    type Item = T;
    fn next(&mut self) -> Option<T> {
        if let Some((text, spans)) = &self.doc {
            while self.next < spans.len() {
                pgrx::check_for_interrupts!();
                let entry = expand::entry_at(text, spans[self.next], self.now);
                self.next += 1;
                if let Some(row) = (self.pick)(&self.chat_id, self.user_id.as_deref(), entry) {
                    return Some(row);
                }
            }
        }
        self.tail.take()
    }
}

/// Opens and indexes one chat; the `Err` is why it has no messages.
fn open_chat(chat: Option<&str>) -> Result<(String, Vec<Span>), expand::ChatSkip> {
    let doc = Document::open(chat)?;
    let spans = doc.index_polling(&mut || {
                    pgrx::check_for_interrupts!();
                })?;
    Ok((doc.text().to_owned(), spans))
}

/// Every message of one chat as `chat_message` rows, following Open WebUI's migration
/// 8452d01d26d7. Never raises on data: what cannot be stored is left out (see
/// `chat_message_problems`). The `json` and `jsonb` overloads are SQL wrappers that
/// PostgreSQL inlines.
#[pg_extern(name = "chat_messages", stable, parallel_safe)]
fn chat_messages_text(
    chat_id: Option<&str>,
    user_id: Option<&str>,
    chat: Option<&str>,
    now: default!(Option<i64>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(id, String),
        name!(chat_id, String),
        name!(user_id, Option<String>),
        name!(role, String),
        name!(parent_id, Option<String>),
        name!(content, RawJson),
        name!(output, RawJson),
        name!(model_id, Option<String>),
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
    let doc = match chat_id {
        Some(_) => open_chat(chat).ok(),
        None => None,
    };
    TableIterator::new(ChatEntries {
        chat_id: chat_id.unwrap_or_default().to_owned(),
        user_id: user_id.map(str::to_owned),
        doc,
        next: 0,
        now: now.unwrap_or_else(transaction_start_epoch),
        pick: message_row,
        tail: None,
    })
}

/// One `chat_message` row, in the table's column order.
type MessageRow = (
    String,
    String,
    Option<String>,
    String,
    Option<String>,
    RawJson,
    RawJson,
    Option<String>,
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
    let json = |s: &str| RawJson(s.to_owned());
    Some((
        m.id(chat_id),
        chat_id.to_owned(),
        user_id.map(str::to_owned),
        m.role.into_owned(),
        m.parent_id.map(|s| s.into_owned()),
        json(m.content),
        json(m.output),
        m.model_id.map(|s| s.into_owned()),
        json(m.files),
        json(m.sources),
        json(m.embeds),
        m.done,
        json(m.status_history),
        json(m.error),
        json(m.usage),
        m.timestamp,
        m.timestamp,
    ))
}

fn problem_row(_: &str, _: Option<&str>, entry: Entry<'_>) -> Option<(Option<String>, String)> {
    entry.problem().map(|(key, reason)| (Some(key), reason))
}

/// Why messages of one chat are left out by `chat_messages`: one row per message
/// skipped by the rules or impossible to store; `message_key` is NULL when the whole
/// chat is unusable.
#[pg_extern(name = "chat_message_problems", immutable, parallel_safe)]
fn chat_message_problems_text(
    chat_id: Option<&str>,
    chat: Option<&str>,
) -> TableIterator<'static, (name!(message_key, Option<String>), name!(reason, String))> {
    let (doc, tail) = match chat_id {
        None => (None, Some((None, "chat skipped: chat_id is NULL, so no message id can be formed".to_owned()))),
        Some(_) => match open_chat(chat) {
            Ok(doc) => (Some(doc), None),
            Err(skip) => (None, skip.is_problem().then(|| (None, skip.describe().to_owned()))),
        },
    };
    // `now` does not change which messages are left out.
    TableIterator::new(ChatEntries { chat_id: String::new(), user_id: None, doc, next: 0, now: 0, pick: problem_row, tail })
}

extension_sql_file!(
    "../sql/json_overloads.sql",
    name = "json_overloads",
    requires = [chat_messages_text, chat_message_problems_text]
);

/// Open WebUI's whole chat_message backfill in one call: one row per batch as it
/// completes, a NOTICE with totals and rate as it goes. Never aborts on bad data: bad
/// messages and chats go to `chat_backfill.rejected_messages`. Runs with the caller's
/// privileges. Refuses (53400) a run whose estimated WAL is over
/// `chat_backfill.max_atomic_wal`, unless `force`.
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile)]
fn backfill_chat_messages(
    source: default!(Option<PgRelation>, "NULL"),
    target: default!(Option<PgRelation>, "NULL"),
    batch_size: default!(Option<i32>, "NULL"),
    now: default!(Option<i64>, "NULL"),
    source_filter: default!(Option<&str>, "$$user_id OPERATOR(pg_catalog.!~~) 'shared-%'::pg_catalog.text$$"),
    id_column: default!(&str, "'id'"),
    user_id_column: default!(&str, "'user_id'"),
    chat_column: default!(&str, "'chat'"),
    dry_run: default!(bool, false),
    force: default!(bool, false),
    batch_time: default!(Option<Interval>, "NULL"),
    rows: default!(&str, "'migration'"),
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
    ),
> {
    let mut settings = Request {
        source: source.map(|r| r.oid()),
        target: target.map(|r| r.oid()),
        batch_size,
        now,
        source_filter,
        id_column,
        user_id_column,
        chat_column,
        dry_run,
        batch_time: batch_time.map(|t| t.as_micros()),
        rows,
    }
    .check()
    .or_raise();
    if !dry_run && !force {
        crate::admission::admit(&settings).or_raise();
    }
    settings.run_id = next_run_id().or_raise();
    let mut run = Backfill::start(settings).or_raise();
    TableIterator::new(std::iter::from_fn(move || crate::key_text::pinned(|| run.next_batch()).or_raise()).map(|b| {
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
        )
    }))
}

extension_sql_file!("../sql/state.sql", name = "state_schema", bootstrap);

/// Compares `target` with the rows the rules (`rows`: 'migration' or 'app') give for
/// `source`, chat by chat, and returns what differs: `missing` (a row the rules give that
/// the target lacks), `different` (the listed columns differ; JSON compared as values;
/// updated_at and values that came from the clock are not compared), `extra` (a row the
/// rules do not give, e.g. of a message no longer in the document) and `partial_chat`
/// (some but not all of a chat's rows present). Writes nothing; summary in a NOTICE.
#[pg_extern(
    sql = r#"
CREATE FUNCTION chat_backfill.verify(
    source regclass DEFAULT NULL,
    target regclass DEFAULT NULL,
    "rows" text DEFAULT 'migration')
RETURNS TABLE (chat_id text, message_key text, kind text, columns text[])
VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
"#,
    requires = ["state_schema"]
)]
fn verify(
    source: Option<pg_sys::Oid>,
    target: Option<pg_sys::Oid>,
    rows: Option<&str>,
) -> TableIterator<
    'static,
    (name!(chat_id, String), name!(message_key, Option<String>), name!(kind, String), name!(columns, Option<Vec<String>>)),
> {
    let settings = Request {
        source,
        target,
        batch_size: None,
        now: None,
        source_filter: Some(SHARED_CHATS_FILTER),
        id_column: "id",
        user_id_column: "user_id",
        chat_column: "chat",
        dry_run: true,
        batch_time: None,
        rows: rows.unwrap_or("migration"),
    }
    .check()
    .or_raise();
    crate::relations::check_readable(&settings.target, "verify()").or_raise();
    let mut verifier = crate::backfill::verify::Verifier::start(settings).or_raise();
    TableIterator::new(std::iter::from_fn(move || crate::key_text::pinned(|| verifier.next()).or_raise()).map(|f| (f.chat_id, f.message_key, f.kind.to_owned(), f.columns)))
}

/// The migration's own filter: shared chats (user_id 'shared-...') are copies, left out.
const SHARED_CHATS_FILTER: &str = "user_id OPERATOR(pg_catalog.!~~) 'shared-%'::pg_catalog.text";
