//! Python's arithmetic where `normalize_usage` needs it: integers of any size, `int()`, `+`
//! across types, and the normalized usage object.

use crate::migration_rows::Keys;
use crate::scalar::{self, decode_string, kind, Kind};

use super::message::{Codec, shown, truthy};
use super::scan::{fits_64_bits, member, members};
use super::json_text::json_value;

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
            Kind::Number if scalar::is_integer_literal(raw) && (codec.exact_ints || fits_64_bits(raw)) => {
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
pub(super) fn normalize_usage(usage: &str, codec: Codec) -> Result<String, String> {
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
