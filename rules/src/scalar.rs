//! How Open WebUI's migration turns one raw JSON value into a stored scalar.
//!
//! The reference reads JSON with Python's `json` module and writes through psycopg2,
//! so the value a text, boolean or bigint column receives is whatever Python and
//! PostgreSQL make of it: `int(float(x))` for timestamps, psycopg2's literal for a
//! float, PostgreSQL's array literal for a list. This module reproduces those
//! conversions on the raw JSON text, without building a value tree.

use std::borrow::Cow;

/// A JSON string decoded to the code points Python would see.
///
/// Lone surrogates are kept, encoded as three-byte generalized UTF-8 (WTF-8), so that
/// two keys Python tells apart stay apart here too.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Decoded<'a> {
    bytes: Cow<'a, [u8]>,
    has_surrogate: bool,
}

impl<'a> Decoded<'a> {
    /// The decoded text, if PostgreSQL's `text` can hold it (no NUL, no lone surrogate).
    pub fn storable(&self) -> Result<&str, Unstorable> {
        if self.has_surrogate {
            return Err(Unstorable::UnpairedSurrogate);
        }
        if self.bytes.contains(&0) {
            return Err(Unstorable::ContainsNul);
        }
        std::str::from_utf8(&self.bytes).map_err(|_| Unstorable::UnpairedSurrogate)
    }

    /// The text for a human to read: NUL and lone surrogates shown as JSON escapes.
    pub fn display(&self) -> String {
        if let Ok(s) = self.storable() {
            return s.to_owned();
        }
        let mut out = String::with_capacity(self.bytes.len());
        let mut rest: &[u8] = &self.bytes;
        while !rest.is_empty() {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    push_escaping_nul(&mut out, s);
                    break;
                }
                Err(e) => {
                    let (good, bad) = rest.split_at(e.valid_up_to());
                    push_escaping_nul(&mut out, std::str::from_utf8(good).unwrap());
                    // Only our own surrogate encoding can be invalid here: ED A0..BF xx.
                    let unit = 0xD000 | ((bad[1] as u32 & 0x3F) << 6) | (bad[2] as u32 & 0x3F);
                    out.push_str(&format!("\\u{unit:04x}"));
                    rest = &bad[3..];
                }
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The text Open WebUI's `sanitize_text_for_db` leaves: NUL characters and lone
    /// surrogates removed.
    pub fn sanitized(&self) -> Cow<'_, str> {
        if let Ok(s) = self.storable() {
            return Cow::Borrowed(s);
        }
        let mut out = String::with_capacity(self.bytes.len());
        let mut rest: &[u8] = &self.bytes;
        while !rest.is_empty() {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.extend(s.chars().filter(|&c| c != '\0'));
                    break;
                }
                Err(e) => {
                    let (good, bad) = rest.split_at(e.valid_up_to());
                    out.extend(std::str::from_utf8(good).unwrap_or_default().chars().filter(|&c| c != '\0'));
                    // Only our own surrogate encoding can be invalid here: three bytes.
                    rest = &bad[3.min(bad.len())..];
                }
            }
        }
        Cow::Owned(out)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The decoded bytes (generalized UTF-8), for comparing keys as Python does.
    pub fn into_bytes(self) -> Cow<'a, [u8]> {
        self.bytes
    }

    /// Consumes the value: the text, if PostgreSQL's `text` can hold it.
    pub fn into_storable(self) -> Result<Cow<'a, str>, Unstorable> {
        self.storable()?;
        // `storable` checked: no surrogate, so the bytes are UTF-8.
        Ok(match self.bytes {
            Cow::Borrowed(b) => Cow::Borrowed(std::str::from_utf8(b).map_err(|_| Unstorable::UnpairedSurrogate)?),
            Cow::Owned(v) => Cow::Owned(String::from_utf8(v).map_err(|_| Unstorable::UnpairedSurrogate)?),
        })
    }
}

fn push_escaping_nul(out: &mut String, s: &str) {
    for c in s.chars() {
        if c == '\0' {
            out.push_str("\\u0000");
        } else {
            out.push(c);
        }
    }
}

