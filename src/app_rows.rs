//! `rows => 'app'`: the rows Open WebUI 0.12.4 itself writes the first time a chat without
//! rows is opened (`Chats.get_messages_map_by_chat_id` -> `backfill_messages_by_chat_id`
//! -> `ChatMessages.upsert_messages` -> `_build_message`, `get_usage`, `normalize_usage`),
//! read path included, on the raw JSON text.
//!
//! How the app gets there, and what each step means here:
//! - it loads the chat through its model: the column is parsed with orjson (falling back
//!   to the standard library, which refuses integer literals longer than 100 characters),
//!   must be a JSON object (a double-encoded chat is a string: no rows), and the chat's
//!   `user_id` must be set; a failure there makes the app return nothing, so no rows;
//! - `sanitize_data_for_db` removes NUL characters and lone surrogates from every string
//!   and key of the document;
//! - `chat.history.messages` must be an object (a non-object history raises; falsy
//!   messages mean none);
//! - the rows go out in one `INSERT ... ON CONFLICT DO NOTHING` through psycopg 3 with
//!   SQLAlchemy's type casts (`::VARCHAR`, `::BIGINT`, `::BOOLEAN`, `::JSON`): a value
//!   either side cannot convert fails the whole chat. So a chat is all or nothing here too.
//!
//! JSON columns keep the message's own text where its value survives the trip unchanged
//! (the app re-serializes, so its text differs but its value does not); strings holding
//! NULs or lone surrogates are rewritten without them, and floats beyond f64's range
//! become `null`, as orjson writes infinities.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::expand::{find_messages_and_current, message_fields, read_fields, Found, Keys, Span};
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

/// The sanitized key of a message, as the app's dict holds it.
fn key_at(doc: &str, span: Span) -> Cow<'_, str> {
    sanitized(decode_string(span.key(doc)))
}

/// The fields of a message the app reads; `None` if it is not an object.
fn fields_at(doc: &str, span: Span) -> Option<Fields<'_>> {
    let raw = span.value(doc);
    (kind(raw) == Kind::Object).then(|| read_fields::<Fields>(raw)).flatten()
}

/// Looks messages up by sanitized key as the app's dict does: a key's last message wins.
struct Lookup<'a> {
    doc: &'a str,
    spans: &'a [Span],
    /// (hash of the key, message number), sorted; built only when the leaf search needs it.
    by_hash: Vec<(u64, u32)>,
}

impl<'a> Lookup<'a> {
    fn new(doc: &'a str, spans: &'a [Span], poll: &mut dyn FnMut()) -> Lookup<'a> {
        let mut by_hash = Vec::with_capacity(spans.len());
        for (n, &span) in spans.iter().enumerate() {
            if n % 1024 == 0 {
                poll();
            }
            by_hash.push((key_hash(&key_at(doc, span)), n as u32));
        }
        by_hash.sort_unstable();
        Lookup { doc, spans, by_hash }
    }

    /// The message the app's dict holds under `key`, if it is an object (`dict_at`).
    fn dict_at(&self, key: &str) -> Option<usize> {
        let h = key_hash(key);
        let from = self.by_hash.partition_point(|&(k, _)| k < h);
        // Hashes equal: the key itself decides; the last message with it wins.
        let to = from + self.by_hash[from..].partition_point(|&(k, _)| k == h);
        let last = self.by_hash[from..to]
            .iter()
            .rev()
            .map(|&(_, n)| n as usize)
            .find(|&n| key_at(self.doc, self.spans[n]) == key)?;
        fields_at(self.doc, self.spans[last]).is_some().then_some(last)
    }
}

/// The last message whose sanitized key is `key`, if it is an object: one pass, no index.
fn scan_dict_at(doc: &str, spans: &[Span], key: &str, poll: &mut dyn FnMut()) -> Option<usize> {
    let mut last = None;
    for (n, &span) in spans.iter().enumerate() {
        if n % 1024 == 0 {
            poll();
        }
        if key_at(doc, span) == key {
            last = Some(n);
        }
    }
    last.filter(|&n| fields_at(doc, spans[n]).is_some())
}

