//! The document scan: one linear pass over a JSON text (no recursion) for its depth, its widest
//! integers and the strings the sanitizer would rewrite; an array's elements and an object's
//! members as raw JSON.

use std::fmt;
use std::ops::Range;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use crate::migration_rows::Keys;
use crate::scalar::{self, decode_string};

/// An array's elements as raw JSON.
pub(super) fn elements(array: &str) -> Vec<&str> {
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
pub(crate) struct Shape {
    pub(crate) depth: usize,
    pub(super) longest_integer: usize,
    /// A number beyond double range (orjson refuses it).
    pub(super) overflow: bool,
    /// A string with a lone surrogate escape (orjson refuses it).
    pub(super) lone_surrogate: bool,
    /// A string with a NUL or surrogate escape, which the sanitizer may rewrite.
    pub(super) rewritten_strings: bool,
    /// An integer literal outside [-2^63, 2^64-1].
    pub(super) wide_integer: bool,
}

pub(crate) fn scan(doc: &str) -> Shape {
    let (mut longest, mut overflow, mut lone_surrogate, mut rewritten_strings, mut wide_integer) = (0, false, false, false, false);
    let depth = walk_tokens(doc, |token, range| match token {
        Token::String if !lone_surrogate && needs_sanitizing(&doc[range.clone()]) => {
            rewritten_strings = true;
            lone_surrogate = matches!(decode_string(&doc[range]).storable(), Err(scalar::Unstorable::UnpairedSurrogate));
        }
        Token::String => {}
        Token::Number => {
            let text = &doc[range];
            if scalar::is_integer_literal(text) {
                longest = longest.max(text.len());
                wide_integer = wide_integer || !fits_64_bits(text);
            }
            overflow = overflow || text.parse::<f64>().map_or(false, f64::is_infinite);
        }
    });
    Shape { depth, longest_integer: longest, overflow, lone_surrogate, rewritten_strings, wide_integer }
}

/// Longest number token `ShapeStream` keeps to read: a longer one that is not an integer
/// literal (whose shape its digits alone decide) leaves the shape undecided.
pub const MAX_STREAMED_NUMBER: usize = 4096;

/// `scan` of a document given in pieces, split anywhere (a chat streamed from its TOAST
/// table, issue 26), and whether its text holds `\u0000` anywhere (what `open` asks of the
/// whole text): the same answer for any split, holding only a number token and five bytes.
/// A state machine over the bytes `walk_tokens` reads, with a string's escapes decoded as
/// `decode_string` pairs surrogates, so that nothing of a string is kept.
#[derive(Default)]
pub struct ShapeStream {
    shape: Shape,
    depth: usize,
    at: At,
    /// The string being read: a high surrogate escape waiting for its low half, whether it
    /// holds a NUL or surrogate escape, and whether one of those is unpaired.
    pending_high: bool,
    needs: bool,
    lone: bool,
    unit: u32,
    hex_left: u8,
    /// The number token being read (up to `MAX_STREAMED_NUMBER` bytes), its length, and
    /// whether it is still an integer literal.
    number: Vec<u8>,
    number_len: usize,
    number_integer: bool,
    undecided: bool,
    /// The last bytes fed (up to 5), for a `\u0000` split between pieces.
    tail: Vec<u8>,
    nul_text: bool,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum At {
    #[default]
    Outside,
    String,
    Escape,
    Hex,
    Number,
}

impl Default for Shape {
    fn default() -> Shape {
        Shape { depth: 0, longest_integer: 0, overflow: false, lone_surrogate: false, rewritten_strings: false, wide_integer: false }
    }
}

impl ShapeStream {
    pub fn feed(&mut self, piece: &[u8]) {
        self.find_nul_text(piece);
        let mut i = 0;
        while i < piece.len() {
            let b = piece[i];
            match self.at {
                At::Outside => {
                    match b {
                        b'"' => {
                            (self.pending_high, self.needs, self.lone) = (false, false, false);
                            self.at = At::String;
                        }
                        b'-' | b'0'..=b'9' => {
                            self.number.clear();
                            (self.number_len, self.number_integer) = (0, true);
                            self.at = At::Number;
                            continue;
                        }
                        b'[' | b'{' => {
                            self.depth += 1;
                            self.shape.depth = self.shape.depth.max(self.depth);
                        }
                        b']' | b'}' => self.depth = self.depth.saturating_sub(1),
                        _ => {}
                    }
                    i += 1;
                }
                At::String => {
                    // Plain text up to the next quote or backslash, at once.
                    let run = piece[i..].iter().position(|&c| c == b'"' || c == b'\\').unwrap_or(piece.len() - i);
                    if run > 0 {
                        self.unpaired_if_pending();
                        i += run;
                        continue;
                    }
                    if b == b'"' {
                        self.end_string();
                    } else {
                        self.at = At::Escape;
                    }
                    i += 1;
                }
                At::Escape => {
                    if b == b'u' {
                        (self.unit, self.hex_left) = (0, 4);
                        self.at = At::Hex;
                    } else {
                        self.unpaired_if_pending();
                        self.at = At::String;
                    }
                    i += 1;
                }
                At::Hex => {
                    self.unit = self.unit * 16 + (b as char).to_digit(16).unwrap_or(0);
                    self.hex_left -= 1;
                    if self.hex_left == 0 {
                        self.escaped_unit();
                        self.at = At::String;
                    }
                    i += 1;
                }
                At::Number => {
                    let run = piece[i..]
                        .iter()
                        .position(|c| !matches!(c, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'))
                        .unwrap_or(piece.len() - i);
                    let digits = &piece[i..i + run];
                    self.number_integer &= !digits.iter().any(|c| matches!(c, b'.' | b'e' | b'E'));
                    self.number_len += run;
                    if self.number.len() < MAX_STREAMED_NUMBER {
                        let room = MAX_STREAMED_NUMBER - self.number.len();
                        self.number.extend_from_slice(&digits[..run.min(room)]);
                    }
                    i += run;
                    if i < piece.len() {
                        self.end_number();
                        self.at = At::Outside;
                    }
                }
            }
        }
    }

    /// The shape, and whether the text holds `\u0000`; `None` when a number too long to
    /// keep leaves it undecided (the caller scans the whole text).
    pub fn finish(mut self) -> Option<(Shape, bool)> {
        match self.at {
            At::Number => self.end_number(),
            At::String | At::Escape | At::Hex => self.end_string(),
            At::Outside => {}
        }
        (!self.undecided).then_some((self.shape, self.nul_text))
    }

    fn unpaired_if_pending(&mut self) {
        if self.pending_high {
            (self.pending_high, self.lone) = (false, true);
        }
    }

    /// A `\uXXXX` escape read: a high surrogate waits for its low half (`decode_string`
    /// pairs only a high escape followed at once by a low one).
    fn escaped_unit(&mut self) {
        let unit = self.unit;
        self.needs |= unit == 0 || (0xD800..0xE000).contains(&unit);
        if self.pending_high && (0xDC00..0xE000).contains(&unit) {
            self.pending_high = false;
            return;
        }
        self.unpaired_if_pending();
        match unit {
            0xD800..=0xDBFF => self.pending_high = true,
            0xDC00..=0xDFFF => self.lone = true,
            _ => {}
        }
    }

    fn end_string(&mut self) {
        self.unpaired_if_pending();
        // As `scan`: once a lone surrogate is found, no later string is looked at.
        if !self.shape.lone_surrogate && self.needs {
            self.shape.rewritten_strings = true;
            self.shape.lone_surrogate = self.lone;
        }
        self.at = At::Outside;
    }

    fn end_number(&mut self) {
        let len = self.number_len;
        if self.number_integer {
            self.shape.longest_integer = self.shape.longest_integer.max(len);
        }
        if len > MAX_STREAMED_NUMBER {
            if self.number_integer {
                // Over 21 characters: never within 64 bits, and an integer literal is finite
                // as a double only up to 309 digits, which a kept token would have decided.
                self.shape.wide_integer = true;
                self.shape.overflow = true;
            } else {
                self.undecided = true;
            }
            return;
        }
        let text = std::str::from_utf8(&self.number).unwrap_or_default();
        if self.number_integer {
            self.shape.wide_integer = self.shape.wide_integer || !fits_64_bits(text);
        }
        self.shape.overflow = self.shape.overflow || text.parse::<f64>().map_or(false, f64::is_infinite);
    }

    fn find_nul_text(&mut self, piece: &[u8]) {
        const NUL: &[u8] = b"\\u0000";
        if self.nul_text {
            return;
        }
        let head = &piece[..piece.len().min(NUL.len() - 1)];
        let mut joined = std::mem::take(&mut self.tail);
        joined.extend_from_slice(head);
        self.nul_text = joined.windows(NUL.len()).any(|w| w == NUL) || piece.windows(NUL.len()).any(|w| w == NUL);
        // The last five bytes of everything fed so far.
        let keep = NUL.len() - 1;
        if piece.len() >= keep {
            joined.clear();
            joined.extend_from_slice(&piece[piece.len() - keep..]);
        } else if joined.len() > keep {
            joined.drain(..joined.len() - keep);
        }
        self.tail = joined;
    }
}

/// The tokens of a JSON text that the app's codec may treat differently.
pub(super) enum Token {
    String,
    Number,
}

/// Walks a JSON text once, linearly (no recursion), handing each string (keys included)
/// and number token's byte range to `each`; returns the deepest nesting of arrays and
/// objects.
pub(super) fn walk_tokens(text: &str, mut each: impl FnMut(Token, Range<usize>)) -> usize {
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

/// An integer literal orjson reads as an integer: within [-2^63, 2^64-1].
pub(super) fn fits_64_bits(token: &str) -> bool {
    token.len() <= 21 && token.parse::<i128>().is_ok_and(|v| (-(1i128 << 63)..=(1i128 << 64) - 1).contains(&v))
}

/// A string token holding `\u0000` or a surrogate escape (paired ones are rewritten as
/// the character, harmlessly).
pub(super) fn needs_sanitizing(token: &str) -> bool {
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

/// The value of `name` in an object (last duplicate wins, keys compared sanitized).
pub(super) fn member<'a>(object: &'a str, name: &str) -> Option<&'a str> {
    members(object).into_iter().rev().find(|(k, _)| Keys::Sanitized.of(k).as_ref() == name.as_bytes()).map(|(_, v)| v)
}

/// An object's members in order: (key token, value text), as serde_json parses them.
pub(crate) fn members(object: &str) -> Vec<(&str, &str)> {
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

/// The structural scan of a message (`migration_rows::object_members`, which reads a message
/// the index validated already) against the parsing one here.
#[cfg(test)]
mod structure_tests {
    use proptest::prelude::*;

    use crate::app_rows::scan::members;
    use crate::migration_rows::object_members;
    use crate::migration_rows::tests::arb_json;

    fn members_by_structure(text: &str) -> Option<Vec<(&str, &str)>> {
        let mut members = Vec::new();
        object_members(text, |k, v| members.push((k, v))).map(|()| members)
    }

    /// A key as a JSON string token: as serde_json writes it, or every character as a
    /// \u escape (surrogate pairs beyond the BMP).
    fn key_token() -> impl Strategy<Value = String> {
        ("\\PC{0,6}", any::<bool>()).prop_map(|(key, escaped)| {
            if !escaped {
                return serde_json::to_string(&key).unwrap();
            }
            let mut out = String::from("\"");
            for unit in key.encode_utf16() {
                out.push_str(&format!("\\u{unit:04x}"));
            }
            out.push('"');
            out
        })
    }

    #[test]
    fn members_by_structure_on_hand_written_objects() {
        for text in [
            r#"{}"#,
            r#" { } "#,
            r#"{"a":1}"#,
            r#"{ "a" : "x\"}" , "b":[1,{"c":"]"}],"a":null }"#,
            r#"{"\\":"\\","q\"":{"[":"{"},"e":[],"f":{},"n":-1.5e+3,"t":true}"#,
            "{\n\t\"k\"\r\n:\n[\n1\n,\n2\n]\n}",
        ] {
            assert_eq!(members_by_structure(text), Some(members(text)), "{text}");
        }
        // Not objects.
        for text in [r#"[]"#, r#""s""#, "1", "", "{", r#"{"a""#, r#"{"a":"#, r#"{"a":1"#, r#"{"a":[}"#] {
            assert_eq!(members_by_structure(text), None, "{text}");
        }
    }

    proptest! {
        /// Members found by structure are the members serde_json parses, on any valid
        /// object: escapes, nesting, whitespace around every token, duplicate keys.
        #[test]
        fn members_by_structure_equal_members_parsed(
            parts in prop::collection::vec(
                (key_token(), arb_json(), any::<bool>(), "[ \t\n\r]{0,2}", "[ \t\n\r]{0,2}"), 0..8),
            outer in "[ \t\n\r]{0,2}",
        ) {
            let body: Vec<String> = parts
                .iter()
                .map(|(k, v, pretty, a, b)| {
                    let v = if *pretty { serde_json::to_string_pretty(v).unwrap() } else { v.to_string() };
                    format!("{a}{k}{b}:{a}{v}{b}")
                })
                .collect();
            let text = format!("{{{outer}{}{outer}}}", body.join(","));
            prop_assert_eq!(members_by_structure(&text), Some(members(&text)));
        }

        /// Whatever the text (it is never invalid JSON in use), finding members never
        /// panics; on every prefix of a valid object neither.
        #[test]
        fn members_by_structure_never_panics(text in "\\PC{0,64}", value in arb_json()) {
            let _ = members_by_structure(&text);
            let valid = serde_json::json!({"m": value}).to_string();
            for end in 0..=valid.len() {
                if let Some(prefix) = valid.get(..end) {
                    let _ = members_by_structure(prefix);
                }
            }
        }

    }
}
