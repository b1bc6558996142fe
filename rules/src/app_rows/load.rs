//! The entry points: open a chat the app's way (`open`), locate its messages (`index`), repair-
//! check it (`check`) and expand it (`expand`, `entry_at`).

use std::ops::Range;
use crate::migration_rows::{find_messages_and_current, Found, Keys, Span};
use crate::scalar::{kind, Kind};

use super::message::{AppSkip, Codec, fields_at, key_at};
use crate::stream_index::{StreamIndex, Streamed};
use super::scan::{scan, Shape, ShapeStream};
use super::current_id::{repair, Facts};
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
    let codec = codec_of(scan(doc), doc.contains("\\u0000"), max_depth)?;
    Ok(Opened { doc, codec })
}

/// Which codec reads a document of this shape, or why the app cannot load it.
fn codec_of(shape: Shape, nul_text: bool, max_depth: usize) -> Result<Codec, AppSkip> {
    let fallback = shape.overflow || shape.lone_surrogate || shape.depth > ORJSON_MAX_DEPTH;
    let stripped = shape.lone_surrogate || nul_text;
    let max_depth = if stripped { max_depth.min(APP_MAX_DEPTH_STRIPPED) } else { max_depth };
    if shape.depth > max_depth || (fallback && shape.longest_integer > 100) {
        return Err(AppSkip::Unloadable);
    }
    let plain = !shape.overflow && !shape.rewritten_strings && !shape.wide_integer;
    Ok(Codec { exact_ints: fallback, plain })
}

/// Where a chat's messages and its `history.currentId` lie.
pub struct Indexed {
    pub spans: Vec<Span>,
    pub current_id: Option<Range<usize>>,
}

/// Locates the messages the app would write, keys compared as sanitized.
pub fn index(doc: &str, poll: &mut dyn FnMut()) -> Result<Indexed, AppSkip> {
    let (found, current_id) = find_messages_and_current(doc, poll, Keys::Sanitized).map_err(|_| AppSkip::NotObject)?;
    indexed(found, current_id)
}

fn indexed(found: Found, current_id: Option<Range<usize>>) -> Result<Indexed, AppSkip> {
    let spans = match found {
        Found::NoHistory | Found::NoMessages => Vec::new(),
        Found::HistoryNotObject => return Err(AppSkip::HistoryNotObject),
        Found::MessagesNotObject { truthy: false } => Vec::new(),
        Found::MessagesNotObject { truthy: true } => return Err(AppSkip::MessagesNotObject),
        Found::Messages(spans) => spans,
    };
    Ok(Indexed { spans, current_id })
}

/// `open` and `index` over a chat object given in pieces, split anywhere (a chat streamed
/// from its TOAST table, issue 26): the same codec, messages and `currentId`, holding
/// neither the text nor anything of it but the index (see `StreamIndex`).
pub struct StreamOpen {
    shape: ShapeStream,
    index: StreamIndex,
    failed: bool,
}

/// What a streamed chat gives.
pub enum StreamOpened {
    /// As `open` then `index` on the whole text; offsets from the first byte fed.
    Indexed(Indexed, Codec),
    /// A document the stream does not decide (see `StreamIndex`, `ShapeStream`): read it
    /// whole and `open` it.
    ReadWhole,
}

impl Default for StreamOpen {
    fn default() -> StreamOpen {
        StreamOpen { shape: ShapeStream::default(), index: StreamIndex::new(Keys::Sanitized), failed: false }
    }
}

impl StreamOpen {
    /// The next bytes of a document whose first non-whitespace byte is `{` (the caller
    /// reads any other whole).
    pub fn feed(&mut self, piece: &[u8], poll: &mut dyn FnMut()) {
        self.shape.feed(piece);
        if !self.failed && !self.index.gave_up() {
            self.failed = self.index.feed(piece, poll).is_err();
        }
    }

    /// After the last byte: `open`'s and `index`'s answer for a chat of this user, in
    /// their order (the shape first, then the index).
    pub fn finish(self, user_id: Option<&str>, max_depth: usize, poll: &mut dyn FnMut()) -> Result<StreamOpened, AppSkip> {
        if user_id.is_none() {
            return Err(AppSkip::NoUser);
        }
        let Some((shape, nul_text)) = self.shape.finish() else { return Ok(StreamOpened::ReadWhole) };
        let codec = codec_of(shape, nul_text, max_depth)?;
        if self.failed {
            return Err(AppSkip::NotObject);
        }
        match self.index.finish(poll).map_err(|_| AppSkip::NotObject)? {
            Streamed::Indexed(found, current_id) => Ok(StreamOpened::Indexed(indexed(found, current_id)?, codec)),
            Streamed::RepeatedKeys { .. } | Streamed::ReadWhole(_) => Ok(StreamOpened::ReadWhole),
        }
    }
}

/// The read path's repair check over a chat given a message at a time (`check` for a
/// chat read in pieces): what it needs of each message is kept (`Facts`: about 18 bytes a
/// message, its key and a string parentId's text).
#[derive(Default)]
pub struct RepairCheck {
    facts: Facts,
}

impl RepairCheck {
    /// The message at `span` of `text` (a piece of the document holding it, the span
    /// shifted into the piece); messages in the document's order.
    pub fn add(&mut self, text: &str, span: Span) {
        self.facts.push(text, span);
    }

    /// Whether the app's read path loads the chat, given its `currentId`'s raw JSON.
    pub fn finish(self, current_id: Option<&str>, poll: &mut dyn FnMut()) -> Result<(), AppSkip> {
        repair(&self.facts, current_id, poll)
    }
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
/// raise). Reads the messages again rather than keeping what it read: memory stays at
/// what the repair needs of each message (`RepairCheck`).
pub fn check(doc: &str, indexed: &Indexed, poll: &mut dyn FnMut()) -> Result<(), AppSkip> {
    let mut repair = RepairCheck::default();
    for (n, &span) in indexed.spans.iter().enumerate() {
        if n % 1024 == 0 {
            poll();
        }
        repair.add(doc, span);
    }
    repair.finish(indexed.current_id.clone().map(|r| &doc[r]), poll)
}

/// One entry of `history.messages` the app's way, read from the document on its own.
pub fn entry_at(doc: &str, span: Span, now: i64, server: Server, codec: Codec) -> AppEntry<'_> {
    entry(key_at(doc, span), span.value(doc), fields_at(doc, span), now, server, codec)
}