fn key_hash(key: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// A value as Python's `>` sees it in the repair's leaf search.
enum Ordered {
    Number(f64),
    Text(String),
    List,
    Unordered,
}

impl Ordered {
    fn of(raw: &str) -> Ordered {
        match kind(raw) {
            Kind::True => Ordered::Number(1.0),
            Kind::False | Kind::Null => Ordered::Number(0.0),
            Kind::Number => Ordered::Number(raw.parse().unwrap_or(f64::NAN)),
            Kind::String => Ordered::Text(decode_string(raw).sanitized().into_owned()),
            Kind::Array => Ordered::List,
            Kind::Object => Ordered::Unordered,
        }
    }

    /// `self > other`, or `None` where Python raises TypeError. Lists compare element by
    /// element in Python; here two lists never replace each other (an approximation for a
    /// list-valued timestamp, which no client writes).
    fn greater(&self, other: &Ordered) -> Option<bool> {
        match (self, other) {
            (Ordered::Number(a), Ordered::Number(b)) => Some(a > b),
            (Ordered::Text(a), Ordered::Text(b)) => Some(a > b),
            (Ordered::List, Ordered::List) => Some(false),
            _ => None,
        }
    }
}

/// `ChatTable._repair_chat_current_id`, run by the app on every chat it loads, as far as
/// whether it raises: links each message to its parent (a `parentId` that is a list or
/// object cannot be a dict key), looks up `currentId` (the same), reads the current
/// message's `output` (a number is not iterable) and, when there is no usable current
/// message, picks the latest leaf by comparing timestamps (a string and a number do not
/// compare). What it changes (`childrenIds`, `currentId`) is never written to a row.
/// Each message's fields are read again where a step needs them, so nothing per message
/// is kept but the leaf search's index.
fn repair(doc: &str, spans: &[Span], current_id: Option<&str>, poll: &mut dyn FnMut()) -> Result<(), AppSkip> {
    fn parent_of<'a>(f: &Fields<'a>) -> Option<&'a str> {
        f.parent_id_camel.filter(|p| truthy(p))
    }
    for (n, &span) in spans.iter().enumerate() {
        if n % 1024 == 0 {
            poll();
        }
        let fields = fields_at(doc, span);
        if fields.as_ref().and_then(parent_of).is_some_and(|p| matches!(kind(p), Kind::Array | Kind::Object)) {
            return Err(AppSkip::RepairFails);
        }
    }
    let current = match current_id {
        Some(id) if matches!(kind(id), Kind::Array | Kind::Object) => return Err(AppSkip::RepairFails),
        Some(id) if kind(id) == Kind::String => scan_dict_at(doc, spans, &decode_string(id).sanitized(), poll),
        _ => None,
    };
    if let Some(current) = current.and_then(|n| fields_at(doc, spans[n])) {
        let output = current.output.filter(|o| truthy(o));
        let output_role = match output.map(kind) {
            Some(Kind::Number | Kind::True) => return Err(AppSkip::RepairFails),
            Some(Kind::Array) => elements(output.unwrap_or("[]")).into_iter().find_map(|item| {
                (kind(item) == Kind::Object).then(|| member(item, "role").filter(|r| truthy(r))).flatten()
            }),
            _ => None,
        };
        let bad_leaf = output_role.is_some_and(|r| kind(r) == Kind::String && decode_string(r).sanitized() == "assistant")
            && current.parent_id_camel.map_or(true, |p| kind(p) == Kind::Null)
            && !current.timestamp.is_some_and(truthy)
            && spans.len() > 1;
        if current.id.is_some_and(truthy) && current.role.is_some_and(truthy) && !bad_leaf {
            return Ok(());
        }
    }
    // The latest leaf: a message no other message names as its parent.
    let lookup = Lookup::new(doc, spans, poll);
    let mut has_child = vec![false; spans.len()];
    for (n, &span) in spans.iter().enumerate() {
        if n % 1024 == 0 {
            poll();
        }
        let Some(parent) = fields_at(doc, span).as_ref().and_then(parent_of) else { continue };
        if kind(parent) == Kind::String {
            if let Some(p) = lookup.dict_at(&decode_string(parent).sanitized()) {
                has_child[p] = true;
            }
        }
    }
    drop(lookup);
    let mut latest = Ordered::Number(-1.0);
    for (n, &span) in spans.iter().enumerate() {
        if n % 1024 == 0 {
            poll();
        }
        let Some(f) = fields_at(doc, span).filter(|f| f.role.is_some_and(truthy)) else { continue };
        let listed_children = f.children_ids.is_some_and(|c| kind(c) == Kind::Array && truthy(c));
        if listed_children || has_child[n] {
            continue;
        }
        let timestamp = f.timestamp.filter(|t| truthy(t)).map_or(Ordered::Number(0.0), Ordered::of);
        match timestamp.greater(&latest) {
            None => return Err(AppSkip::RepairFails),
            Some(true) => latest = timestamp,
            Some(false) => {}
        }
    }
    Ok(())
}

/// An array's elements as raw JSON.
fn elements(array: &str) -> Vec<&str> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<&'de str>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(item) = seq.next_element::<&'de RawValue>()? {
                out.push(item.get());
            }
            Ok(out)
        }
    }
    serde_json::Deserializer::from_str(array).deserialize_seq(V).unwrap_or_default()
}

/// The deepest nesting and the longest integer literal of a JSON text, in one linear
/// pass (no recursion).
struct Shape {
    depth: usize,
    longest_integer: usize,
    /// A number beyond double range (orjson refuses it).
    overflow: bool,
    /// A string with a lone surrogate escape (orjson refuses it).
    lone_surrogate: bool,
    /// A string with a NUL or surrogate escape, which the sanitizer may rewrite.
    rewritten_strings: bool,
    /// An integer literal outside [-2^63, 2^64-1].
    wide_integer: bool,
}

fn scan(doc: &str) -> Shape {
    let (mut longest, mut overflow, mut lone_surrogate, mut rewritten_strings, mut wide_integer) = (0, false, false, false, false);
    let depth = walk_tokens(doc, |token, range| match token {
        Token::String if !lone_surrogate && needs_sanitizing(&doc[range.clone()]) => {
            rewritten_strings = true;
            lone_surrogate = matches!(decode_string(&doc[range]).storable(), Err(scalar::Unstorable::UnpairedSurrogate));
        }
        Token::String => {}
        Token::Number => {
            let text = &doc[range];
            if is_integer(text) {
                longest = longest.max(text.len());
                wide_integer = wide_integer || !fits_64_bits(text);
            }
            overflow = overflow || text.parse::<f64>().map_or(false, f64::is_infinite);
        }
    });
    Shape { depth, longest_integer: longest, overflow, lone_surrogate, rewritten_strings, wide_integer }
}

/// The tokens of a JSON text that the app's codec may treat differently.
enum Token {
    String,
    Number,
}

/// Walks a JSON text once, linearly (no recursion), handing each string (keys included)
/// and number token's byte range to `each`; returns the deepest nesting of arrays and
/// objects.
fn walk_tokens(text: &str, mut each: impl FnMut(Token, Range<usize>)) -> usize {
    let bytes = text.as_bytes();
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                let end = string_end(bytes, i);
                each(Token::String, i..end);
                i = end;
            }
            b'-' | b'0'..=b'9' => {
                let end = number_end(bytes, i);
                each(Token::Number, i..end);
                i = end;
            }
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
                i += 1;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            _ => i += 1,
        }
    }
    deepest
}

/// The index just past the string token starting at `start` (its opening quote).
fn string_end(bytes: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    bytes.len()
}

