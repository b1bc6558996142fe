//! `find_messages_and_current` over a document that arrives in pieces.
//!
//! Why: a chat document can be up to 1 GB of JSON, and today the engine detoasts it whole to
//! index it. A later step feeds this index the decompressed TOAST chunks of the document one
//! at a time, so the document is never held whole: memory is the output (16 bytes a message)
//! and a set of 64-bit hashes (about 16 bytes a message) for finding repeated keys, plus a
//! few fixed buffers, whatever the document's size. (While a repeated `messages` is read,
//! the previous one's output is kept until it is replaced.)
//!
//! The result is, byte for byte, what `migration_rows::find_messages_and_current` returns
//! for the concatenation of everything fed (the property tests below hold it to that), so
//! the serde_json grammar it reproduces is spelled out here:
//!
//! - strict RFC 8259 JSON: whitespace is space, tab, LF, CR; no trailing commas; numbers
//!   `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`; `true`, `false`, `null`; the top
//!   level must be an object followed by whitespace only; the whole input at most
//!   `u32::MAX` bytes;
//! - in every string: no byte below 0x20, escapes `\" \\ \/ \b \f \n \r \t \uXXXX` (hex
//!   in either case); a `\u` escape may be a lone surrogate (serde_json reads keys and
//!   skipped values without decoding them) except in a string that *is* the value of
//!   `history` or `messages`: those values go through `deserialize_any`, which decodes the
//!   string and rejects a lone surrogate (a high one must be followed at once by `\u` and
//!   a low one), and which reads a number as an `f64` and rejects one out of range (`1e400`);
//! - no nesting limit: serde_json's recursion limit (128) counts only the containers it
//!   visits (the chat, `history`, `messages`, at most 3 deep); everything it skips
//!   (`IgnoredAny`, `RawValue`) it skips with its own stack, to any depth;
//! - keys are compared decoded (`"\u0068istory"` is `history`), in `Keys::Sanitized` mode
//!   with NUL characters and lone surrogates removed; the last `history`, `messages` and
//!   `currentId` win, and every duplicate `history`/`messages` value is still checked.
//!
//! Offsets (spans, `currentId`'s range) are relative to the first byte fed, exactly as
//! `find_messages_and_current` on the fed text gives them. `Document::open` trims JSON
//! whitespace first and its spans are relative to the trimmed text: a caller feeding the
//! untrimmed column text subtracts `leading_whitespace()` to get those.
//!
//! Three outcomes defer to the whole-document path (`Streamed` says which):
//! - `RepeatedKeys`: the final `messages` object repeats a decoded key, or two of its keys'
//!   64-bit hashes collide. Python keeps the first position and the last value; telling a
//!   collision from a repeat needs the key texts, which are not kept: the caller indexes
//!   the whole text (`find_messages_and_current`). The spans (document order, unresolved)
//!   come with it, for a caller that can read just the key tokens they point at; the
//!   tests hold that `dedupe_keys` on them gives the whole-text answer.
//! - `ReadWhole(LongLevelNumber)`: the value of `history` or `messages` is a number literal
//!   longer than `MAX_LEVEL_NUMBER` bytes, whose range check (serde_json's own float
//!   parser) is not reproduced here. Only a hostile document has one.
//! - `ReadWhole(DeepNesting)`: skipped values nest deeper than `MAX_SKIPPED_DEPTH` levels
//!   (the bracket stack costs a bit a level). Only a hostile document does; indexing stops
//!   there (`gave_up()`), and further input is ignored.
//!
//! Input is UTF-8 overall (the engine validates it), split anywhere. Bytes that are not
//! UTF-8 never cause a panic, but what they give inside strings is not specified.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashSet;
use std::hash::Hasher;
use std::ops::Range;

use crate::migration_rows::{ChatSkip, Found, Keys, Span, POLL_EVERY};

/// `find_messages_and_current` refuses a longer document (offsets are `u32`).
const MAX_DOCUMENT_BYTES: u64 = u32::MAX as u64;

/// Input between two calls of `poll`, whatever the messages.
const POLL_BYTES: usize = 4 << 20;

/// Longest number literal checked here as the value of `history` or `messages`.
pub const MAX_LEVEL_NUMBER: usize = 1024;

