//! One message of `history.messages` as the app reads it: its sanitized key, the fields it
//! reads, Python's truthiness, and why the app skips a chat (`AppSkip`) or which codec reads it
//! (`Codec`).

use std::borrow::Cow;
use crate::migration_rows::{message_fields, read_fields, Keys, Span};
use crate::scalar::{self, decode_string, kind, Kind};

/// What the app's read path makes of a whole chat, when it writes no rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppSkip {
    /// SQL NULL or JSON null, or no messages: nothing to write, nothing wrong.
    Empty,
    /// Not a JSON object (a double-encoded chat is a JSON string): the app's model refuses it.
    NotObject,
    /// The chat row has no `user_id`: the app's model refuses it.
    NoUser,
    /// The app's JSON codec cannot load it (integer literal over 100 characters, or
    /// nesting deeper than its encoder's recursion allows).
    Unloadable,
    /// `chat.history` is present but not an object: the app raises.
    HistoryNotObject,
    /// `chat.history.messages` is truthy but not an object: the app raises.
    MessagesNotObject,
    /// The read path's repair of `currentId` raises (its failure makes the chat load as
    /// nothing): a `parentId` or `currentId` that is a list or object, a current message
    /// whose `output` is a number, leaf timestamps Python cannot compare.
    RepairFails,
}

impl AppSkip {
    pub fn is_problem(self) -> bool {
        self != AppSkip::Empty
    }

    pub fn describe(self) -> &'static str {
        match self {
            AppSkip::Empty => "the chat is empty",
            AppSkip::NotObject => {
                "chat skipped: it is not a JSON object (a double-encoded chat is a JSON string), so Open WebUI cannot load it"
            }
            AppSkip::NoUser => "chat skipped: the chat has no user_id, so Open WebUI cannot load it",
            AppSkip::Unloadable => {
                "chat skipped: Open WebUI's JSON codec cannot load it (an integer literal longer than 100 characters, \
                 or nesting deeper than its limit)"
            }
            AppSkip::HistoryNotObject => "chat skipped: chat.history is not a JSON object, and Open WebUI raises on it",
            AppSkip::MessagesNotObject => {
                "chat skipped: chat.history.messages is not a JSON object, and Open WebUI raises on it"
            }
            AppSkip::RepairFails => {
                "chat skipped: Open WebUI's repair of history.currentId fails on it (a parentId or currentId that is \
                 a list or an object, a current message whose output is a number, or leaf timestamps of types Python \
                 cannot compare, like a string and a number), so it cannot load the chat"
            }
        }
    }

    pub fn sqlstate(self) -> &'static str {
        match self {
            AppSkip::Empty => "00000",
            AppSkip::NoUser => "23502",
            AppSkip::Unloadable => "54000",
            _ => "22023",
        }
    }
}

/// Which of the app's two JSON readers parses a document. orjson reads it unless it holds
/// a number beyond double range, a lone surrogate escape or nesting over 1024 levels;
/// then the standard library (engineio's wrapper) reads all of it. They differ on
/// integers: orjson makes a float of one outside [-2^63, 2^64-1]; the standard library
/// keeps every integer exact but refuses one longer than 100 characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Codec {
    pub exact_ints: bool,
    /// Nothing in the document changes on the way through the app's codec (no NUL or
    /// surrogate escape, no number beyond double range, no integer beyond 64 bits): JSON
    /// values keep their text without a second look. Nearly every real chat.
    pub plain: bool,
}

/// The sanitized key of a message, as the app's dict holds it.
pub(super) fn key_at(doc: &str, span: Span) -> Cow<'_, str> {
    sanitized(decode_string(span.key(doc)))
}

/// The fields of a message the app reads; `None` if it is not an object.
pub(super) fn fields_at(doc: &str, span: Span) -> Option<Fields<'_>> {
    let raw = span.value(doc);
    (kind(raw) == Kind::Object).then(|| read_fields::<Fields>(raw)).flatten()
}

/// Python's truthiness of the sanitized value.
pub fn truthy(raw: &str) -> bool {
    match kind(raw) {
        Kind::String => !decode_string(raw).sanitized().is_empty(),
        _ => scalar::is_truthy(raw),
    }
}

/// The decoded string without NULs or lone surrogates, borrowed where it has none.
pub(super) fn sanitized(d: scalar::Decoded<'_>) -> Cow<'_, str> {
    if d.storable().is_ok() {
        return d.into_storable().unwrap_or_default();
    }
    Cow::Owned(d.sanitized().into_owned())
}

/// A value quoted for an error message, cut at 80 characters (the message's JSON is in
/// the rejection anyway).
pub(super) fn shown(s: &str) -> String {
    match s.char_indices().nth(80) {
        None => format!("{s:?}"),
        Some((at, _)) => format!("{:?}... ({} characters)", &s[..at], s.chars().count()),
    }
}

message_fields!(
    /// The message fields the app reads (last duplicate wins, keys compared sanitized).
    pub(super) Fields, Keys::Sanitized, {
        id: b"id",
        children_ids: b"childrenIds",
        role: b"role",
        user_id: b"user_id",
        parent_id: b"parent_id",
        parent_id_camel: b"parentId",
        content: b"content",
        output: b"output",
        model_id: b"model_id",
        model: b"model",
        files: b"files",
        sources: b"sources",
        embeds: b"embeds",
        meta: b"meta",
        done: b"done",
        status_history: b"status_history",
        status_history_camel: b"statusHistory",
        error: b"error",
        usage: b"usage",
        info: b"info",
        context_summary: b"context_summary",
        context_summary_camel: b"contextSummary",
        timestamp: b"timestamp",
    }
);
