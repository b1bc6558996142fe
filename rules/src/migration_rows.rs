//! One chat document in, its `chat_message` rows out: Open WebUI 0.12.4's migration
//! 8452d01d26d7, rule for rule, on the raw JSON text.
//!
//! The document is parsed once. Only the three levels the rules look at (the chat, its
//! `history`, each message) are split into entries; every other value stays a slice of
//! the input, so JSON columns keep their original text (big numbers, escapes, key order)
//! and nesting depth costs nothing.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Range;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::scalar::{self, Decoded, Kind, Unstorable};

/// One row of `chat_message`, minus the chat's own id and user id.
#[derive(Debug, Clone, PartialEq)]
pub struct Message<'a> {
    /// The key in `history.messages` (not the message's own `id` field).
    pub key: Cow<'a, str>,
    pub role: Cow<'a, str>,
    pub parent_id: Option<Cow<'a, str>>,
    pub model_id: Option<Cow<'a, str>>,
    pub content: &'a str,
    pub output: &'a str,
    pub files: &'a str,
    pub sources: &'a str,
    pub embeds: &'a str,
    pub done: Option<bool>,
    pub status_history: &'a str,
    pub error: &'a str,
    pub usage: &'a str,
    pub timestamp: i64,
}

impl Message<'_> {
    /// The row's primary key, as the reference builds it.
    pub fn id(&self, chat_id: &str) -> String {
        let mut id = String::with_capacity(chat_id.len() + 1 + self.key.len());
        id.push_str(chat_id);
        id.push('-');
        id.push_str(&self.key);
        id
    }
}

/// Which column of a message could not be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    Key,
    Role,
    ParentId,
    ModelId,
    Done,
}

impl Column {
    pub fn name(self) -> &'static str {
        match self {
            Column::Key => "the message key",
            Column::Role => "role",
            Column::ParentId => "parentId",
            Column::ModelId => "model",
            Column::Done => "done",
        }
    }
}

/// What became of one entry of `history.messages`.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry<'a> {
    Row(Message<'a>),
    /// Left out by the reference's rules (not an object, no role): not an error.
    Skipped { key: String, reason: SkipReason },
    /// A message the reference tries to write and fails on: the rows it would become
    /// cannot be stored. `raw` is the message's JSON.
    Rejected { key: String, column: Column, problem: Unstorable, raw: &'a str },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    NotAnObject,
    NoRole,
}

impl SkipReason {
    pub fn describe(self) -> &'static str {
        match self {
            SkipReason::NotAnObject => "skipped: the message is not a JSON object",
            SkipReason::NoRole => "skipped: the message has no role (missing, null or empty)",
        }
    }
}

impl Entry<'_> {
    /// `(message_key, reason)` for anything that is not a row.
    pub fn problem(&self) -> Option<(String, String)> {
        match self {
            Entry::Row(_) => None,
            Entry::Skipped { key, reason } => Some((key.clone(), reason.describe().to_owned())),
            Entry::Rejected { key, column, problem, .. } => Some((key.clone(), reject_reason(*column, *problem))),
        }
    }
}

pub fn reject_reason(column: Column, problem: Unstorable) -> String {
    format!("cannot be stored: {} {}", column.name(), problem.describe())
}

/// Why a whole chat gives no messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatSkip {
    /// SQL NULL, JSON null, `{}`, `[]`, `""`, `0`, `false`: nothing to migrate.
    Empty,
    /// A JSON string that does not hold JSON (the reference skips it).
    NotJson,
    /// Not an object, even after decoding a string (the reference crashes here).
    NotObject,
    HistoryNotObject,
    MessagesNotObject,
}

impl ChatSkip {
    /// Whether an operator should hear about it: everything but an empty chat.
    pub fn is_problem(self) -> bool {
        self != ChatSkip::Empty
    }