/// Deepest nesting of skipped values followed here: 8M levels, a 1 MB bit stack.
pub const MAX_SKIPPED_DEPTH: u64 = 1 << 23;

/// What a streamed document gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Streamed {
    /// Exactly `find_messages_and_current`'s `Ok`.
    Indexed(Found, Option<Range<usize>>),
    /// `history.messages` is an object whose decoded keys repeat (or whose keys' hashes
    /// collide): `spans` are its entries in document order, not resolved (Python keeps a
    /// repeated key's first position and last value). The caller must read the document
    /// whole, or at least these keys, to resolve them. The document is valid and
    /// `current_id` is final.
    RepeatedKeys { spans: Vec<Span>, current_id: Option<Range<usize>> },
    /// A hostile document this index does not decide: index the whole text instead.
    ReadWhole(WhyWhole),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhyWhole {
    /// `history` or `messages` is a number longer than `MAX_LEVEL_NUMBER` bytes.
    LongLevelNumber,
    /// Values nest deeper than `MAX_SKIPPED_DEPTH`.
    DeepNesting,
}

/// Which level value a `Slot::Level` is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Which {
    History,
    Messages,
}

/// A container the index looks into (at most three deep: chat, history, messages).
#[derive(Clone, Copy, Debug)]
enum Frame {
    Chat,
    History,
    Messages,
    /// `history` or `messages` given as an array: only whether it has an element matters.
    LevelArray { which: Which, nonempty: bool },
}

/// What the value being read at the index's own level is for.
#[derive(Clone, Copy, Debug)]
enum Slot {
    Ignored,
    Level(Which),
    Current,
    Message { key: (u32, u32) },
}

#[derive(Clone, Copy, Debug)]
enum Esc {
    None,
    Backslash,
    Hex(u8, u16),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

impl Num {
    fn next(self, c: u8) -> Option<Num> {
        use Num::*;
        Some(match (self, c) {
            (Minus, b'0') => Zero,
            (Minus, b'1'..=b'9') => Int,
            (Int, b'0'..=b'9') => Int,
            (Zero | Int, b'.') => Dot,
            (Dot | Frac, b'0'..=b'9') => Frac,
            (Zero | Int | Frac, b'e' | b'E') => Exp,
            (Exp, b'+' | b'-') => ExpSign,
            (Exp | ExpSign | ExpDigits, b'0'..=b'9') => ExpDigits,
            _ => return None,
        })
    }

    /// Whether a number may end here. A digit after a leading zero ends it too, and the
    /// digit then fails where a `,` or a bracket is expected, as in serde_json.
    fn complete(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::ExpDigits)
    }
}

#[derive(Clone, Copy, Debug)]
enum State {
    /// Leading whitespace, then the chat's `{`.
    Start,
    /// A value (after `:`, or `,` in an array).
    Value,
    /// Just after `[`: `]` or a value.
    ArrayFirst,
    /// Just after `{`: `}` or a key.
    ObjectFirst,
    /// After `,` in an object: a key.
    KeyNext,
    Colon,
    /// After a value: `,` or the closing bracket.
    After,
    Str(Esc),
    Lit(&'static [u8], u8),
    Num(Num),
    /// After the chat: whitespace only.
    Done,
    GaveUp,
}

/// How the string being read is used.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum StrMode {
    /// Skipped (serde_json's `ignore_str`): validated, not decoded.
    Raw,
    /// A key of the chat or history object: decoded into `key_buf` for comparison.
    Match,
    /// A key of `messages`: decoded into the hash.
    Hash,
    /// The value of `history` or `messages`: decoded as `deserialize_any` does (lone
    /// surrogates rejected); only whether it holds a non-NUL character is kept.
    Strict,
}

/// What a level value that is not a container was.
#[derive(Clone, Copy, Debug)]
enum Scalar {
    Truthy(bool),
    Number,
}

enum HistoryLevel {
    NotObject,
    Object { messages: Option<MessagesLevel>, current_id: Option<Range<usize>> },
}

enum MessagesLevel {
    NotObject { truthy: bool },
    Object { spans: Vec<Span>, repeated: bool },
}

/// Indexes a chat document fed in pieces: see the module's documentation.
pub struct StreamIndex {
    keys: Keys,
    state: State,
    failed: bool,
    /// Offset of the next byte.
    pos: u64,
    leading_ws: u64,
    since_poll: usize,