/// Why a value cannot go into a `text` or `boolean` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unstorable {
    ContainsNul,
    UnpairedSurrogate,
    ObjectInTextColumn,
    ListNotArrayLiteral,
    /// Nested deeper than PostgreSQL's 6 array dimensions (the reference gets 54000).
    TooManyDimensions,
    NotBoolean,
}

impl Unstorable {
    pub fn describe(self) -> &'static str {
        match self {
            Unstorable::ContainsNul => "contains a NUL character (\\u0000), which text cannot hold",
            Unstorable::UnpairedSurrogate => "contains an unpaired UTF-16 surrogate, which is not valid UTF-8",
            Unstorable::ObjectInTextColumn => "is a JSON object, which a text column cannot hold",
            Unstorable::ListNotArrayLiteral => {
                "is a list that is not a PostgreSQL array (mixed element types, nested objects, ragged or non-finite)"
            }
            Unstorable::TooManyDimensions => {
                "is a list nested deeper than the 6 dimensions a PostgreSQL array can have"
            }
            Unstorable::NotBoolean => "is not one of true, false, null, 0, 1, 0.0, 1.0",
        }
    }
}

/// Decodes a raw JSON string token (with its quotes). The caller guarantees it is a
/// valid JSON string token, as produced by serde_json's `RawValue`.
pub fn decode_string(raw: &str) -> Decoded<'_> {
    let inner = &raw.as_bytes()[1..raw.len() - 1];
    if !inner.contains(&b'\\') {
        return Decoded { bytes: Cow::Borrowed(inner), has_surrogate: false };
    }
    let mut out = Vec::with_capacity(inner.len());
    let mut has_surrogate = false;
    let mut i = 0;
    while i < inner.len() {
        let b = inner[i];
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        let esc = inner[i + 1];
        i += 2;
        let simple = match esc {
            b'"' => Some(b'"'),
            b'\\' => Some(b'\\'),
            b'/' => Some(b'/'),
            b'b' => Some(0x08),
            b'f' => Some(0x0C),
            b'n' => Some(b'\n'),
            b'r' => Some(b'\r'),
            b't' => Some(b'\t'),
            _ => None,
        };
        if let Some(c) = simple {
            out.push(c);
            continue;
        }
        let unit = hex4(&inner[i..i + 4]);
        i += 4;
        let code = if (0xD800..0xDC00).contains(&unit)
            && inner.len() >= i + 6
            && inner[i] == b'\\'
            && inner[i + 1] == b'u'
            && (0xDC00..0xE000).contains(&hex4(&inner[i + 2..i + 6]))
        {
            let low = hex4(&inner[i + 2..i + 6]);
            i += 6;
            0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00)
        } else {
            unit
        };
        if (0xD800..0xE000).contains(&code) {
            has_surrogate = true;
            out.extend_from_slice(&[0xED, 0x80 | ((code >> 6) & 0x3F) as u8, 0x80 | (code & 0x3F) as u8]);
        } else {
            let c = char::from_u32(code).expect("non-surrogate code point");
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        }
    }
    Decoded { bytes: Cow::Owned(out), has_surrogate }
}

fn hex4(b: &[u8]) -> u32 {
    b.iter().fold(0, |acc, &d| acc * 16 + (d as char).to_digit(16).expect("hex digit"))
}

/// Re-encodes decoded text as JSON text for a second parse: lone surrogates go back to
/// `\uXXXX` escapes, which is how Python's `json.loads` sees them in a string literal.
pub fn wtf8_to_json_text(decoded: Decoded<'_>) -> String {
    if !decoded.has_surrogate {
        if let Ok(text) = std::str::from_utf8(&decoded.bytes) {
            return text.to_owned();
        }
    }
    let mut out = String::with_capacity(decoded.bytes.len());
    let mut rest: &[u8] = &decoded.bytes;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                return out;
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(good).unwrap());
                let unit = 0xD000 | ((bad[1] as u32 & 0x3F) << 6) | (bad[2] as u32 & 0x3F);
                out.push_str(&format!("\\u{unit:04x}"));
                rest = &bad[3..];
            }
        }
    }
}

/// The kind of a raw JSON value, read from its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Null,
    True,
    False,
    Number,
    String,
    Array,
    Object,
}