    pub fn describe(self) -> &'static str {
        match self {
            ChatSkip::Empty => "the chat is empty",
            ChatSkip::NotJson => "chat skipped: it is a JSON string that does not hold a JSON document",
            ChatSkip::NotObject => "chat skipped: the chat is not a JSON object",
            ChatSkip::HistoryNotObject => "chat skipped: chat.history is not a JSON object",
            ChatSkip::MessagesNotObject => "chat skipped: chat.history.messages is not a JSON object",
        }
    }
}

/// A chat document ready to expand: the column's text, or the decoded inner document
/// of a double-encoded chat.
pub struct Document<'a>(Cow<'a, str>);

/// Where the document to expand lies: within the column's text, or (double-encoded
/// chats) in a decoded copy. Lets a caller keep a huge chat across batches without a
/// second copy of it.
pub enum Body {
    Within(Range<usize>),
    Decoded(String),
}

impl Body {
    /// The document's text, given the column's text it was opened from.
    pub fn text<'a>(&'a self, column: &'a str) -> &'a str {
        match self {
            Body::Within(range) => &column[range.clone()],
            Body::Decoded(text) => text,
        }
    }
}

/// JSON's insignificant whitespace.
const JSON_WS: [char; 4] = [' ', '\t', '\n', '\r'];

impl<'a> Document<'a> {
    /// Applies rule 2: what counts as empty, and the second decode of a JSON string.
    /// `text` is the column's value as JSON text; `None` is SQL NULL. An object is
    /// not scanned here: `index` validates it in its single pass.
    pub fn open(text: Option<&'a str>) -> Result<Document<'a>, ChatSkip> {
        let Some(text) = text else { return Err(ChatSkip::Empty) };
        let text = text.trim_matches(JSON_WS);
        if scalar::kind(text) == Kind::Object {
            return Ok(Document(Cow::Borrowed(text)));
        }
        let raw: &RawValue = serde_json::from_str(text).map_err(|_| ChatSkip::NotJson)?;
        let raw = raw.get();
        if !scalar::is_truthy(raw) {
            return Err(ChatSkip::Empty);
        }
        if scalar::kind(raw) != Kind::String {
            return Err(ChatSkip::NotObject);
        }
        let inner = scalar::wtf8_to_json_text(scalar::decode_string(raw));
        let trimmed = inner.trim_matches(JSON_WS);
        if scalar::kind(trimmed) != Kind::Object {
            return Err(match serde_json::from_str::<&RawValue>(trimmed) {
                Ok(_) => ChatSkip::NotObject,
                Err(_) => ChatSkip::NotJson,
            });
        }
        Ok(Document(Cow::Owned(trimmed.to_owned())))
    }

    pub fn text(&self) -> &str {
        &self.0
    }

    /// Where this document lies, relative to `column`, the text it was opened from.
    pub fn into_body(self, column: &str) -> Body {
        match self.0 {
            Cow::Borrowed(text) => {
                let start = text.as_ptr() as usize - column.as_ptr() as usize;
                Body::Within(start..start + text.len())
            }
            Cow::Owned(text) => Body::Decoded(text),
        }
    }

    /// Applies rules 3 and 4: validates the whole document in one pass and returns where
    /// each entry of `history.messages` lies, in the reference's order, duplicates
    /// resolved. Cost and memory are linear in the document; nothing is built per value.
    pub fn index(&self) -> Result<Vec<Span>, ChatSkip> {
        index(&self.0, &mut || {})
    }

    /// The same, calling `poll` every `POLL_EVERY` messages, so a caller can stop a long
    /// one (PostgreSQL checks for a cancel there).
    pub fn index_polling(&self, poll: &mut dyn FnMut()) -> Result<Vec<Span>, ChatSkip> {
        index(&self.0, poll)
    }

    /// Every entry, expanded (rules 5 to 7). For small chats and tests; the engine
    /// expands from the index a batch at a time instead.
    pub fn entries(&self, now: i64) -> Result<Vec<Entry<'_>>, ChatSkip> {
        Ok(self.index()?.into_iter().map(|span| entry_at(&self.0, span, now)).collect())
    }
}

/// Where one entry of `history.messages` lies in its document: byte offsets of the
/// key's JSON string token and of the value. 16 bytes, so a chat of a million
/// messages indexes in 16 MB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    key: (u32, u32),
    value: (u32, u32),
}

