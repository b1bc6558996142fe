//! JSON text rewriting: a value as the app stores it in a `json` column (NULs and lone
//! surrogates removed, numbers as the app's codec writes them), borrowed when nothing changes.

use std::borrow::Cow;
use crate::scalar::{self, decode_string};

use super::message::Codec;
use super::scan::{Token, fits_64_bits, needs_sanitizing, walk_tokens};

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
            Token::Number if scalar::is_integer_literal(text) && !fits_64_bits(text) => {
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
