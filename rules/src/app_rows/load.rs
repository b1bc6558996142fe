//! The entry points: open a chat the app's way (`open`), locate its messages (`index`), repair-
//! check it (`check`) and expand it (`expand`, `entry_at`).

use std::ops::Range;
use crate::migration_rows::{find_messages_and_current, Found, Keys, Span};
use crate::scalar::{kind, Kind};

use super::message::{AppSkip, Codec, fields_at, key_at};
use super::scan::scan;
use super::current_id::repair;
use super::columns::{AppEntry, Server, entry};

/// Nesting the app loads: the sanitizer re-serializes every document, with orjson up to
/// 255 levels and beyond that with the standard library, whose recursion fails under
/// Python's default limit of 1000 frames (measured through the app's own read path: 964
/// nested lists in a message's content load, 968 do not; under a web server's deeper stack
/// it is a little less).
pub const APP_MAX_DEPTH: usize = 968;

/// The same where the sanitizer's recursive walk runs (the document holds a NUL escape, a
/// `\\u0000` text, or a lone surrogate): about two Python frames a level (measured from a
/// plain script: 488 nested lists in a message's content load, 492 do not; called from
/// deeper in a stack, as under pytest or a web server, somewhat less).
pub const APP_MAX_DEPTH_STRIPPED: usize = 492;

/// orjson's own nesting limit on reading; deeper documents go to the fallback codec.
const ORJSON_MAX_DEPTH: usize = 1024;

/// A chat document as the app's model loads it.
pub struct Opened<'a> {
    pub doc: &'a str,
    pub codec: Codec,
}

/// Checks what the app's model and codec need of the column before anything else:
/// an object, a user, a codec that can read it.
pub fn open<'a>(text: Option<&'a str>, user_id: Option<&str>, max_depth: usize) -> Result<Opened<'a>, AppSkip> {
    let Some(text) = text else { return Err(AppSkip::Empty) };
    let doc = text.trim_matches([' ', '\t', '\n', '\r']);
    match kind(doc) {
        Kind::Object => {}
        Kind::Null => return Err(AppSkip::Empty),
        _ => return Err(AppSkip::NotObject),
    }
    if user_id.is_none() {
        return Err(AppSkip::NoUser);
    }
    let shape = scan(doc);
    let fallback = shape.overflow || shape.lone_surrogate || shape.depth > ORJSON_MAX_DEPTH;
    let stripped = shape.lone_surrogate || doc.contains("\\u0000");
    let max_depth = if stripped { max_depth.min(APP_MAX_DEPTH_STRIPPED) } else { max_depth };
    if shape.depth > max_depth || (fallback && shape.longest_integer > 100) {
        return Err(AppSkip::Unloadable);
    }
    let plain = !shape.overflow && !shape.rewritten_strings && !shape.wide_integer;
    Ok(Opened { doc, codec: Codec { exact_ints: fallback, plain } })
}

/// Where a chat's messages and its `history.currentId` lie.
pub struct Indexed {
    pub spans: Vec<Span>,
    pub current_id: Option<Range<usize>>,
}

/// Locates the messages the app would write, keys compared as sanitized.
pub fn index(doc: &str, poll: &mut dyn FnMut()) -> Result<Indexed, AppSkip> {
    let (found, current_id) = find_messages_and_current(doc, poll, Keys::Sanitized).map_err(|_| AppSkip::NotObject)?;
    let spans = match found {
        Found::NoHistory | Found::NoMessages => Vec::new(),
        Found::HistoryNotObject => return Err(AppSkip::HistoryNotObject),
        Found::MessagesNotObject { truthy: false } => Vec::new(),
        Found::MessagesNotObject { truthy: true } => return Err(AppSkip::MessagesNotObject),
        Found::Messages(spans) => spans,
    };
    Ok(Indexed { spans, current_id })
}

/// Every message of an indexed chat the app's way: the read path's repair of `currentId`
/// first (its failure loses the whole chat), then each entry. For a chat that goes whole
/// into one batch; a longer one takes `check` and then `entry_at` a slice at a time.
pub fn expand<'a>(
    doc: &'a str,
    indexed: &Indexed,
    now: i64,
    server: Server,
    codec: Codec,
    poll: &mut dyn FnMut(),
) -> Result<Vec<AppEntry<'a>>, AppSkip> {
    check(doc, indexed, poll)?;
    let mut entries = Vec::with_capacity(indexed.spans.len());
    for (n, &span) in indexed.spans.iter().enumerate() {
        if n % 1024 == 0 {
            poll();
        }
        entries.push(entry_at(doc, span, now, server, codec));
    }
    Ok(entries)
}

/// Whether the app's read path loads the chat at all (its repair of `currentId` does not
/// raise). Reads the messages again rather than keeping what it read: memory stays at a
/// bit per message, plus 12 bytes per message only when the repair must search for the
/// latest leaf (no usable `currentId`).
pub fn check(doc: &str, indexed: &Indexed, poll: &mut dyn FnMut()) -> Result<(), AppSkip> {
    let current_id = indexed.current_id.clone().map(|r| &doc[r]);
    repair(doc, &indexed.spans, current_id, poll)
}

/// One entry of `history.messages` the app's way, read from the document on its own.
pub fn entry_at(doc: &str, span: Span, now: i64, server: Server, codec: Codec) -> AppEntry<'_> {
    entry(key_at(doc, span), span.value(doc), fields_at(doc, span), now, server, codec)
}