impl Span {
    /// From byte offsets (key token, value), for an index built without the text in hand.
    pub(crate) fn from_offsets(key: (u32, u32), value: (u32, u32)) -> Span {
        Span { key, value }
    }

    fn of(base: &str, key: &str, value: &str) -> Span {
        let at = |s: &str| {
            let start = s.as_ptr() as usize - base.as_ptr() as usize;
            (start as u32, (start + s.len()) as u32)
        };
        Span { key: at(key), value: at(value) }
    }

    /// The key's JSON string token.
    pub fn key<'a>(&self, doc: &'a str) -> &'a str {
        &doc[self.key.0 as usize..self.key.1 as usize]
    }

    /// The value's JSON text.
    pub fn value<'a>(&self, doc: &'a str) -> &'a str {
        &doc[self.value.0 as usize..self.value.1 as usize]
    }

    /// Where the entry lies, from its key's first byte to its value's last.
    pub fn bytes(&self) -> Range<usize> {
        self.key.0 as usize..self.value.1 as usize
    }

    /// The same entry, `by` bytes earlier: offsets within a piece of the document that
    /// starts `by` bytes into it.
    pub fn shifted_back(&self, by: usize) -> Span {
        let by = by as u32;
        Span { key: (self.key.0 - by, self.key.1 - by), value: (self.value.0 - by, self.value.1 - by) }
    }
}

/// PostgreSQL values are at most 1 GB, so offsets fit in `u32`; refuse anything larger
/// rather than wrap.
const MAX_DOCUMENT_BYTES: usize = u32::MAX as usize;

/// How many messages between two calls of an index's `poll`.
pub const POLL_EVERY: usize = 4096;

fn index(doc: &str, poll: &mut dyn FnMut()) -> Result<Vec<Span>, ChatSkip> {
    spans_of(find_messages(doc, poll, Keys::Exact)?)
}

/// The migration's entries of what `find_messages` (or a streamed index) found: none, or
/// the chat skipped.
pub fn spans_of(found: Found) -> Result<Vec<Span>, ChatSkip> {
    match found {
        Found::NoHistory | Found::NoMessages => Ok(Vec::new()),
        Found::HistoryNotObject => Err(ChatSkip::HistoryNotObject),
        Found::MessagesNotObject { .. } => Err(ChatSkip::MessagesNotObject),
        Found::Messages(spans) => Ok(spans),
    }
}

/// How keys are compared: as decoded, or (Open WebUI's read path) with NUL characters and
/// lone surrogates removed first, as `sanitize_data_for_db` leaves them.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    Exact,
    Sanitized,
}

impl Keys {
    pub fn of<'a>(self, raw_key: &'a str) -> Cow<'a, [u8]> {
        let decoded = scalar::decode_string(raw_key);
        match self {
            Keys::Exact => decoded.into_bytes(),
            Keys::Sanitized if decoded.storable().is_ok() => decoded.into_bytes(),
            Keys::Sanitized => Cow::Owned(decoded.sanitized().into_owned().into_bytes()),
        }
    }
}

/// What `chat.history.messages` is in a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    NoHistory,
    HistoryNotObject,
    NoMessages,
    /// `truthy`: Python's `bool()` of it.
    MessagesNotObject { truthy: bool },
    /// Where each entry lies, in Python's order, duplicate keys resolved.
    Messages(Vec<Span>),
}

/// Validates the whole document in one pass and locates `chat.history.messages`.
pub fn find_messages(doc: &str, poll: &mut dyn FnMut(), keys: Keys) -> Result<Found, ChatSkip> {
    find_messages_and_current(doc, poll, keys).map(|(found, _)| found)
}