fn number_end(bytes: &[u8], start: usize) -> usize {
    let mut i = start;
    while i < bytes.len() && matches!(bytes[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
        i += 1;
    }
    i
}

/// A JSON value as the app stores it in a `json` column: strings (and keys) without NUL
/// characters or lone surrogates; with orjson, integers outside [-2^63, 2^64-1] as the
/// floats it reads them as; with the fallback codec, numbers beyond double range as
/// `null` (orjson writes infinity so), unless orjson cannot write the value (an integer
/// over 64 bits, or nesting over 255 levels) and the standard library writes `Infinity`,
/// which `json` refuses: then `Err`. Borrowed when nothing changes, which is nearly always.
pub fn json_value(raw: &str, codec: Codec) -> Result<Cow<'_, str>, ()> {
    if codec.plain {
        return Ok(Cow::Borrowed(raw));
    }
    let mut out: Option<String> = None;
    let mut copied = 0;
    let (mut infinite, mut wide) = (false, false);
    let deepest = walk_tokens(raw, |token, range| {
        let text = &raw[range.clone()];
        let replacement = match token {
            Token::String if needs_sanitizing(text) => {
                Some(serde_json::Value::String(decode_string(text).sanitized().into_owned()).to_string())
            }
            Token::String => None,
            Token::Number if text.parse::<f64>().map_or(false, f64::is_infinite) => {
                infinite = true;
                Some("null".to_owned())
            }
            Token::Number if is_integer(text) && !fits_64_bits(text) => {
                wide = true;
                (!codec.exact_ints).then(|| format!("{:e}", text.parse::<f64>().unwrap_or_default()))
            }
            Token::Number => None,
        };
        if let Some(r) = replacement {
            let o = out.get_or_insert_with(|| String::with_capacity(raw.len()));
            o.push_str(&raw[copied..range.start]);
            o.push_str(&r);
            copied = range.end;
        }
    });
    if infinite && (wide || deepest > 255) {
        return Err(());
    }
    Ok(match out {
        None => Cow::Borrowed(raw),
        Some(mut o) => {
            o.push_str(&raw[copied..]);
            Cow::Owned(o)
        }
    })
}

/// An integer literal orjson reads as an integer: within [-2^63, 2^64-1].
fn fits_64_bits(token: &str) -> bool {
    token.len() <= 21 && token.parse::<i128>().is_ok_and(|v| (-(1i128 << 63)..=(1i128 << 64) - 1).contains(&v))
}

/// A string token holding `\u0000` or a surrogate escape (paired ones are rewritten as
/// the character, harmlessly).
fn needs_sanitizing(token: &str) -> bool {
    let b = token.as_bytes();
    let mut i = 0;
    while let Some(p) = b[i..].windows(2).position(|w| w == b"\\u") {
        let at = i + p;
        if at > 0 && preceded_by_odd_backslashes(b, at) {
            i = at + 1;
            continue;
        }
        let hex = &b[at + 2..(at + 6).min(b.len())];
        if hex == b"0000" || (hex.first().map_or(false, |&c| c == b'd' || c == b'D')
            && hex.get(1).map_or(false, |&c| matches!(c, b'8'..=b'9' | b'a'..=b'f' | b'A'..=b'F')))
        {
            return true;
        }
        i = at + 2;
    }
    false
}

/// Whether the backslash at `at` is itself escaped (an odd run of backslashes before it).
fn preceded_by_odd_backslashes(b: &[u8], at: usize) -> bool {
    b[..at].iter().rev().take_while(|&&c| c == b'\\').count() % 2 == 1
}

/// Python's truthiness of the sanitized value.
pub fn truthy(raw: &str) -> bool {
    match kind(raw) {
        Kind::String => !decode_string(raw).sanitized().is_empty(),
        _ => scalar::is_truthy(raw),
    }
}

/// Why the app fails on a message (and so on its whole chat).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub column: &'static str,
    pub sqlstate: &'static str,
    pub reason: String,
}

impl Failure {
    fn new(column: &'static str, sqlstate: &'static str, reason: impl Into<String>) -> Failure {
        Failure { column, sqlstate, reason: reason.into() }
    }
}

/// One row as the app builds it, minus the chat's id.
#[derive(Debug, Clone, PartialEq)]
pub struct AppMessage<'a> {
    /// The sanitized key in `history.messages`.
    pub key: Cow<'a, str>,
    /// The message's own `user_id`, where it has a truthy one; else the chat's.
    pub user_id: Option<Cow<'a, str>>,
    pub role: Cow<'a, str>,
    pub parent_id: Option<Cow<'a, str>>,
    pub model_id: Option<Cow<'a, str>>,
    pub context_summary: Option<Cow<'a, str>>,
    pub content: Cow<'a, str>,
    pub output: Cow<'a, str>,
    pub files: Cow<'a, str>,
    pub sources: Cow<'a, str>,
    pub embeds: Cow<'a, str>,
    pub meta: Cow<'a, str>,
    pub status_history: Cow<'a, str>,
    pub error: Cow<'a, str>,
    pub usage: Cow<'a, str>,
    pub done: Option<bool>,
    pub created_at: i64,
}

/// What became of one entry of `history.messages`.
#[derive(Debug, Clone, PartialEq)]
pub enum AppEntry<'a> {
    Row(AppMessage<'a>),
    /// Not written by the app (not an object, or no truthy role): not an error.
    Skipped { key: String, reason: &'static str },
    /// The app fails on it: its chat gets no rows.
    Failed { key: String, failure: Failure, raw: &'a str },
}

impl AppEntry<'_> {
    pub fn key(&self) -> &str {
        match self {
            AppEntry::Row(m) => &m.key,
            AppEntry::Skipped { key, .. } | AppEntry::Failed { key, .. } => key,
        }
    }
}

/// How PostgreSQL converts text to bigint where the major matters (16 added
/// underscores and 0x/0o/0b prefixes to int8in).
#[derive(Debug, Clone, Copy)]
pub struct Server {
    pub major: u32,
}

/// One entry the app's way, from its sanitized key, its JSON and its fields (`None`: not
/// an object).
fn entry<'a>(key: Cow<'a, str>, raw: &'a str, fields: Option<Fields<'a>>, now: i64, server: Server, codec: Codec) -> AppEntry<'a> {
    let Some(fields) = fields else {
        return AppEntry::Skipped { key: key.into_owned(), reason: "skipped: the message is not a JSON object" };
    };
    let Some(role) = fields.role.filter(|r| truthy(r)) else {
        return AppEntry::Skipped {
            key: key.into_owned(),
            reason: "skipped: the message has no role (missing, null or empty)",
        };
    };
    match build(&fields, role, now, server, codec) {
        Ok(mut m) => {
            m.key = key;
            AppEntry::Row(m)
        }
        Err(failure) => AppEntry::Failed { key: key.into_owned(), failure, raw },
    }
}

