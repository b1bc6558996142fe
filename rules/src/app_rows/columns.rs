//! Column building: one message's row as the app builds it (`_build_message`, `get_usage`),
//! each value as psycopg 3 and SQLAlchemy's casts store it, or why the app fails on it.

use std::borrow::Cow;
use crate::scalar::{self, decode_string, kind, Kind};

use super::message::{Codec, Fields, sanitized, shown, truthy};
use super::scan::{fits_64_bits, member};
use super::json_text::json_value;
use super::python_int::normalize_usage;

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
pub(super) fn entry<'a>(key: Cow<'a, str>, raw: &'a str, fields: Option<Fields<'a>>, now: i64, server: Server, codec: Codec) -> AppEntry<'a> {
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

/// `a or b`: `a` if truthy, else `b` as it is (maybe falsy, maybe missing).
pub(super) fn or<'a>(a: Option<&'a str>, b: Option<&'a str>) -> Option<&'a str> {
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
pub(super) fn text<'a>(raw: &'a str, column: &'static str, codec: Codec) -> Result<Option<Cow<'a, str>>, Failure> {
    Ok(Some(match kind(raw) {
        Kind::Null => return Ok(None),
        Kind::True => Cow::Borrowed("true"),
        Kind::False => Cow::Borrowed("false"),
        Kind::String => sanitized(decode_string(raw)),
        Kind::Number if scalar::is_integer_literal(raw) && (codec.exact_ints || fits_64_bits(raw)) => Cow::Owned(scalar::integer_text(raw)),
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
        Kind::Number if scalar::is_integer_literal(raw) => raw.parse::<i64>().map_err(|_| out_of_range()),
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
pub(super) fn usage(f: &Fields<'_>, codec: Codec) -> Result<Option<String>, Failure> {
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