    frames: Vec<Frame>,
    /// Skipped containers below the innermost frame, and their kinds (bit set: object).
    skipped_depth: u64,
    skipped_kinds: Vec<u64>,
    slot: Slot,
    value_start: u64,

    // The string being read.
    mode: StrMode,
    is_key: bool,
    key_start: u64,
    pending_high: Option<u16>,
    str_truthy: bool,
    key_buf: [u8; 9],
    key_len: usize,
    key_overflow: bool,
    hash_buf: [u8; 64],
    hash_len: usize,
    hash_total: u64,
    hasher: DefaultHasher,

    // A level value that is a scalar.
    scalar: Scalar,
    number: Vec<u8>,
    number_too_long: bool,
    long_level_number: bool,

    // What was found so far (last duplicate wins).
    history: Option<HistoryLevel>,
    /// Of the history object being read.
    h_messages: Option<MessagesLevel>,
    h_current: Option<Range<usize>>,
    /// Of the messages object being read.
    spans: Vec<Span>,
    hashes: HashSet<u64>,
    repeated: bool,
}

fn is_ws(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r')
}

fn hex(c: u8) -> Option<u16> {
    (c as char).to_digit(16).map(|d| d as u16)
}

/// How many bytes at the start of `b` are plain string contents: not `"`, `\\` or a
/// control character. Eight bytes at a time: string contents are most of a document.
fn string_run(b: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // The classic "has a byte less than n" test. Its lowest set bit is exact (a borrow
    // only carries past a byte that matched), which is all that is read.
    let below = |x: u64, n: u8| x.wrapping_sub(ONES * n as u64) & !x & HIGH;
    let mut i = 0;
    while let Some(chunk) = b.get(i..i + 8) {
        let w = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
        let hits = below(w ^ (ONES * b'"' as u64), 1) | below(w ^ (ONES * b'\\' as u64), 1) | below(w, 0x20);
        if hits != 0 {
            return i + (hits.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    i + b[i..].iter().position(|&x| x == b'"' || x == b'\\' || x < 0x20).unwrap_or(b.len() - i)
}

/// Marks a failure; the caller turns it into `ChatSkip::NotJson`.
struct Invalid;

type Step = Result<(), Invalid>;

impl StreamIndex {
    pub fn new(keys: Keys) -> Self {
        StreamIndex {
            keys,
            state: State::Start,
            failed: false,
            pos: 0,
            leading_ws: 0,
            since_poll: 0,
            frames: Vec::with_capacity(4),
            skipped_depth: 0,
            skipped_kinds: Vec::new(),
            slot: Slot::Ignored,
            value_start: 0,
            mode: StrMode::Raw,
            is_key: false,
            key_start: 0,
            pending_high: None,
            str_truthy: false,
            key_buf: [0; 9],
            key_len: 0,
            key_overflow: false,
            hash_buf: [0; 64],
            hash_len: 0,
            hash_total: 0,
            hasher: DefaultHasher::new(),
            scalar: Scalar::Truthy(false),
            number: Vec::new(),
            number_too_long: false,
            long_level_number: false,
            history: None,
            h_messages: None,
            h_current: None,
            spans: Vec::new(),
            hashes: HashSet::new(),
            repeated: false,
        }
    }

    /// JSON whitespace bytes before the chat's `{` (what `Document::open` trims), once
    /// that `{` has been fed.
    pub fn leading_whitespace(&self) -> usize {
        self.leading_ws as usize
    }

    /// Whether indexing stopped (`WhyWhole::DeepNesting`): the caller may stop feeding.
    pub fn gave_up(&self) -> bool {
        matches!(self.state, State::GaveUp)
    }

    /// Feed the next bytes of the document (any split, even inside a token or a UTF-8
    /// sequence). An `Err` is final: the whole document is `ChatSkip::NotJson`. Calls
    /// `poll` every `POLL_EVERY` messages and every 4 MB of input.
    pub fn feed(&mut self, bytes: &[u8], poll: &mut dyn FnMut()) -> Result<(), ChatSkip> {
        if self.failed {
            return Err(ChatSkip::NotJson);
        }
        if self.gave_up() {
            return Ok(());
        }
        if self.pos + bytes.len() as u64 > MAX_DOCUMENT_BYTES {
            self.failed = true;
            return Err(ChatSkip::NotJson);
        }
        for chunk in bytes.chunks(1 << 20) {
            if self.run(chunk, poll).is_err() {
                self.failed = true;
                return Err(ChatSkip::NotJson);
            }
            self.since_poll += chunk.len();
            if self.since_poll >= POLL_BYTES {
                self.since_poll = 0;
                poll();
            }
            if self.gave_up() {
                break;
            }
        }
        Ok(())
    }

    /// After the last byte: what `find_messages_and_current` returns for the whole
    /// document, or which whole-document path to take instead.
    pub fn finish(mut self, poll: &mut dyn FnMut()) -> Result<Streamed, ChatSkip> {
        poll();
        if self.failed {
            return Err(ChatSkip::NotJson);
        }
        if self.gave_up() {
            return Ok(Streamed::ReadWhole(WhyWhole::DeepNesting));
        }
        if !matches!(self.state, State::Done) {
            return Err(ChatSkip::NotJson);
        }
        if self.long_level_number {
            return Ok(Streamed::ReadWhole(WhyWhole::LongLevelNumber));
        }
        Ok(match self.history.take() {
            None => Streamed::Indexed(Found::NoHistory, None),
            Some(HistoryLevel::NotObject) => Streamed::Indexed(Found::HistoryNotObject, None),
            Some(HistoryLevel::Object { messages, current_id }) => match messages {
                None => Streamed::Indexed(Found::NoMessages, current_id),
                Some(MessagesLevel::NotObject { truthy }) => {
                    Streamed::Indexed(Found::MessagesNotObject { truthy }, current_id)
                }
                Some(MessagesLevel::Object { spans, repeated: true }) => Streamed::RepeatedKeys { spans, current_id },
                Some(MessagesLevel::Object { spans, repeated: false }) => Streamed::Indexed(Found::Messages(spans), current_id),
            },
        })
    }

    fn run(&mut self, b: &[u8], poll: &mut dyn FnMut()) -> Step {
        let base = self.pos;
        let n = b.len();
        let mut i = 0;
        while i < n {
            let c = b[i];
            match self.state {
                State::Str(Esc::None) => {
                    // Most of a document is string contents: find the next byte that
                    // matters in one scan.
                    let end = i + string_run(&b[i..]);
                    if end > i {
                        if self.mode != StrMode::Raw {
                            self.literal_run(&b[i..end])?;
                        }
                        i = end;
                        continue;
                    }
                    i += 1;
                    match c {
                        b'"' => {
                            self.flush_pending()?;
                            self.end_string(base + i as u64, poll)?;
                        }
                        b'\\' => self.state = State::Str(Esc::Backslash),
                        _ => return Err(Invalid),
                    }
                }
                State::Str(Esc::Backslash) => {
                    i += 1;
                    if c == b'u' {
                        self.state = State::Str(Esc::Hex(0, 0));
                        continue;
                    }
                    let decoded = match c {
                        b'"' | b'\\' | b'/' => c,
                        b'b' => 0x08,
                        b'f' => 0x0C,
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        _ => return Err(Invalid),
                    };
                    self.flush_pending()?;
                    self.emit_code(decoded as u32);
                    self.state = State::Str(Esc::None);
                }
                State::Str(Esc::Hex(k, acc)) => {
                    i += 1;
                    let acc = acc << 4 | hex(c).ok_or(Invalid)?;
                    if k == 3 {
                        self.state = State::Str(Esc::None);
                        self.unit(acc)?;
                    } else {
                        self.state = State::Str(Esc::Hex(k + 1, acc));
                    }
                }
                _ if is_ws(c) && !matches!(self.state, State::Lit(..) | State::Num(_) | State::GaveUp) => {
                    if matches!(self.state, State::Start) {
                        self.leading_ws += 1;
                    }
                    i += 1;
                }
                State::Start => {
                    if c != b'{' {
                        return Err(Invalid);
                    }
                    i += 1;
                    self.frames.push(Frame::Chat);
                    self.state = State::ObjectFirst;
                }
                State::ObjectFirst | State::KeyNext => {
                    let at = base + i as u64;
                    i += 1;
                    match c {
                        b'"' => self.begin_key(at),
                        b'}' if matches!(self.state, State::ObjectFirst) => self.close(c, at + 1, poll)?,
                        _ => return Err(Invalid),
                    }
                }
                State::Colon => {
                    if c != b':' {
                        return Err(Invalid);
                    }
                    i += 1;
                    self.state = State::Value;
                }
                State::Value | State::ArrayFirst => {
                    let at = base + i as u64;
                    i += 1;
                    if c == b']' && matches!(self.state, State::ArrayFirst) {
                        self.close(c, at + 1, poll)?;
                    } else {
                        self.begin_value(c, at)?;
                    }
                }
                State::After => {
                    let at = base + i as u64;
                    i += 1;
                    match c {
                        b',' => self.state = if self.in_object() { State::KeyNext } else { State::Value },
                        b'}' | b']' => self.close(c, at + 1, poll)?,
                        _ => return Err(Invalid),
                    }
                }
                State::Lit(rest, k) => {
                    if c != rest[k as usize] {
                        return Err(Invalid);
                    }
                    i += 1;
                    if k as usize + 1 == rest.len() {
                        self.value_done(base + i as u64, poll)?;
                    } else {
                        self.state = State::Lit(rest, k + 1);
                    }
                }
                State::Num(s) => match s.next(c) {
                    Some(next) => {
                        i += 1;
                        self.number_byte(c);
                        self.state = State::Num(next);
                    }
                    // The byte after a number is read again, as what follows a value.
                    None if s.complete() => self.value_done(base + i as u64, poll)?,
                    None => return Err(Invalid),
                },
                State::Done => return Err(Invalid),
                State::GaveUp => break,
            }
        }
        self.pos = base + n as u64;
        Ok(())
    }

    fn in_object(&self) -> bool {
        if self.skipped_depth > 0 {
            let d = self.skipped_depth - 1;
            self.skipped_kinds[(d / 64) as usize] >> (d % 64) & 1 == 1
        } else {
            !matches!(self.frames.last(), Some(Frame::LevelArray { .. }))
        }
    }

    fn begin_key(&mut self, at: u64) {
        self.mode = if self.skipped_depth > 0 {
            StrMode::Raw
        } else {
            match self.frames.last() {
                Some(Frame::Messages) => StrMode::Hash,
                _ => StrMode::Match,
            }
        };
        self.begin_string(true);
        self.key_start = at;
    }

    fn begin_string(&mut self, is_key: bool) {
        self.is_key = is_key;
        self.pending_high = None;
        self.str_truthy = false;
        self.key_len = 0;
        self.key_overflow = false;
        self.hash_len = 0;
        self.hash_total = 0;
        self.hasher = DefaultHasher::new();
        self.state = State::Str(Esc::None);
    }

    fn begin_value(&mut self, c: u8, at: u64) -> Step {
        let mut level = None;
        if self.skipped_depth == 0 {
            self.value_start = at;
            if let Some(Frame::LevelArray { nonempty, .. }) = self.frames.last_mut() {
                *nonempty = true;
            }
            if let Slot::Level(which) = self.slot {
                level = Some(which);
            }
        }
        match c {
            b'{' | b'[' => match level {
                Some(which) => {
                    let frame = match (c, which) {
                        (b'[', _) => Frame::LevelArray { which, nonempty: false },
                        (_, Which::History) => {
                            self.h_messages = None;
                            self.h_current = None;
                            Frame::History
                        }
                        (_, Which::Messages) => {
                            self.spans = Vec::new();
                            self.hashes = HashSet::new();
                            self.repeated = false;
                            Frame::Messages
                        }
                    };
                    self.frames.push(frame);
                    self.slot = Slot::Ignored;
                    self.state = if c == b'{' { State::ObjectFirst } else { State::ArrayFirst };
                }
                None => {
                    if self.skipped_depth >= MAX_SKIPPED_DEPTH {
                        self.state = State::GaveUp;
                        return Ok(());
                    }
                    let d = self.skipped_depth;
                    let word = (d / 64) as usize;
                    if word == self.skipped_kinds.len() {
                        self.skipped_kinds.push(0);
                    }
                    let bit = 1u64 << (d % 64);
                    if c == b'{' {
                        self.skipped_kinds[word] |= bit;
                        self.state = State::ObjectFirst;
                    } else {
                        self.skipped_kinds[word] &= !bit;
                        self.state = State::ArrayFirst;
                    }
                    self.skipped_depth += 1;
                }
            },
            b'"' => {
                self.mode = if level.is_some() { StrMode::Strict } else { StrMode::Raw };
                self.begin_string(false);
            }
            b'-' | b'0'..=b'9' => {
                self.scalar = Scalar::Number;
                self.number.clear();
                self.number_too_long = false;
                self.number_byte(c);
                self.state = State::Num(match c {
                    b'-' => Num::Minus,
                    b'0' => Num::Zero,
                    _ => Num::Int,
                });
            }
            b't' => {
                self.scalar = Scalar::Truthy(true);
                self.state = State::Lit(b"rue", 0);
            }
            b'f' => {
                self.scalar = Scalar::Truthy(false);
                self.state = State::Lit(b"alse", 0);
            }
            b'n' => {
                self.scalar = Scalar::Truthy(false);
                self.state = State::Lit(b"ull", 0);
            }
            _ => return Err(Invalid),
        }
        Ok(())
    }

    /// Keeps the literal of a number that is a level value (the only ones checked).
    fn number_byte(&mut self, c: u8) {
        if self.skipped_depth == 0 && matches!(self.slot, Slot::Level(_)) {
            if self.number.len() < MAX_LEVEL_NUMBER {
                self.number.push(c);
            } else {
                self.number_too_long = true;
            }
        }
    }

    fn close(&mut self, c: u8, end: u64, poll: &mut dyn FnMut()) -> Step {
        if (c == b'}') != self.in_object() {
            return Err(Invalid);
        }
        if self.skipped_depth > 0 {
            self.skipped_depth -= 1;
            if self.skipped_depth == 0 {
                return self.value_done(end, poll);
            }
            self.state = State::After;
            return Ok(());
        }
        self.state = State::After;
        match self.frames.pop().ok_or(Invalid)? {
            Frame::Chat => self.state = State::Done,
            Frame::History => {
                self.history = Some(HistoryLevel::Object { messages: self.h_messages.take(), current_id: self.h_current.take() })
            }
            Frame::Messages => {
                self.h_messages = Some(MessagesLevel::Object {
                    spans: std::mem::take(&mut self.spans),
                    repeated: self.repeated,
                });
                self.hashes = HashSet::new();
            }
            Frame::LevelArray { which, nonempty } => self.set_level(which, nonempty),
        }
        Ok(())
    }

    fn set_level(&mut self, which: Which, truthy: bool) {
        match which {
            Which::History => self.history = Some(HistoryLevel::NotObject),
            Which::Messages => self.h_messages = Some(MessagesLevel::NotObject { truthy }),
        }
    }

    /// A value ended at `end` (exclusive); acts on it if it is one of the index's own.
    fn value_done(&mut self, end: u64, poll: &mut dyn FnMut()) -> Step {
        self.state = State::After;
        if self.skipped_depth > 0 {
            return Ok(());
        }
        match self.slot {
            Slot::Ignored => {}
            Slot::Current => self.h_current = Some(self.value_start as usize..end as usize),
            Slot::Message { key } => {
                self.spans.push(Span::from_offsets(key, (self.value_start as u32, end as u32)));
                if self.spans.len() % POLL_EVERY == 0 {
                    poll();
                }
            }
            Slot::Level(which) => {
                let truthy = match self.scalar {
                    Scalar::Truthy(t) => t,
                    Scalar::Number if self.number_too_long => {
                        self.long_level_number = true;
                        false
                    }
                    // deserialize_any's own reading of a short literal decides, range
                    // check included.
                    Scalar::Number => match serde_json::from_slice::<serde_json::Value>(&self.number) {
                        Ok(serde_json::Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
                        _ => return Err(Invalid),
                    },
                };
                self.set_level(which, truthy);
            }
        }
        Ok(())
    }

    fn end_string(&mut self, end: u64, poll: &mut dyn FnMut()) -> Step {
        if !self.is_key {
            self.scalar = Scalar::Truthy(self.str_truthy);
            return self.value_done(end, poll);
        }
        self.state = State::Colon;
        if self.skipped_depth > 0 {
            return Ok(());
        }
        let key = &self.key_buf[..self.key_len];
        let matched = |word: &[u8]| !self.key_overflow && key == word;
        self.slot = match self.frames.last() {
            Some(Frame::Chat) if matched(b"history") => Slot::Level(Which::History),
            Some(Frame::History) if matched(b"messages") => Slot::Level(Which::Messages),
            Some(Frame::History) if matched(b"currentId") => Slot::Current,
            Some(Frame::Messages) => {
                self.hasher.write(&self.hash_buf[..self.hash_len]);
                self.hasher.write_u64(self.hash_total);
                if !self.hashes.insert(self.hasher.finish()) {
                    self.repeated = true;
                }
                Slot::Message { key: (self.key_start as u32, end as u32) }
            }
            _ => Slot::Ignored,
        };
        Ok(())
    }

    /// A `\uXXXX` code unit, paired with a pending high surrogate as `decode_string`
    /// (keys) and serde_json's `parse_str` (strict values) do.
    fn unit(&mut self, u: u16) -> Step {
        let strict = self.mode == StrMode::Strict;
        let is_low = (0xDC00..0xE000).contains(&u);
        if let Some(high) = self.pending_high.take() {
            if is_low {
                let code = 0x10000 + ((high as u32 - 0xD800) << 10) + (u as u32 - 0xDC00);
                self.emit_code(code);
                return Ok(());
            }
            if strict {
                return Err(Invalid);
            }
            self.emit_code(high as u32);
        }
        if (0xD800..0xDC00).contains(&u) {
            if self.mode != StrMode::Raw {
                self.pending_high = Some(u);
            }
            return Ok(());
        }
        if strict && is_low {
            return Err(Invalid);
        }
        self.emit_code(u as u32);
        Ok(())
    }

    /// Anything but a low surrogate escape after a high one: alone in a key, an error
    /// in a strict value.
    fn flush_pending(&mut self) -> Step {
        if let Some(high) = self.pending_high.take() {
            if self.mode == StrMode::Strict {
                return Err(Invalid);
            }
            self.emit_code(high as u32);
        }
        Ok(())
    }

    fn literal_run(&mut self, run: &[u8]) -> Step {
        self.flush_pending()?;
        self.emit_bytes(run);
        Ok(())
    }

    /// A decoded code point (or lone surrogate) of a key or strict value.
    fn emit_code(&mut self, code: u32) {
        match self.mode {
            StrMode::Raw => {}
            StrMode::Strict => self.str_truthy |= code != 0,
            StrMode::Match | StrMode::Hash => {
                let lone = (0xD800..0xE000).contains(&code);
                if self.keys == Keys::Sanitized && (code == 0 || lone) {
                    return;
                }
                let mut buf = [0u8; 4];
                let bytes: &[u8] = match char::from_u32(code) {
                    Some(ch) => ch.encode_utf8(&mut buf).as_bytes(),
                    // Generalized UTF-8, as `scalar::decode_string` keeps a lone surrogate.
                    None => {
                        buf[..3].copy_from_slice(&[0xED, 0x80 | ((code >> 6) & 0x3F) as u8, 0x80 | (code & 0x3F) as u8]);
                        &buf[..3]
                    }
                };
                let len = bytes.len();
                self.emit_bytes(&buf[..len]);
            }
        }
    }

    fn emit_bytes(&mut self, bytes: &[u8]) {
        match self.mode {
            StrMode::Raw => {}
            StrMode::Strict => self.str_truthy |= !bytes.is_empty(),
            StrMode::Match => {
                let room = self.key_buf.len() - self.key_len;
                if bytes.len() > room {
                    self.key_overflow = true;
                } else {
                    self.key_buf[self.key_len..self.key_len + bytes.len()].copy_from_slice(bytes);
                    self.key_len += bytes.len();
                }
            }
            StrMode::Hash => {
                // Fixed 64-byte blocks of the decoded key: the hash depends on the key
                // alone, not on how the input was split.
                self.hash_total += bytes.len() as u64;
                let mut rest = bytes;
                while !rest.is_empty() {
                    let take = rest.len().min(64 - self.hash_len);
                    self.hash_buf[self.hash_len..self.hash_len + take].copy_from_slice(&rest[..take]);
                    self.hash_len += take;
                    rest = &rest[take..];
                    if self.hash_len == 64 {
                        self.hasher.write(&self.hash_buf);
                        self.hash_len = 0;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