/// The decoded string without NULs or lone surrogates, borrowed where it has none.
fn sanitized(d: scalar::Decoded<'_>) -> Cow<'_, str> {
    if d.storable().is_ok() {
        return d.into_storable().unwrap_or_default();
    }
    Cow::Owned(d.sanitized().into_owned())
}

/// `a or b`: `a` if truthy, else `b` as it is (maybe falsy, maybe missing).
fn or<'a>(a: Option<&'a str>, b: Option<&'a str>) -> Option<&'a str> {
    match a {
        Some(v) if truthy(v) => Some(v),
        _ => b,
    }
}

fn build<'a>(f: &Fields<'a>, role: &'a str, now: i64, server: Server, codec: Codec) -> Result<AppMessage<'a>, Failure> {
    let json = |v: Option<&'a str>, column: &'static str| match v {
        None => Ok(Cow::Borrowed("null")),
        Some(v) => json_value(v, codec).map_err(|()| {
            Failure::new(
                column,
                "22P02",
                format!("{column} holds a number beyond double range, which Open WebUI writes as Infinity here, and json refuses that"),
            )
        }),
    };
    let text = |v: &'a str, column: &'static str| text(v, column, codec);
    let user_id = match f.user_id.filter(|u| truthy(u)) {
        Some(u) => text(u, "user_id")?,
        None => None,
    };
    let role = text(role, "role")?.unwrap_or_default();
    let parent_id = or(f.parent_id, f.parent_id_camel).map(|v| text(v, "parent_id")).transpose()?.flatten();
    let model_id = or(f.model_id, f.model).map(|v| text(v, "model_id")).transpose()?.flatten();
    let context_summary =
        or(f.context_summary, f.context_summary_camel).map(|v| text(v, "context_summary")).transpose()?.flatten();
    // None is left out of the INSERT, so done takes the column's default, true.
    let done = match f.done {
        None => Some(true),
        Some(raw) if kind(raw) == Kind::Null => Some(true),
        Some(raw) => scalar::done_column(Some(raw))
            .map_err(|_| Failure::new("done", "22P02", "done is not one of true, false, null, 0, 1 (SQLAlchemy's Boolean raises)"))?,
    };
    let usage = usage(f, codec)?;
    let created_at = match f.timestamp.filter(|t| truthy(t)) {
        None => now,
        Some(t) => bigint(t, server)?,
    };
    Ok(AppMessage {
        key: Cow::Borrowed(""),
        user_id,
        role,
        parent_id,
        model_id,
        context_summary,
        content: json(f.content, "content")?,
        output: json(f.output, "output")?,
        files: json(f.files, "files")?,
        sources: json(f.sources, "sources")?,
        embeds: json(f.embeds, "embeds")?,
        meta: json(f.meta, "meta")?,
        status_history: json(or(f.status_history, f.status_history_camel), "status_history")?,
        error: json(f.error, "error")?,
        usage: usage.map_or(Cow::Borrowed("null"), Cow::Owned),
        done,
        created_at,
    })
}

/// The text a `text` column gets through psycopg 3 and `::VARCHAR`; `None` is NULL.
fn text<'a>(raw: &'a str, column: &'static str, codec: Codec) -> Result<Option<Cow<'a, str>>, Failure> {
    Ok(Some(match kind(raw) {
        Kind::Null => return Ok(None),
        Kind::True => Cow::Borrowed("true"),
        Kind::False => Cow::Borrowed("false"),
        Kind::String => sanitized(decode_string(raw)),
        Kind::Number if is_integer(raw) && (codec.exact_ints || fits_64_bits(raw)) => Cow::Owned(integer_text(raw)),
        Kind::Number => Cow::Owned(float8_text(raw.parse::<f64>().unwrap_or(f64::NAN))),
        Kind::Object => {
            return Err(Failure::new(column, "22023", format!("{column} is a JSON object: psycopg cannot adapt a dict")))
        }
        // psycopg sends a list as an array, which `::VARCHAR` prints as array_out does.
        Kind::Array => match scalar::text_column(raw) {
            Ok(t) => t.unwrap_or_default(),
            Err(problem) => return Err(Failure::new(column, "22023", format!("{column} {}", problem.describe()))),
        },
    }))
}

fn is_integer(raw: &str) -> bool {
    !raw.bytes().any(|b| matches!(b, b'.' | b'e' | b'E'))
}

/// A Python int's digits from a JSON integer literal (`-0` is `0`).
fn integer_text(raw: &str) -> String {
    if raw.trim_start_matches('-').bytes().all(|b| b == b'0') {
        "0".into()
    } else {
        raw.to_owned()
    }
}

/// PostgreSQL's float8out at the default extra_float_digits (shortest exact digits;
/// fixed notation for decimal exponents -4..15, else `d.ddde+XX`).
pub fn float8_text(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0".into() } else { "0".into() };
    }
    // `{:e}` is the shortest round-trip digits: "1.5e-5", "-1e20".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..15).contains(&exp) {
        let point = exp + 1;
        let s = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        format!("{sign}{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

/// `created_at` through `::BIGINT`: an int as is, a float rounded (float8 -> int8), a
/// string through int8in; anything else fails.
fn bigint(raw: &str, server: Server) -> Result<i64, Failure> {
    let out_of_range = || Failure::new("created_at", "22003", "timestamp is out of range for type bigint");
    match kind(raw) {
        Kind::Number if is_integer(raw) => raw.parse::<i64>().map_err(|_| out_of_range()),
        Kind::Number => {
            let f: f64 = raw.parse().unwrap_or(f64::NAN);
            let r = f.round_ties_even();
            // float8 -> int8 refuses NaN and anything outside [-2^63, 2^63).
            if r.is_nan() || r < -9_223_372_036_854_775_808.0 || r >= 9_223_372_036_854_775_808.0 {
                return Err(out_of_range());
            }
            Ok(r as i64)
        }
        Kind::String => {
            let d = decode_string(raw);
            let s = d.sanitized();
            int8_in(&s, server.major).ok_or_else(|| {
                Failure::new("created_at", "22P02", format!("timestamp {} is not an integer (invalid input syntax for type bigint)", shown(&s)))
            })
        }
        Kind::True | Kind::False => {
            Err(Failure::new("created_at", "42846", "timestamp is a boolean, which cannot be cast to bigint"))
        }
        _ => Err(Failure::new("created_at", "22023", "timestamp is a list or an object, which the app cannot store")),
    }
}

/// A value quoted for an error message, cut at 80 characters (the message's JSON is in
/// the rejection anyway).
fn shown(s: &str) -> String {
    match s.char_indices().nth(80) {
        None => format!("{s:?}"),
        Some((at, _)) => format!("{:?}... ({} characters)", &s[..at], s.chars().count()),
    }
}

/// PostgreSQL's int8in: surrounding whitespace, a sign, decimal digits; from 16 on also
/// underscores between digits and 0x / 0o / 0b prefixes.
pub fn int8_in(s: &str, major: u32) -> Option<i64> {
    let ws = |c: char| matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c');
    let t = s.trim_matches(ws);
    let (neg, body) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if major >= 16 {
        match body.get(..2) {
            Some("0x" | "0X") => (16, &body[2..]),
            Some("0o" | "0O") => (8, &body[2..]),
            Some("0b" | "0B") => (2, &body[2..]),
            _ => (10, body),
        }
    } else {
        (10, body)
    };
    if digits.is_empty() {
        return None;
    }
    let mut value: i128 = 0;
    let mut prev_digit = false;
    for (n, c) in digits.chars().enumerate() {
        if c == '_' && major >= 16 {
            // Only between digits (after a prefix, a leading underscore is allowed: "0x_1").
            let next_is_digit = digits[n + 1..].chars().next().map_or(false, |d| d.is_digit(radix));
            if !(prev_digit || (n == 0 && radix != 10)) || !next_is_digit {
                return None;
            }
            prev_digit = false;
            continue;
        }
        let d = c.to_digit(radix)? as i128;
        value = value * radix as i128 + d;
        if value > i64::MAX as i128 + 1 {
            return None;
        }
        prev_digit = true;
    }
    let value = if neg { -value } else { value };
    i64::try_from(value).ok()
}

/// `get_usage`: `usage`, else `info.usage`, through `normalize_usage`; `None` when falsy.
fn usage(f: &Fields<'_>, codec: Codec) -> Result<Option<String>, Failure> {
    let fail = |why: &str| Failure::new("usage", "22023", why.to_owned());
    let usage = match f.usage.filter(|u| truthy(u)) {
        Some(u) => Some(u),
        None => match f.info.filter(|i| truthy(i)) {
            None => None,
            Some(info) if kind(info) == Kind::Object => member(info, "usage").filter(|u| truthy(u)),
            Some(_) => return Err(fail("info is not an object, and the app reads info.usage (AttributeError)")),
        },
    };
    let Some(usage) = usage else { return Ok(None) };
    if kind(usage) != Kind::Object {
        return Err(fail("usage is not an object, and normalize_usage calls .get on it (AttributeError)"));
    }
    normalize_usage(usage, codec).map(Some).map_err(|why| fail(&why))
}

/// The value of `name` in an object (last duplicate wins, keys compared sanitized).
fn member<'a>(object: &'a str, name: &str) -> Option<&'a str> {
    members(object).into_iter().rev().find(|(k, _)| Keys::Sanitized.of(k).as_ref() == name.as_bytes()).map(|(_, v)| v)
}