pub fn kind(raw: &str) -> Kind {
    match raw.as_bytes().first() {
        Some(b'n') => Kind::Null,
        Some(b't') => Kind::True,
        Some(b'f') => Kind::False,
        Some(b'"') => Kind::String,
        Some(b'[') => Kind::Array,
        Some(b'{') => Kind::Object,
        _ => Kind::Number,
    }
}

/// A JSON number literal that Python reads as an int (no fraction, no exponent).
pub fn is_integer_literal(raw: &str) -> bool {
    !raw.bytes().any(|b| matches!(b, b'.' | b'e' | b'E'))
}

/// Python's truthiness of the value `json.loads(raw)` gives.
pub fn is_truthy(raw: &str) -> bool {
    match kind(raw) {
        Kind::Null | Kind::False => false,
        Kind::True => true,
        Kind::String => raw.len() > 2,
        Kind::Array | Kind::Object => !raw[1..raw.len() - 1].trim().is_empty(),
        Kind::Number => raw.bytes().any(|b| matches!(b, b'1'..=b'9')) && number_is_nonzero(raw),
    }
}

/// A literal with a non-zero digit can still be zero as a float (`1e-400`).
fn number_is_nonzero(raw: &str) -> bool {
    if is_integer_literal(raw) {
        return true;
    }
    raw.parse::<f64>().map(|f| f != 0.0).unwrap_or(true)
}

/// The text PostgreSQL stores when psycopg2 sends Python's `float(raw)` to a text column:
/// `repr()` goes out as a numeric literal and comes back as numeric's text, which writes
/// exponents out in full; infinities go out as `'Infinity'::float`.
fn float_text(f: f64) -> String {
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    if f == 0.0 {
        return "0.0".into();
    }
    // Rust's Display is the shortest round-trip digits without an exponent, which is
    // numeric's rendering of Python's repr; repr adds ".0" in its fixed-point range.
    let mut s = f.to_string();
    let fixed_range = (1e-4..1e16).contains(&f.abs());
    if fixed_range && !s.contains('.') {
        s.push_str(".0");
    }
    s
}

/// A Python int's digits from a JSON integer literal (`-0` is `0`).
pub fn integer_text(raw: &str) -> String {
    if raw.trim_start_matches('-').bytes().all(|b| b == b'0') {
        "0".into()
    } else {
        raw.to_owned()
    }
}

/// Text of a JSON number as psycopg2 + PostgreSQL store it in a text column.
fn number_text(raw: &str) -> String {
    if is_integer_literal(raw) {
        return integer_text(raw);
    }
    float_text(raw.parse::<f64>().expect("JSON number literal"))
}

/// Converts a raw JSON value to the text a `text` column of the reference receives.
/// `Ok(None)` is SQL NULL (JSON null).
pub fn text_column(raw: &str) -> Result<Option<Cow<'_, str>>, Unstorable> {
    Ok(Some(match kind(raw) {
        Kind::Null => return Ok(None),
        Kind::True => Cow::Borrowed("true"),
        Kind::False => Cow::Borrowed("false"),
        Kind::Number => Cow::Owned(number_text(raw)),
        Kind::String => decode_string(raw).into_storable()?,
        Kind::Object => return Err(Unstorable::ObjectInTextColumn),
        Kind::Array => Cow::Owned(array_literal(raw)?),
    }))
}

/// Element category of a list sent through psycopg2's `ARRAY[...]`: elements must agree
/// on one PostgreSQL type, or PostgreSQL refuses the array.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ElemType {
    Text,
    Numeric,
    Bool,
}

/// PostgreSQL's MAXDIM: an array has at most this many dimensions.
pub const MAX_ARRAY_DIMENSIONS: usize = 6;

fn array_literal(raw: &str) -> Result<String, Unstorable> {
    let mut elem_type = None;
    let mut out = String::with_capacity(raw.len());
    write_array(raw, 1, &mut elem_type, &mut out)?;
    Ok(out)
}