/// The same, and where `chat.history.currentId` lies (last duplicate wins), if present.
pub fn find_messages_and_current(
    doc: &str,
    poll: &mut dyn FnMut(),
    keys: Keys,
) -> Result<(Found, Option<Range<usize>>), ChatSkip> {
    if doc.len() > MAX_DOCUMENT_BYTES {
        return Err(ChatSkip::NotJson);
    }
    let mut de = serde_json::Deserializer::from_str(doc);
    let found = de.deserialize_map(ChatVisitor { base: doc, poll: &mut *poll, keys }).map_err(|_| ChatSkip::NotJson)?;
    de.end().map_err(|_| ChatSkip::NotJson)?;
    let current = match &found {
        Some(Level::Object(h)) => h.current_id.clone(),
        _ => None,
    };
    let found = match found {
        None => Found::NoHistory,
        Some(Level::NotObject { .. }) => Found::HistoryNotObject,
        Some(Level::Object(History { messages: None, .. })) => Found::NoMessages,
        Some(Level::Object(History { messages: Some(Level::NotObject { truthy }), .. })) => Found::MessagesNotObject { truthy },
        Some(Level::Object(History { messages: Some(Level::Object(spans)), .. })) => {
            Found::Messages(dedupe_keys(doc, spans, poll, keys))
        }
    };
    Ok((found, current))
}

/// What the history level holds: its messages, and where its currentId is.
struct History {
    messages: Option<Level<Vec<Span>>>,
    current_id: Option<Range<usize>>,
}

/// Expands the entry at `span` of `doc` (a document's text, as given to `index`).
pub fn entry_at(doc: &str, span: Span, now: i64) -> Entry<'_> {
    expand_message(scalar::decode_string(span.key(doc)), span.value(doc), now)
}

/// Convenience for callers that want the whole expansion of one column value.
pub fn expand_chat(text: Option<&str>, now: i64, mut each: impl FnMut(Entry<'_>)) -> Result<(), ChatSkip> {
    let doc = Document::open(text)?;
    for span in doc.index()? {
        each(entry_at(doc.text(), span, now));
    }
    Ok(())
}

/// What one level of `chat.history.messages` held (`None` around it: missing). The levels are walked in a single
/// pass over the document: only each message's own text is read twice.
enum Level<T> {
    NotObject { truthy: bool },
    Object(T),
}

/// Reads one object level, handing the value of `wanted` (last duplicate wins) to
/// `inner` and skipping everything else without building it.
fn walk_level<'de, A, T>(
    mut map: A,
    wanted: &'static str,
    keys: Keys,
    mut inner: impl FnMut(&mut A) -> Result<T, A::Error>,
) -> Result<Option<T>, A::Error>
where
    A: MapAccess<'de>,
{
    let mut found = None;
    while let Some(key) = map.next_key::<&'de RawValue>()? {
        if keys.of(key.get()).as_ref() == wanted.as_bytes() {
            found = Some(inner(&mut map)?);
        } else {
            map.next_value::<IgnoredAny>()?;
        }
    }
    Ok(found)
}

/// The visitors of the three levels carry the document's text, to turn the slices
/// serde_json hands out into offsets.
struct ChatVisitor<'d, 'p> {
    base: &'d str,
    poll: &'p mut dyn FnMut(),
    keys: Keys,
}

impl<'de> Visitor<'de> for ChatVisitor<'de, '_> {
    type Value = Option<Level<History>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a chat object")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        let (base, poll, keys) = (self.base, self.poll, self.keys);
        walk_level(map, "history", keys, |m| m.next_value_seed(LevelSeed(HistoryVisitor { base, poll: &mut *poll, keys })))
    }
}

struct HistoryVisitor<'d, 'p> {
    base: &'d str,
    poll: &'p mut dyn FnMut(),
    keys: Keys,
}

impl<'de> Visitor<'de> for HistoryVisitor<'de, '_> {
    type Value = History;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a history object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (base, poll, keys) = (self.base, self.poll, self.keys);
        let mut out = History { messages: None, current_id: None };
        // Last duplicate wins, for both.
        while let Some(key) = map.next_key::<&'de RawValue>()? {
            let key = keys.of(key.get());
            if key.as_ref() == b"messages" {
                out.messages = Some(map.next_value_seed(LevelSeed(MessagesVisitor { base, poll: &mut *poll }))?);
            } else if key.as_ref() == b"currentId" {
                let value = map.next_value::<&'de RawValue>()?.get();
                let start = value.as_ptr() as usize - base.as_ptr() as usize;
                out.current_id = Some(start..start + value.len());
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(out)
    }
}

