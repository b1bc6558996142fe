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
pub(super) struct Shape {
    pub(super) depth: usize,
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

pub(super) fn scan(doc: &str) -> Shape {
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

/// An object's members in order: (key token, value text).
pub(super) fn members(object: &str) -> Vec<(&str, &str)> {
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