/// An object's members in order: (key token, value text).
fn members(object: &str) -> Vec<(&str, &str)> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<(&'de str, &'de str)>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(k) = map.next_key::<&'de RawValue>()? {
                out.push((k.get(), map.next_value::<&'de RawValue>()?.get()));
            }
            Ok(out)
        }
    }
    serde_json::Deserializer::from_str(object).deserialize_map(V).unwrap_or_default()
}

/// A Python value, as far as `normalize_usage`'s arithmetic needs it.
#[derive(Debug, Clone, PartialEq)]
enum Py {
    None,
    Int(Int),
    Float(f64),
    Str(String),
    /// A list or dict: only its kind and truthiness matter (`+` of two lists is a list).
    List(bool),
    Dict(bool),
}

impl Py {
    fn from_raw(raw: Option<&str>, codec: Codec) -> Py {
        let Some(raw) = raw else { return Py::None };
        match kind(raw) {
            Kind::Null => Py::None,
            Kind::True => Py::Int(Int::from(1)),
            Kind::False => Py::Int(Int::from(0)),
            Kind::Number if is_integer(raw) && (codec.exact_ints || fits_64_bits(raw)) => {
                Py::Int(Int::parse(raw).unwrap_or_default())
            }
            Kind::Number => Py::Float(raw.parse().unwrap_or(f64::NAN)),
            Kind::String => Py::Str(decode_string(raw).sanitized().into_owned()),
            Kind::Array => Py::List(truthy(raw)),
            Kind::Object => Py::Dict(truthy(raw)),
        }
    }

    fn truthy(&self) -> bool {
        match self {
            Py::None => false,
            Py::Int(i) => !i.is_zero(),
            Py::Float(f) => *f != 0.0,
            Py::Str(s) => !s.is_empty(),
            Py::List(t) | Py::Dict(t) => *t,
        }
    }

    /// `a or b`.
    fn or(self, other: Py) -> Py {
        if self.truthy() {
            self
        } else {
            other
        }
    }

    /// Python's `int(x)`.
    fn int(&self) -> Result<Int, String> {
        match self {
            Py::Int(i) => Ok(i.clone()),
            Py::Float(f) if f.is_finite() => Ok(Int::parse(&format!("{:.0}", f.trunc())).unwrap_or_default()),
            Py::Float(_) => Err("a token count is infinite (int() raises)".into()),
            Py::Str(s) => python_int(s).ok_or_else(|| format!("a token count {} is not an integer (int() raises)", shown(s))),
            Py::None | Py::List(_) | Py::Dict(_) => Err("a token count is not a number (int() raises)".into()),
        }
    }

    /// Python's `a + b`.
    fn add(&self, other: &Py) -> Result<Py, String> {
        match (self, other) {
            (Py::Int(a), Py::Int(b)) => Ok(Py::Int(a.add(b))),
            (Py::Int(a), Py::Float(b)) => Ok(Py::Float(a.to_f64() + b)),
            (Py::Float(a), Py::Int(b)) => Ok(Py::Float(a + b.to_f64())),
            (Py::Float(a), Py::Float(b)) => Ok(Py::Float(a + b)),
            (Py::Str(a), Py::Str(b)) => Ok(Py::Str(format!("{a}{b}"))),
            (Py::List(a), Py::List(b)) => Ok(Py::List(*a || *b)),
            _ => Err("input and output token counts cannot be added (TypeError)".into()),
        }
    }
}