struct MessagesVisitor<'d, 'p> {
    base: &'d str,
    poll: &'p mut dyn FnMut(),
}

impl<'de> Visitor<'de> for MessagesVisitor<'de, '_> {
    type Value = Vec<Span>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a messages object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut spans = Vec::new();
        while let Some(key) = map.next_key::<&'de RawValue>()? {
            let value = map.next_value::<&'de RawValue>()?;
            spans.push(Span::of(self.base, key.get(), value.get()));
            if spans.len() % POLL_EVERY == 0 {
                (self.poll)();
            }
        }
        Ok(spans)
    }
}

/// Deserializes any value: an object through the wrapped visitor, anything else to
/// `Level::NotObject` (consumed without being built).
struct LevelSeed<V>(V);

impl<'de, V> DeserializeSeed<'de> for LevelSeed<V>
where
    V: Visitor<'de>,
{
    type Value = Level<V::Value>;
    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_any(LevelVisitor(self.0))
    }
}

struct LevelVisitor<V>(V);

impl<'de, V> Visitor<'de> for LevelVisitor<V>
where
    V: Visitor<'de>,
{
    type Value = Level<V::Value>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.0.visit_map(map).map(Level::Object)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut truthy = false;
        while seq.next_element::<IgnoredAny>()?.is_some() {
            truthy = true;
        }
        Ok(Level::NotObject { truthy })
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(Level::NotObject { truthy: false })
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Level::NotObject { truthy: v })
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Level::NotObject { truthy: v != 0 })
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Level::NotObject { truthy: v != 0 })
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Level::NotObject { truthy: v != 0.0 })
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        // Only app mode asks, where NUL characters are stripped before Python sees it.
        Ok(Level::NotObject { truthy: v.chars().any(|c| c != '\0') })
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
        self.visit_str(&v)
    }
}

/// Python's dict built from pairs: a repeated key keeps its first position and takes
/// its last value. Keys are compared decoded (`"\u0061"` is `"a"`).
///
/// Keys are first told apart by a 64-bit hash (9 bytes a key in the set, not the 25 of a
/// set of the keys themselves: a chat of a million messages is checked in 18 MB); only when
/// two hashes agree are the keys themselves compared.
pub(crate) fn dedupe_keys(doc: &str, spans: Vec<Span>, poll: &mut dyn FnMut(), keys: Keys) -> Vec<Span> {
    let key = |span: &Span| keys.of(span.key(doc));
    let hash = |span: &Span| {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key(span).hash(&mut hasher);
        hasher.finish()
    };
    let mut seen: HashSet<u64> = HashSet::with_capacity(spans.len());
    let unique = spans.iter().enumerate().all(|(n, span)| {
        if n % POLL_EVERY == 0 {
            poll();
        }
        seen.insert(hash(span))
    });
    if unique {
        return spans;
    }
    drop(seen);
    let mut slot_of: HashMap<Cow<'_, [u8]>, usize> = HashMap::with_capacity(spans.len());
    let mut out: Vec<Span> = Vec::with_capacity(spans.len());
    for (n, span) in spans.into_iter().enumerate() {
        if n % POLL_EVERY == 0 {
            poll();
        }
        match slot_of.get(&key(&span)) {
            Some(&slot) => out[slot].value = span.value,
            None => {
                slot_of.insert(key(&span), out.len());
                out.push(span);
            }
        }
    }
    out
}

