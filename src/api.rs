//! The SQL surface: thin `#[pg_extern]` wrappers over the plain-Rust core.

use pgrx::prelude::*;
use pgrx::PgRelation;
use crate::datums::RawJson as JsonString;

use crate::expand::{self, Entry};


/// `now` as the reference computes it, but fixed for the transaction: its start time in
/// whole epoch seconds.
pub fn transaction_start_epoch() -> i64 {
    // TimestampTz counts microseconds from 2000-01-01; 946684800 is that day in epoch seconds.
    let ts = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    ts.div_euclid(1_000_000) + 946_684_800
}

fn message_rows(
    chat_id: Option<&str>,
    user_id: Option<&str>,
    chat: Option<&str>,
    now: Option<i64>,
) -> Vec<MessageRow> {
    let Some(chat_id) = chat_id else { return Vec::new() };
    let now = now.unwrap_or_else(transaction_start_epoch);
    let mut rows = Vec::new();
    let _ = expand::expand_chat(chat, now, |entry| {
        if let Entry::Row(m) = entry {
            let json = |s: &str| JsonString(s.to_owned());
            rows.push((
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
            ));
        }
    });
    rows
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
        name!(content, JsonString),
        name!(output, JsonString),
        name!(model_id, Option<String>),
        name!(files, JsonString),
        name!(sources, JsonString),
        name!(embeds, JsonString),
        name!(done, Option<bool>),
        name!(status_history, JsonString),
        name!(error, JsonString),
        name!(usage, JsonString),
        name!(created_at, i64),
        name!(updated_at, i64),
    ),
> {
    TableIterator::new(message_rows(chat_id, user_id, chat, now))
}

/// One `chat_message` row, in the table's column order.
type MessageRow = (
    String,
    String,
    Option<String>,
    String,
    Option<String>,
    JsonString,
    JsonString,
    Option<String>,
    JsonString,
    JsonString,
    JsonString,
    Option<bool>,
    JsonString,
    JsonString,
    JsonString,
    i64,
    i64,
);

fn problem_rows(chat_id: Option<&str>, chat: Option<&str>) -> Vec<(Option<String>, String)> {
    if chat_id.is_none() {
        return vec![(None, "chat skipped: chat_id is NULL, so no message id can be formed".to_owned())];
    }
    let mut rows = Vec::new();
    // `now` does not change which messages are left out.
    let result = expand::expand_chat(chat, 0, |entry| {
        if let Some((key, reason)) = entry.problem() {
            rows.push((Some(key), reason));
        }
    });
    if let Err(skip) = result {
        if skip.is_problem() {
            rows.push((None, skip.describe().to_owned()));
        }
    }
    rows
}

/// Why messages of one chat are left out by `chat_messages`: one row per message
/// skipped by the rules or impossible to store; `message_key` is NULL when the whole
/// chat is unusable.
#[pg_extern(name = "chat_message_problems", immutable, parallel_safe)]
fn chat_message_problems_text(
    chat_id: Option<&str>,
    chat: Option<&str>,
) -> TableIterator<'static, (name!(message_key, Option<String>), name!(reason, String))> {
    TableIterator::new(problem_rows(chat_id, chat))
}

extension_sql_file!(
    "../sql/json_overloads.sql",
    name = "json_overloads",
    requires = [chat_messages_text, chat_message_problems_text]
);

/// Open WebUI's whole chat_message backfill in one call: one row per batch as it
/// completes, a NOTICE with totals and rate as it goes. Never aborts on bad data: bad
/// messages and chats go to `chat_backfill.rejected_messages`. Runs with the caller's
/// privileges.
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile)]
fn backfill_chat_messages(
    source: default!(Option<PgRelation>, "NULL"),
    target: default!(Option<PgRelation>, "NULL"),
    batch_size: default!(i32, 5000),
    now: default!(Option<i64>, "NULL"),
    source_filter: default!(Option<&str>, "$$user_id NOT LIKE 'shared-%'$$"),
    id_column: default!(&str, "'id'"),
    user_id_column: default!(&str, "'user_id'"),
    chat_column: default!(&str, "'chat'"),
    dry_run: default!(bool, false),
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
    ),
> {
    let settings = crate::engine_settings::build(
        source.map(|r| r.oid()),
        target.map(|r| r.oid()),
        batch_size,
        now,
        source_filter,
        id_column,
        user_id_column,
        chat_column,
        dry_run,
    );
    let run = crate::backfill::Backfill::start(settings);
    TableIterator::new(run.map(|b| {
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
        )
    }))
}

extension_sql_file!("../sql/state.sql", name = "state_schema", bootstrap);