/// Python's `int(str)`: surrounding whitespace, a sign, decimal digits with single
/// underscores between them (ASCII digits only here).
fn python_int(s: &str) -> Option<Int> {
    let t = s.trim();
    let (sign, body) = match t.as_bytes().first() {
        Some(b'-') => ("-", &t[1..]),
        Some(b'+') => ("", &t[1..]),
        _ => ("", t),
    };
    if body.is_empty() || body.starts_with('_') || body.ends_with('_') || body.contains("__") {
        return None;
    }
    let digits: String = body.chars().filter(|&c| c != '_').collect();
    if !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 4300 {
        return None;
    }
    Int::parse(&format!("{sign}{digits}"))
}

/// An integer of any size (JSON integer literals reach 100 characters here), kept as a
/// sign and decimal digits: only addition is needed.
#[derive(Debug, Clone, PartialEq, Default)]
struct Int {
    negative: bool,
    /// Decimal digits, most significant first, no leading zeros ("" is zero).
    digits: String,
}

impl From<i64> for Int {
    fn from(v: i64) -> Int {
        Int::parse(&v.to_string()).unwrap_or_default()
    }
}

impl Int {
    fn parse(s: &str) -> Option<Int> {
        let (negative, digits) = s.strip_prefix('-').map_or((false, s), |d| (true, d));
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits = digits.trim_start_matches('0').to_owned();
        Some(Int { negative: negative && !digits.is_empty(), digits })
    }

    fn is_zero(&self) -> bool {
        self.digits.is_empty()
    }

    fn to_f64(&self) -> f64 {
        format!("{}{}", if self.negative { "-" } else { "" }, if self.is_zero() { "0" } else { &self.digits })
            .parse()
            .unwrap_or(f64::NAN)
    }

    fn add(&self, other: &Int) -> Int {
        if self.negative == other.negative {
            return Int { negative: self.negative, digits: add_digits(&self.digits, &other.digits) };
        }
        // Different signs: subtract the smaller magnitude from the larger.
        let (big, small, negative) = match cmp_digits(&self.digits, &other.digits) {
            std::cmp::Ordering::Less => (&other.digits, &self.digits, other.negative),
            _ => (&self.digits, &other.digits, self.negative),
        };
        let digits = sub_digits(big, small);
        Int { negative: negative && !digits.is_empty(), digits }
    }

    fn to_json(&self) -> String {
        if self.is_zero() {
            "0".into()
        } else {
            format!("{}{}", if self.negative { "-" } else { "" }, self.digits)
        }
    }
}

fn cmp_digits(a: &str, b: &str) -> std::cmp::Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