/// Writes one (possibly nested) list as array_out would print it. Returns its shape,
/// to check that nested lists are rectangular. `depth` is this list's dimension: the
/// recursion stops at PostgreSQL's limit, so neither the stack nor the cost (each level
/// re-reads its own text) grows with how deep a hostile document nests.
fn write_array(
    raw: &str,
    depth: usize,
    elem_type: &mut Option<ElemType>,
    out: &mut String,
) -> Result<Vec<usize>, Unstorable> {
    if depth > MAX_ARRAY_DIMENSIONS {
        return Err(Unstorable::TooManyDimensions);
    }
    let items: Vec<&serde_json::value::RawValue> =
        serde_json::from_str(raw).map_err(|_| Unstorable::ListNotArrayLiteral)?;
    out.push('{');
    let mut shape: Option<Vec<usize>> = None;
    for (n, item) in items.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        let item = item.get();
        let this_shape = match kind(item) {
            Kind::Array => {
                let inner = write_array(item, depth + 1, elem_type, out)?;
                if inner.first() == Some(&0) {
                    return Err(Unstorable::ListNotArrayLiteral);
                }
                inner
            }
            Kind::Object => return Err(Unstorable::ListNotArrayLiteral),
            Kind::Null => {
                out.push_str("NULL");
                Vec::new()
            }
            k => {
                let (t, text) = match k {
                    Kind::True => (ElemType::Bool, Cow::Borrowed("t")),
                    Kind::False => (ElemType::Bool, Cow::Borrowed("f")),
                    Kind::Number => {
                        let text = number_text(item);
                        if text.ends_with("Infinity") {
                            return Err(Unstorable::ListNotArrayLiteral);
                        }
                        (ElemType::Numeric, Cow::Owned(text))
                    }
                    _ => {
                        let decoded = decode_string(item);
                        let s = decoded.storable()?.to_owned();
                        (ElemType::Text, Cow::Owned(s))
                    }
                };
                if *elem_type.get_or_insert(t) != t {
                    return Err(Unstorable::ListNotArrayLiteral);
                }
                push_array_element(out, &text);
                Vec::new()
            }
        };
        // A NULL element may stand where a sub-list does only in one dimension.
        let is_null = kind(item) == Kind::Null;
        match &shape {
            None => shape = Some(this_shape),
            Some(s) if *s == this_shape => {}
            Some(s) if is_null && s.is_empty() => {}
            _ => return Err(Unstorable::ListNotArrayLiteral),
        }
        if is_null && shape.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(Unstorable::ListNotArrayLiteral);
        }
    }
    out.push('}');
    let mut dims = vec![items.len()];
    dims.extend(shape.unwrap_or_default());
    Ok(dims)
}