/// Declares a set of message fields read in one pass by `read_fields`: a struct of the
/// raw values and the key each comes from.
macro_rules! message_fields {
    ($(#[$meta:meta])* $vis:vis $name:ident, $keys:expr, { $($field:ident: $key:literal),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Default)]
        $vis struct $name<'a> {
            $($vis $field: Option<&'a str>,)*
        }

        impl<'a> $crate::migration_rows::FieldSlots<'a> for $name<'a> {
            const KEYS: $crate::migration_rows::Keys = $keys;
            fn slot(&mut self, key: &[u8]) -> Option<&mut Option<&'a str>> {
                Some(match key {
                    $($key => &mut self.$field,)*
                    _ => return None,
                })
            }
        }
    };
}
pub(crate) use message_fields;

message_fields!(
    /// The message fields the reference reads, as raw JSON (last duplicate wins), taken in
    /// one pass over the message without building anything for the other keys.
    Fields, Keys::Exact, {
        role: b"role",
        parent_id: b"parentId",
        content: b"content",
        output: b"output",
        model: b"model",
        files: b"files",
        sources: b"sources",
        embeds: b"embeds",
        done: b"done",
        status_history: b"statusHistory",
        error: b"error",
        usage: b"usage",
        timestamp: b"timestamp",
    }
);

/// A set of message fields read in one pass: each key's slot (last duplicate wins),
/// keys compared as `KEYS` says.
pub(crate) trait FieldSlots<'a>: Default {
    const KEYS: Keys;
    fn slot(&mut self, key: &[u8]) -> Option<&mut Option<&'a str>>;
}

/// Reads the fields of a message; `None` if `raw` is not a JSON object. `raw` was validated
/// as JSON already (it is an entry the index found in a document it parsed whole), so its
/// members are found by structure alone (`object_members`: quotes, backslashes and
/// brackets), not parsed a second time; other keys are skipped without building anything.
pub(crate) fn read_fields<'a, F: FieldSlots<'a>>(raw: &'a str) -> Option<F> {
    let mut fields = F::default();
    object_members(raw, |key, value| {
        if let Some(slot) = fields.slot(&F::KEYS.of(key)) {
            *slot = Some(value);
        }
    })?;
    Some(fields)
}

/// Calls `each` with the raw key token (quotes included) and the raw value (no surrounding
/// whitespace) of each member of `raw`, a JSON object that is known to be valid JSON, in
/// order; `None` if it is not an object. The same slices serde_json's `RawValue` gives
/// (`app_rows::scan::members`, which parses, and which the tests compare it with), found by structure alone:
/// within valid JSON a string ends at the first quote not escaped by a backslash, and a
/// nested value where its brackets balance outside strings. Never panics, whatever `raw`.
pub(crate) fn object_members<'a>(raw: &'a str, mut each: impl FnMut(&'a str, &'a str)) -> Option<()> {
    let b = raw.as_bytes();
    let mut i = skip_ws(b, 0);
    if *b.get(i)? != b'{' {
        return None;
    }
    i = skip_ws(b, i + 1);
    if *b.get(i)? == b'}' {
        return Some(());
    }
    loop {
        if *b.get(i)? != b'"' {
            return None;
        }
        let key_end = string_end(b, i)?;
        let key = raw.get(i..key_end)?;
        i = skip_ws(b, key_end);
        if *b.get(i)? != b':' {
            return None;
        }
        let start = skip_ws(b, i + 1);
        let end = value_end(b, start)?;
        each(key, raw.get(start..end)?);
        i = skip_ws(b, end);
        match *b.get(i)? {
            b',' => i = skip_ws(b, i + 1),
            b'}' => return Some(()),
            _ => return None,
        }
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// Just past the string token starting at `b[i]` (a quote).
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        j += memchr::memchr2(b'"', b'\\', b.get(j..)?)?;
        if b[j] == b'\\' {
            j += 2;
        } else {
            return Some(j + 1);
        }
    }
}