fn add_digits(a: &str, b: &str) -> String {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut out = Vec::with_capacity(a.len().max(b.len()) + 1);
    let (mut i, mut j, mut carry) = (a.len(), b.len(), 0u8);
    while i > 0 || j > 0 || carry > 0 {
        let x = if i > 0 { i -= 1; a[i] - b'0' } else { 0 };
        let y = if j > 0 { j -= 1; b[j] - b'0' } else { 0 };
        let s = x + y + carry;
        out.push(b'0' + s % 10);
        carry = s / 10;
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default().trim_start_matches('0').to_owned()
}

/// `a - b` for magnitudes with `a >= b`.
fn sub_digits(a: &str, b: &str) -> String {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut out = Vec::with_capacity(a.len());
    let (mut i, mut j, mut borrow) = (a.len(), b.len(), 0i8);
    while i > 0 {
        i -= 1;
        let x = (a[i] - b'0') as i8 - borrow;
        let y = if j > 0 { j -= 1; (b[j] - b'0') as i8 } else { 0 };
        let (d, br) = if x < y { (x + 10 - y, 1) } else { (x - y, 0) };
        out.push(b'0' + d as u8);
        borrow = br;
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default().trim_start_matches('0').to_owned()
}

/// `open_webui.utils.response.normalize_usage` on a usage object: its members plus
/// `input_tokens`, `output_tokens` and `total_tokens` as ints, or why the app raises.
fn normalize_usage(usage: &str, codec: Codec) -> Result<String, String> {
    let get = |name: &str| Py::from_raw(member(usage, name), codec);
    let chain = get("input_tokens").or(get("prompt_tokens")).or(get("prompt_eval_count"));
    let input = if chain == Py::None {
        let prompt_n = get("prompt_n").or(Py::Int(Int::from(0))).int()?;
        let cache_n = get("cache_n").or(Py::Int(Int::from(0))).int()?;
        Py::Int(prompt_n.add(&cache_n))
    } else {
        chain
    };
    let output = get("output_tokens")
        .or(get("completion_tokens"))
        .or(get("eval_count"))
        .or(get("predicted_n"))
        .or(Py::Int(Int::from(0)));
    let total = match get("total_tokens") {
        t if t.truthy() => t,
        _ => input.add(&output)?,
    };
    let (input, output, total) = (input.int()?, output.int()?, total.int()?);
    let added = [("input_tokens", input), ("output_tokens", output), ("total_tokens", total)];
    // dict(usage): one entry per sanitized key, first position, last value.
    let mut entries: Vec<(Vec<u8>, String, String)> = Vec::new();
    for (k, v) in members(usage) {
        let name = Keys::Sanitized.of(k).into_owned();
        let value = json_value(v, codec).map_err(|()| "usage holds a number beyond double range".to_owned())?.into_owned();
        match entries.iter_mut().find(|(n, _, _)| *n == name) {
            Some(e) => e.2 = value,
            None => {
                let key = serde_json::Value::String(String::from_utf8_lossy(&name).into_owned()).to_string();
                entries.push((name, key, value));
            }
        }
    }
    for (name, value) in &added {
        match entries.iter_mut().find(|(n, _, _)| n == name.as_bytes()) {
            Some(e) => e.2 = value.to_json(),
            None => entries.push((name.as_bytes().to_vec(), format!("\"{name}\""), value.to_json())),
        }
    }
    let body: Vec<String> = entries.into_iter().map(|(_, k, v)| format!("{k}:{v}")).collect();
    Ok(format!("{{{}}}", body.join(",")))
}

message_fields!(
    /// The message fields the app reads (last duplicate wins, keys compared sanitized).
    Fields, Keys::Sanitized, {
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


#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_760_000_000;
    const PG15: Server = Server { major: 15 };

    fn one(message: &str) -> AppEntry<'static> {
        // A current message with an id: the app's currentId repair then looks no further.
        let message = match message.strip_prefix('{') {
            Some(rest) => format!(r#"{{"id":"m",{rest}"#),
            None => message.to_owned(),
        };
        let doc = format!(r#"{{"history":{{"currentId":"m","messages":{{"m":{message}}}}}}}"#);
        let doc: &'static str = Box::leak(doc.into_boxed_str());
        let opened = open(Some(doc), Some("u"), APP_MAX_DEPTH).unwrap();
        let indexed = index(opened.doc, &mut || {}).unwrap();
        expand(opened.doc, &indexed, NOW, PG15, opened.codec, &mut || {}).unwrap().remove(0)
    }

    fn row(message: &str) -> AppMessage<'static> {
        match one(message) {
            AppEntry::Row(m) => m,
            other => panic!("expected a row, got {other:?}"),
        }
    }

    fn failure(message: &str) -> Failure {
        match one(message) {
            AppEntry::Failed { failure, .. } => failure,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn the_app_mapping() {
        let m = row(r#"{"role":"assistant","parent_id":"","parentId":"p","model_id":null,"model":"m","user_id":"u2",
            "statusHistory":[1],"contextSummary":"s","meta":{"a":1},"timestamp":1700000000}"#);
        assert_eq!(m.parent_id.as_deref(), Some("p"));
        assert_eq!(m.model_id.as_deref(), Some("m"));
        assert_eq!(m.user_id.as_deref(), Some("u2"));
        assert_eq!(m.status_history, "[1]");
        assert_eq!(m.context_summary.as_deref(), Some("s"));
        assert_eq!(m.meta, r#"{"a":1}"#);
        assert_eq!(m.done, Some(true));
        assert_eq!(m.created_at, 1_700_000_000);
        assert_eq!(m.usage, "null");
        // No range or millisecond normalisation; falsy timestamps are now.
        assert_eq!(row(r#"{"role":"u","timestamp":5}"#).created_at, 5);
        assert_eq!(row(r#"{"role":"u","timestamp":1700000000000}"#).created_at, 1_700_000_000_000);
        assert_eq!(row(r#"{"role":"u","timestamp":0}"#).created_at, NOW);
        assert_eq!(row(r#"{"role":"u","timestamp":" 42 "}"#).created_at, 42);
        assert_eq!(row(r#"{"role":"u","timestamp":2.5}"#).created_at, 2);
        assert_eq!(row(r#"{"role":"u","timestamp":3.5}"#).created_at, 4);
        // A falsy `or` keeps the second value as it is.
        assert_eq!(row(r#"{"role":"u","status_history":[],"statusHistory":""}"#).status_history, r#""""#);
        assert_eq!(row(r#"{"role":"u","done":null}"#).done, Some(true));
    }

    #[test]
    fn what_the_app_raises_on() {
        assert_eq!(failure(r#"{"role":"u","usage":"x"}"#).column, "usage");
        assert_eq!(failure(r#"{"role":"u","usage":[1]}"#).column, "usage");
        assert_eq!(failure(r#"{"role":"u","info":"x"}"#).column, "usage");
        assert_eq!(row(r#"{"role":["a","b c"]}"#).role, r#"{a,"b c"}"#);
        assert_eq!(failure(r#"{"role":"u","done":"true"}"#).column, "done");
        assert_eq!(failure(r#"{"role":"u","timestamp":"1.5"}"#).sqlstate, "22P02");
        assert_eq!(failure(r#"{"role":"u","timestamp":true}"#).column, "created_at");
        assert_eq!(failure(r#"{"role":{"a":1}}"#).column, "role");
        assert_eq!(failure(r#"{"role":"u","timestamp":1e30}"#).sqlstate, "22003");
        // A long value is cut in the message (the message's JSON is recorded whole).
        let long = failure(&format!(r#"{{"role":"u","usage":{{"input_tokens":"{}","output_tokens":"1"}}}}"#, "x".repeat(5000)));
        assert!(long.reason.len() < 200 && long.reason.contains("(5000 characters)"), "{}", long.reason);
        // A falsy info or usage is no usage.
        assert_eq!(row(r#"{"role":"u","usage":{},"info":0}"#).usage, "null");
    }

    fn usage_of(u: &str) -> serde_json::Value {
        let m = row(&format!(r#"{{"role":"u","usage":{u}}}"#));
        serde_json::from_str(&m.usage).unwrap()
    }

    #[test]
    fn normalize_usage_forms() {
        let openai = usage_of(r#"{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}"#);
        assert_eq!((openai["input_tokens"].as_i64(), openai["output_tokens"].as_i64(), openai["total_tokens"].as_i64()), (Some(3), Some(4), Some(7)));
        let ollama = usage_of(r#"{"prompt_eval_count":5,"eval_count":6}"#);
        assert_eq!(ollama["total_tokens"], 11);
        let llama = usage_of(r#"{"prompt_n":2,"cache_n":3,"predicted_n":4}"#);
        assert_eq!((llama["input_tokens"].as_i64(), llama["total_tokens"].as_i64()), (Some(5), Some(9)));
        // Strings add as strings before int(): "12" + "34" is 1234.
        assert_eq!(usage_of(r#"{"input_tokens":"12","output_tokens":"34"}"#)["total_tokens"], 1234);
        assert_eq!(usage_of(r#"{"input_tokens":2.9,"output_tokens":1}"#)["total_tokens"], 3);
        assert_eq!(usage_of(r#"{"input_tokens":true}"#)["input_tokens"], 1);
        // Under info.
        let m = row(r#"{"role":"u","info":{"usage":{"prompt_tokens":1}}}"#);
        assert!(m.usage.contains(r#""input_tokens":1"#));
        assert_eq!(failure(r#"{"role":"u","usage":{"input_tokens":"1","output_tokens":2}}"#).column, "usage");
        assert_eq!(failure(r#"{"role":"u","usage":{"prompt_eval_count":""}}"#).column, "usage");
        // orjson reads an integer beyond 64 bits as a float: int() gives the double's value.
        let big = "9".repeat(60);
        let u = row(&format!(r#"{{"role":"u","usage":{{"input_tokens":{big},"output_tokens":1}}}}"#)).usage;
        assert!(u.contains(r#""total_tokens":999999999999999949387135297074018866963645011013410073083904"#), "{u}");
        // The fallback codec (a lone surrogate elsewhere) keeps it exact.
        let u = row(&format!(r#"{{"role":"u","x":"\udc00","usage":{{"input_tokens":{big},"output_tokens":1}}}}"#)).usage;
        assert!(u.contains(&format!(r#""total_tokens":1{}"#, "0".repeat(60))), "{u}");
    }

    #[test]
    fn sanitizing() {
        const ORJSON: Codec = Codec { exact_ints: false, plain: false };
        const STDLIB: Codec = Codec { exact_ints: true, plain: false };
        assert_eq!(json_value(r#"{"a\u0000b":"x\u0000"}"#, ORJSON).unwrap(), r#"{"ab":"x"}"#);
        assert_eq!(json_value(r#"["\ud800x", "\\u0000"]"#, STDLIB).unwrap(), r#"["x", "\\u0000"]"#);
        assert_eq!(json_value(r#"[1e400, 1.5, 12]"#, STDLIB).unwrap(), r#"[null, 1.5, 12]"#);
        assert!(matches!(json_value(r#"{"a":[1,2,"b"]}"#, ORJSON).unwrap(), Cow::Borrowed(_)));
        // orjson reads an integer beyond 64 bits as a float; the standard library keeps it.
        assert_eq!(json_value("[18446744073709551616]", ORJSON).unwrap(), "[1.8446744073709552e19]");
        assert_eq!(json_value("[18446744073709551616]", STDLIB).unwrap(), "[18446744073709551616]");
        // An infinity the standard library must write (next to a wide integer) is refused.
        assert!(json_value("[1e400, 18446744073709551616]", STDLIB).is_err());
        // Keys and roles are sanitized: a role of NULs is empty, so not written.
        assert!(matches!(one(r#"{"role":"\u0000"}"#), AppEntry::Skipped { .. }));
        assert_eq!(row(r#"{"ro\u0000le":"u\u0000"}"#).role, "u");
    }

    #[test]
    fn chat_level() {
        let verdict = |text: &str, user: Option<&str>| open(Some(text), user, APP_MAX_DEPTH).map(|o| o.codec.exact_ints);
        assert_eq!(verdict("\"{}\"", Some("u")), Err(AppSkip::NotObject));
        assert_eq!(verdict("null", Some("u")), Err(AppSkip::Empty));
        assert_eq!(verdict("{}", None), Err(AppSkip::NoUser));
        // A long integer is a float to orjson; only the fallback codec refuses it.
        let long = format!(r#"{{"a":{}}}"#, "1".repeat(101));
        assert_eq!(verdict(&long, Some("u")), Ok(false));
        let long_and_lone = format!(r#"{{"a":{},"b":"\ud800"}}"#, "1".repeat(101));
        assert_eq!(verdict(&long_and_lone, Some("u")), Err(AppSkip::Unloadable));
        let huge = format!(r#"{{"a":{}}}"#, "1".repeat(400));
        assert_eq!(verdict(&huge, Some("u")), Err(AppSkip::Unloadable));
        assert_eq!(verdict(r#"{"a":1e400}"#, Some("u")), Ok(true));
        let deep = format!(r#"{{"a":{}{}}}"#, "[".repeat(1000), "]".repeat(1000));
        assert_eq!(verdict(&deep, Some("u")), Err(AppSkip::Unloadable));
        // Where the sanitizer walks the document, half as deep.
        let deep = format!(r#"{{"a":{}{},"b":"\u0000"}}"#, "[".repeat(600), "]".repeat(600));
        assert_eq!(verdict(&deep, Some("u")), Err(AppSkip::Unloadable));
        let deep = format!(r#"{{"a":{}{}}}"#, "[".repeat(600), "]".repeat(600));
        assert_eq!(verdict(&deep, Some("u")), Ok(false));
        let all = |doc: &str| {
            let indexed = index(doc, &mut || {})?;
            expand(doc, &indexed, NOW, PG15, Codec { exact_ints: false, plain: true }, &mut || {}).map(|e| e.len())
        };
        assert_eq!(all(r#"{"history":null}"#), Err(AppSkip::HistoryNotObject));
        assert_eq!(all(r#"{"history":{"messages":[1]}}"#), Err(AppSkip::MessagesNotObject));
        assert_eq!(all(r#"{"history":{"messages":[]}}"#), Ok(0));
        assert_eq!(all(r#"{"history":{"messages":null}}"#), Ok(0));
        // The repair of currentId raises on these, so the app loads nothing.
        for doc in [
            r#"{"history":{"messages":{"a":{"role":"u","parentId":["x"]}}}}"#,
            r#"{"history":{"currentId":["a"],"messages":{"a":{"role":"u"}}}}"#,
            r#"{"history":{"currentId":"a","messages":{"a":{"role":"u","output":5}}}}"#,
            r#"{"history":{"messages":{"a":{"role":"u","timestamp":"1"}}}}"#,
            r#"{"history":{"messages":{"a":{"role":"u","timestamp":2},"b":{"role":"u","timestamp":"1"}}}}"#,
        ] {
            assert_eq!(all(doc), Err(AppSkip::RepairFails), "{doc}");
        }
        for doc in [
            // A usable current message: no leaf search.
            r#"{"history":{"currentId":"a","messages":{"a":{"id":"a","role":"u","timestamp":"1"}}}}"#,
            // Not a leaf: its timestamp is never compared.
            r#"{"history":{"messages":{"a":{"role":"u","timestamp":"1"},"b":{"role":"u","parentId":"a"}}}}"#,
        ] {
            assert!(all(doc).is_ok(), "{doc}");
        }
    }

    #[test]
    fn float8_and_int8_text() {
        for (f, s) in [(1.5, "1.5"), (1e20, "1e+20"), (1e-5, "1e-05"), (0.0001, "0.0001"), (1e14, "100000000000000"),
            (1e15, "1e+15"), (-2.5e-7, "-2.5e-07"), (123.456, "123.456")] {
            assert_eq!(float8_text(f), s);
        }
        assert_eq!(int8_in(" -12 ", 15), Some(-12));
        assert_eq!(int8_in("1_000", 15), None);
        assert_eq!(int8_in("1_000", 16), Some(1000));
        assert_eq!(int8_in("0x1F", 16), Some(31));
        assert_eq!(int8_in("9223372036854775808", 16), None);
        assert_eq!(int8_in("-9223372036854775808", 16), Some(i64::MIN));
    }
}