/// array_out's quoting: quote when empty, "NULL", or holding a delimiter, brace, quote,
/// backslash or whitespace.
fn push_array_element(out: &mut String, s: &str) {
    let needs_quotes = s.is_empty()
        || s.eq_ignore_ascii_case("NULL")
        || s.bytes().any(|b| matches!(b, b'{' | b'}' | b',' | b'"' | b'\\' | b' ' | b'\t' | b'\n' | b'\r' | 0x0B | 0x0C));
    if !needs_quotes {
        out.push_str(s);
        return;
    }
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// The `done` column: SQLAlchemy's Boolean accepts only None, True, False and values
/// equal to them (0, 1, 0.0, 1.0); anything else fails the insert.
pub fn done_column(raw: Option<&str>) -> Result<Option<bool>, Unstorable> {
    let Some(raw) = raw else { return Ok(Some(true)) };
    match kind(raw) {
        Kind::Null => Ok(None),
        Kind::True => Ok(Some(true)),
        Kind::False => Ok(Some(false)),
        Kind::Number => {
            let value = if is_integer_literal(raw) {
                let digits = raw.trim_start_matches('-').trim_start_matches('0');
                match digits {
                    "" => Some(false),
                    "1" if !raw.starts_with('-') => Some(true),
                    _ => None,
                }
            } else {
                match raw.parse::<f64>() {
                    Ok(f) if f == 0.0 => Some(false),
                    Ok(f) if f == 1.0 => Some(true),
                    _ => None,
                }
            };
            value.map(Some).ok_or(Unstorable::NotBoolean)
        }
        _ => Err(Unstorable::NotBoolean),
    }
}

/// Seconds since 2020-01-01, the reference's lower bound for a plausible timestamp.
pub const MIN_TIMESTAMP: i64 = 1_577_836_800;
/// Above this a timestamp is taken to be in milliseconds.
pub const MILLISECONDS_ABOVE: i64 = 10_000_000_000;

/// `created_at` / `updated_at`: `int(float(timestamp))`, milliseconds scaled down, and
/// anything before 2020 or more than a day after `now` replaced by `now`.
pub fn timestamp_column(raw: Option<&str>, now: i64) -> i64 {
    let Some(seconds) = raw.and_then(python_float) else { return now };
    if !seconds.is_finite() {
        return now;
    }
    let t = seconds.trunc();
    // Past this, even divided by 1000 it is beyond any plausible `now`.
    if t.abs() >= 1e17 {
        return now;
    }
    let mut t = t as i64;
    if t > MILLISECONDS_ABOVE {
        t = t.div_euclid(1000);
    }
    if t < MIN_TIMESTAMP || t > now.saturating_add(86_400) {
        return now;
    }
    t
}

/// Python's `float(json.loads(raw))`, or `None` where it raises.
fn python_float(raw: &str) -> Option<f64> {
    match kind(raw) {
        Kind::True => Some(1.0),
        Kind::False => Some(0.0),
        Kind::Number => raw.parse::<f64>().ok(),
        Kind::String => python_float_from_str(decode_string(raw).storable().ok()?),
        _ => None,
    }
}

/// Python's `float(str)`: surrounding whitespace, a sign, digits with single underscores
/// between them, an optional fraction and exponent; `inf`/`nan` spellings parse too.
fn python_float_from_str(s: &str) -> Option<f64> {
    let s = s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c));
    let unsigned = s.strip_prefix(['+', '-']).unwrap_or(s);
    let lower = unsigned.to_ascii_lowercase();
    if matches!(lower.as_str(), "inf" | "infinity" | "nan") {
        return Some(f64::INFINITY);
    }
    let bytes = s.as_bytes();
    let mut cleaned = String::with_capacity(s.len());
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-' => cleaned.push(b as char),
            b'_' if i > 0
                && i + 1 < bytes.len()
                && bytes[i - 1].is_ascii_digit()
                && bytes[i + 1].is_ascii_digit() => {}
            _ => return None,
        }
    }
    // Rust accepts "inf"/"nan" words and nothing Python rejects among what remains,
    // except a bare sign or dot, which both reject.
    cleaned.parse::<f64>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_escapes_and_keeps_lone_surrogates() {
        assert_eq!(decode_string(r#""a\nb""#).storable().unwrap(), "a\nb");
        assert_eq!(decode_string(r#""\ud83d\ude00""#).storable().unwrap(), "😀");
        assert_eq!(decode_string(r#""x\ud800""#).storable(), Err(Unstorable::UnpairedSurrogate));
        assert_eq!(decode_string(r#""x\udc00\ud800""#).display(), "x\\udc00\\ud800");
        assert_eq!(decode_string(r#""a\u0000""#).storable(), Err(Unstorable::ContainsNul));
        assert_ne!(decode_string(r#""\ud800""#), decode_string(r#""\ud801""#));
        assert_eq!(decode_string(r#""\uD800""#), decode_string(r#""\ud800""#));
    }

    #[test]
    fn truthiness_matches_python() {
        for falsy in ["null", "false", "0", "-0", "0.0", "0e5", "1e-400", "\"\"", "[]", "[ ]", "{}", "{\n}"] {
            assert!(!is_truthy(falsy), "{falsy}");
        }
        for truthy in ["true", "1", "0.1", "\"0\"", "\" \"", "[0]", "{\"a\":1}", "-1"] {
            assert!(is_truthy(truthy), "{truthy}");
        }
    }

    #[test]
    fn text_of_numbers_follows_psycopg2_and_numeric() {
        let t = |raw| text_column(raw).unwrap().unwrap().into_owned();
        assert_eq!(t("42"), "42");
        assert_eq!(t("-0"), "0");
        assert_eq!(t("1.5"), "1.5");
        assert_eq!(t("1.0"), "1.0");
        assert_eq!(t("1e2"), "100.0");
        assert_eq!(t("1e16"), "10000000000000000");
        assert_eq!(t("1.5e-5"), "0.000015");
        assert_eq!(t("0.0001"), "0.0001");
        assert_eq!(t("-0.0"), "0.0");
        assert_eq!(t("1e400"), "Infinity");
        assert_eq!(t("-1e400"), "-Infinity");
        let big = "9".repeat(400);
        assert_eq!(t(&big), big);
    }

    #[test]
    fn lists_become_array_literals() {
        let t = |raw| text_column(raw).map(|v| v.unwrap().into_owned());
        assert_eq!(t(r#"["a","b"]"#).unwrap(), "{a,b}");
        assert_eq!(t("[]").unwrap(), "{}");
        assert_eq!(t(r#"["a b","", "null", "q\"", null]"#).unwrap(), r#"{"a b","","null","q\"",NULL}"#);
        assert_eq!(t("[1, 2.5]").unwrap(), "{1,2.5}");
        assert_eq!(t("[true,false]").unwrap(), "{t,f}");
        assert_eq!(t(r#"[["a"],["b"]]"#).unwrap(), "{{a},{b}}");
        assert_eq!(t(r#"[["a"],["b","c"]]"#), Err(Unstorable::ListNotArrayLiteral));
        assert_eq!(t(r#"["a", 1]"#), Err(Unstorable::ListNotArrayLiteral));
        assert_eq!(t(r#"[{"a":1}]"#), Err(Unstorable::ListNotArrayLiteral));
        assert_eq!(t(r#"["\u0000"]"#), Err(Unstorable::ContainsNul));
        assert_eq!(t(r#"{"a":1}"#), Err(Unstorable::ObjectInTextColumn));
    }

    #[test]
    fn lists_deeper_than_six_dimensions_are_refused_without_recursing_into_them() {
        let t = |raw: &str| text_column(raw).map(|v| v.unwrap().into_owned());
        let nested = |n: usize| format!("{}\"x\"{}", "[".repeat(n), "]".repeat(n));
        assert_eq!(t(&nested(6)).unwrap(), format!("{}x{}", "{".repeat(6), "}".repeat(6)));
        assert_eq!(t(&nested(7)), Err(Unstorable::TooManyDimensions));
        // Deep enough to overflow any stack if each level recursed (the 0.1.0 crash).
        assert_eq!(t(&nested(1_000_000)), Err(Unstorable::TooManyDimensions));
    }

    #[test]
    fn done_accepts_only_boolean_equivalents() {
        assert_eq!(done_column(None), Ok(Some(true)));
        assert_eq!(done_column(Some("null")), Ok(None));
        for (raw, want) in [("0", false), ("1", true), ("0.0", false), ("1.0", true), ("1e0", true), ("-0", false)] {
            assert_eq!(done_column(Some(raw)), Ok(Some(want)), "{raw}");
        }
        for raw in ["2", "-1", "\"true\"", "[]", "{}", "0.5", "-1.0"] {
            assert_eq!(done_column(Some(raw)), Err(Unstorable::NotBoolean), "{raw}");
        }
    }

    #[test]
    fn timestamps_follow_the_reference() {
        let now = 1_760_000_000;
        let ts = |raw: Option<&str>| timestamp_column(raw, now);
        assert_eq!(ts(None), now);
        assert_eq!(ts(Some("1700000000")), 1_700_000_000);
        assert_eq!(ts(Some("1700000000.9")), 1_700_000_000);
        assert_eq!(ts(Some("1700000000123")), 1_700_000_000);
        assert_eq!(ts(Some("10000000000")), now); // not divided, then beyond now + 1 day
        assert_eq!(ts(Some("\" 1.7e9\\n\"")), 1_700_000_000);
        assert_eq!(ts(Some("\"1_700_000_000\"")), 1_700_000_000);
        assert_eq!(ts(Some("\"garbage\"")), now);
        assert_eq!(ts(Some("\"inf\"")), now);
        assert_eq!(ts(Some("\"NaN\"")), now);
        assert_eq!(ts(Some("true")), now);
        assert_eq!(ts(Some("null")), now);
        assert_eq!(ts(Some("1e400")), now);
        assert_eq!(ts(Some("1577836800")), 1_577_836_800);
        assert_eq!(ts(Some("1577836799")), now);
        assert_eq!(ts(Some(&(now + 86_400).to_string())), now + 86_400);
        assert_eq!(ts(Some(&(now + 86_401).to_string())), now);
        assert_eq!(ts(Some("[1700000000]")), now);
    }
}