/// Just past the value starting at `b[i]`.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => string_end(b, i),
        b'{' | b'[' => {
            // Outside strings only brackets matter; a string is skipped whole (memchr).
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match *b.get(j)? {
                    b'"' => {
                        j = string_end(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        // A number, true, false or null: up to the next delimiter.
        _ => Some(i + b.get(i..)?.iter().position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')).unwrap_or(b.len() - i)),
    }
}

fn expand_message<'a>(key: Decoded<'a>, raw: &'a str, now: i64) -> Entry<'a> {
    let shown_key = || key.display();
    let fields = match scalar::kind(raw) {
        Kind::Object => read_fields::<Fields>(raw),
        _ => None,
    };
    let Some(fields) = fields else {
        return Entry::Skipped { key: shown_key(), reason: SkipReason::NotAnObject };
    };
    let role = match fields.role {
        Some(role) if scalar::is_truthy(role) => role,
        _ => return Entry::Skipped { key: shown_key(), reason: SkipReason::NoRole },
    };
    let reject = |column, problem| Entry::Rejected { key: key.display(), column, problem, raw };
    let text = |column, value: Option<&'a str>| match value {
        None => Ok(None),
        Some(v) => scalar::text_column(v).map_err(|p| (column, p)),
    };
    let columns = (|| {
        let key = key.clone().into_storable().map_err(|p| (Column::Key, p))?;
        // A truthy role is never JSON null, so it always has a text.
        let role = text(Column::Role, Some(role))?.unwrap_or_default();
        let parent_id = text(Column::ParentId, fields.parent_id)?;
        let model_id = text(Column::ModelId, fields.model)?;
        let done = scalar::done_column(fields.done).map_err(|p| (Column::Done, p))?;
        Ok((key, role, parent_id, model_id, done))
    })();
    let (key, role, parent_id, model_id, done) = match columns {
        Ok(c) => c,
        Err((column, problem)) => return reject(column, problem),
    };
    let json = |v: Option<&'a str>| v.unwrap_or("null");
    let timestamp = scalar::timestamp_column(fields.timestamp, now);
    Entry::Row(Message {
        key,
        role,
        parent_id,
        model_id,
        content: json(fields.content),
        output: json(fields.output),
        files: json(fields.files),
        sources: json(fields.sources),
        embeds: json(fields.embeds),
        done,
        status_history: json(fields.status_history),
        error: json(fields.error),
        usage: json(fields.usage),
        timestamp,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 1_760_000_000;

    fn expand(text: &str) -> (Vec<String>, Vec<(String, String)>, Result<(), ChatSkip>) {
        let mut rows = Vec::new();
        let mut problems = Vec::new();
        let result = expand_chat(Some(text), NOW, |e| match &e {
            Entry::Row(m) => rows.push(m.id("c")),
            _ => problems.push(e.problem().unwrap()),
        });
        (rows, problems, result)
    }

    #[test]
    fn duplicate_keys_keep_first_position_and_last_value() {
        let doc = r#"{"history":{"messages":{"a":{"role":"x"},"b":{"role":"y"},"a":{"role":"z"}}}}"#;
        let d = Document::open(Some(doc)).unwrap();
        let roles: Vec<_> = d
            .entries(NOW)
            .unwrap()
            .into_iter()
            .map(|e| match e {
                Entry::Row(m) => format!("{}={}", m.key, m.role),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(roles, ["a=z", "b=y"]);
    }

    #[test]
    fn the_index_locates_every_message_and_expands_each_alone() {
        let doc = r#"{"x":[1,{"history":2}],"history":{"messages":{"a":{"role":"u"},"b":7,"\u0061":{"role":"v"}}}}"#;
        let d = Document::open(Some(doc)).unwrap();
        let spans = d.index().unwrap();
        // "\u0061" is "a" again: first position, last value.
        assert_eq!(spans.len(), 2);
        let roles: Vec<String> = spans
            .iter()
            .map(|&s| match entry_at(d.text(), s, NOW) {
                Entry::Row(m) => format!("{}={}", m.key, m.role),
                other => format!("{:?}", other.problem()),
            })
            .collect();
        assert_eq!(roles[0], "a=v");
        assert!(roles[1].contains("not a JSON object"));
        // A million messages index in 16 bytes each.
        let many: Vec<String> = (0..1_000_000).map(|i| format!("\"{i}\":{{\"role\":\"u\"}}")).collect();
        let doc = format!(r#"{{"history":{{"messages":{{{}}}}}}}"#, many.join(","));
        let spans = Document::open(Some(&doc)).unwrap().index().unwrap();
        assert_eq!(spans.len(), 1_000_000);
        assert_eq!(std::mem::size_of::<Span>(), 16);
    }

    #[test]
    fn chat_level_verdicts() {
        for (text, want) in [
            ("null", ChatSkip::Empty),
            ("[]", ChatSkip::Empty),
            ("\"\"", ChatSkip::Empty),
            ("0", ChatSkip::Empty),
            ("false", ChatSkip::Empty),
            ("[1]", ChatSkip::NotObject),
            ("true", ChatSkip::NotObject),
            ("\"[1]\"", ChatSkip::NotObject),
            ("\"nope\"", ChatSkip::NotJson),
            ("{not json", ChatSkip::NotJson),
            (r#"{"history":null}"#, ChatSkip::HistoryNotObject),
            (r#"{"history":{"messages":[]}}"#, ChatSkip::MessagesNotObject),
        ] {
            assert_eq!(expand(text).2, Err(want), "{text}");
        }
        // An object without history (`{}` included) is fine and empty.
        assert_eq!(expand("{}"), (vec![], vec![], Ok(())));
        assert_eq!(expand(r#"{"messages":[{"role":"user"}]}"#), (vec![], vec![], Ok(())));
    }

    #[test]
    fn deep_nesting_and_huge_numbers_are_carried_verbatim() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let big = "9".repeat(10_000);
        let doc = format!(r#"{{"history":{{"messages":{{"m":{{"role":"user","content":{deep},"usage":{big}}}}}}}}}"#);
        let d = Document::open(Some(&doc)).unwrap();
        let entries = d.entries(NOW).unwrap();
        let Entry::Row(m) = &entries[0] else { panic!("expected a row") };
        assert_eq!(m.content, deep);
        assert_eq!(m.usage, big);
    }

    pub(crate) fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            (-1e300f64..1e300).prop_map(|f| serde_json::json!(f)),
            "\\PC{0,12}".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                prop::collection::vec(("[a-z]{0,6}", inner), 0..6)
                    .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Every entry of history.messages becomes exactly one row or one problem.
        #[test]
        fn every_message_is_accounted_for(messages in prop::collection::vec(("\\PC{0,8}", arb_json()), 0..12)) {
            let map: serde_json::Map<String, serde_json::Value> = messages.into_iter().collect();
            let n = map.len();
            let doc = serde_json::json!({"history": {"messages": map}}).to_string();
            let (rows, problems, result) = expand(&doc);
            prop_assert_eq!(result, Ok(()));
            prop_assert_eq!(rows.len() + problems.len(), n);
        }

        /// JSON columns hold exactly the text of the value, whatever it is.
        #[test]
        fn json_columns_are_verbatim(content in arb_json(), pretty in any::<bool>()) {
            let text = if pretty { serde_json::to_string_pretty(&content).unwrap() } else { content.to_string() };
            let doc = format!(r#"{{"history":{{"messages":{{"m":{{"role":"user","content":{text}}}}}}}}}"#);
            let d = Document::open(Some(&doc)).unwrap();
            let entries = d.entries(NOW).unwrap();
            let Entry::Row(m) = &entries[0] else { panic!("expected a row") };
            prop_assert_eq!(m.content, text.as_str());
        }

        /// Arbitrary text never panics: it is a chat, empty, or a reported skip.
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,64}") {
            let _ = expand(&text);
        }

        /// A double-encoded chat expands exactly like the document it holds.
        #[test]
        fn double_encoding_is_transparent(messages in prop::collection::vec(("[a-z]{1,4}", arb_json()), 0..6)) {
            let map: serde_json::Map<String, serde_json::Value> = messages.into_iter().collect();
            let doc = serde_json::json!({"history": {"messages": map}}).to_string();
            let encoded = serde_json::Value::String(doc.clone()).to_string();
            prop_assert_eq!(expand(&doc), expand(&encoded));
        }
    }
}
