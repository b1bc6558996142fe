//! The oracle is `find_messages_and_current` on the whole text: every test feeds the same
//! text in pieces and asks for the same answer.

use std::collections::HashSet;

use proptest::prelude::*;

use super::*;
use crate::migration_rows::tests::arb_json;
use crate::migration_rows::{dedupe_keys, find_messages_and_current};

/// Feeds `doc` cut into pieces of the given sizes, cycled (none: whole).
fn stream(doc: &[u8], sizes: &[usize], keys: Keys) -> Result<Streamed, ChatSkip> {
    let mut index = StreamIndex::new(keys);
    let mut rest = doc;
    let mut n = 0;
    while !rest.is_empty() {
        let size = if sizes.is_empty() { rest.len() } else { sizes[n % sizes.len()].clamp(1, rest.len()) };
        n += 1;
        index.feed(&rest[..size], &mut || {})?;
        rest = &rest[size..];
    }
    index.finish(&mut || {})
}

/// Whether the stream agrees with the oracle on `doc`. `RepeatedKeys` must come exactly
/// when the final messages object repeats a decoded key, and resolve to the oracle's spans.
fn agree(doc: &str, sizes: &[usize], keys: Keys) -> Result<(), String> {
    let want = find_messages_and_current(doc, &mut || {}, keys);
    let got = stream(doc.as_bytes(), sizes, keys);
    match (&want, &got) {
        (Err(a), Err(b)) if a == b => Ok(()),
        (Ok((found, current)), Ok(Streamed::Indexed(f, c))) if found == f && current == c => Ok(()),
        (Ok((Found::Messages(spans), current)), Ok(Streamed::RepeatedKeys { spans: raw, current_id }))
            if current == current_id =>
        {
            let mut seen = HashSet::new();
            if raw.iter().all(|s| seen.insert(keys.of(s.key(doc)).into_owned())) {
                return Err(format!("RepeatedKeys without a repeated key in {doc:?}"));
            }
            if &dedupe_keys(doc, raw.clone(), &mut || {}, keys) != spans {
                return Err(format!("RepeatedKeys' spans do not resolve to the oracle's in {doc:?}"));
            }
            Ok(())
        }
        _ => Err(format!("{doc:?} split {sizes:?}: whole {want:?}, streamed {got:?}")),
    }
}

fn both_keys(doc: &str, sizes: &[usize]) -> Result<(), TestCaseError> {
    for keys in [Keys::Exact, Keys::Sanitized] {
        agree(doc, sizes, keys).map_err(TestCaseError::fail)?;
    }
    Ok(())
}

/// Every split: whole, one byte at a time, and a few fixed sizes.
fn all_splits(doc: &str) {
    for sizes in [&[][..], &[1], &[2], &[3], &[7], &[1, 5, 2]] {
        for keys in [Keys::Exact, Keys::Sanitized] {
            if let Err(e) = agree(doc, sizes, keys) {
                panic!("{e}");
            }
        }
    }
}

fn streamed(doc: &str, keys: Keys) -> Result<Streamed, ChatSkip> {
    let whole = stream(doc.as_bytes(), &[], keys);
    assert_eq!(whole, stream(doc.as_bytes(), &[1], keys), "{doc:?}");
    whole
}

fn found(doc: &str) -> Result<Found, ChatSkip> {
    all_splits(doc);
    match streamed(doc, Keys::Exact)? {
        Streamed::Indexed(found, _) => Ok(found),
        other => panic!("{doc:?}: {other:?}"),
    }
}

#[test]
fn escaped_keys_are_compared_decoded() {
    let doc = r#"{"\u0068istory":{"mess\u0061ges":{"a":1},"current\u0049d":"x"}}"#;
    all_splits(doc);
    let Ok(Streamed::Indexed(Found::Messages(spans), Some(current))) = streamed(doc, Keys::Exact) else { panic!() };
    assert_eq!(spans.len(), 1);
    assert_eq!(&doc[current], r#""x""#);
}

#[test]
fn sanitized_keys_drop_nul_and_lone_surrogates() {
    let doc = r#"{"hist\u0000ory\ud800":{"messages":{"a":1}}}"#;
    all_splits(doc);
    assert_eq!(streamed(doc, Keys::Exact), Ok(Streamed::Indexed(Found::NoHistory, None)));
    assert!(matches!(streamed(doc, Keys::Sanitized), Ok(Streamed::Indexed(Found::Messages(_), None))));
    // However many of them: the comparison buffer holds what is left, not the text.
    let doc = format!(r#"{{"h{}istory":{{"mes\udfffsages":[0]}}}}"#, "\\u0000".repeat(50));
    all_splits(&doc);
    assert_eq!(streamed(&doc, Keys::Sanitized), Ok(Streamed::Indexed(Found::MessagesNotObject { truthy: true }, None)));
    // Sanitized, "a\u0000" and "a" are one key.
    let doc = r#"{"history":{"messages":{"a\u0000":1,"a":2}}}"#;
    all_splits(doc);
    assert!(matches!(streamed(doc, Keys::Exact), Ok(Streamed::Indexed(..))));
    assert!(matches!(streamed(doc, Keys::Sanitized), Ok(Streamed::RepeatedKeys { .. })));
}

#[test]
fn the_last_duplicate_of_each_level_key_wins() {
    assert_eq!(found(r#"{"history":{"messages":{"a":1}},"history":2}"#), Ok(Found::HistoryNotObject));
    assert_eq!(found(r#"{"history":2,"history":{}}"#), Ok(Found::NoMessages));
    assert_eq!(found(r#"{"history":{"messages":[1],"messages":{}}}"#), Ok(Found::Messages(vec![])));
    assert_eq!(found(r#"{"history":{"messages":{},"messages":[1]}}"#), Ok(Found::MessagesNotObject { truthy: true }));
    // currentId: the last one of the last history object.
    let doc = r#"{"history":{"currentId":1,"currentId":  [2 ] },"x":0}"#;
    all_splits(doc);
    let Ok(Streamed::Indexed(_, Some(r))) = streamed(doc, Keys::Exact) else { panic!() };
    assert_eq!(&doc[r], "[2 ]");
    let doc = r#"{"history":{"currentId":1},"history":{"messages":{}}}"#;
    assert_eq!(streamed(doc, Keys::Exact), Ok(Streamed::Indexed(Found::Messages(vec![]), None)));
}

#[test]
fn a_superseded_repeat_is_not_reported() {
    let doc = r#"{"history":{"messages":{"a":1,"a":2},"messages":{"a":3}}}"#;
    all_splits(doc);
    assert!(matches!(streamed(doc, Keys::Exact), Ok(Streamed::Indexed(Found::Messages(s), None)) if s.len() == 1));
    let doc = r#"{"history":{"messages":{"a":1}},"history":{"messages":{"\u0061":1,"a":2}}}"#;
    all_splits(doc);
    assert!(matches!(streamed(doc, Keys::Exact), Ok(Streamed::RepeatedKeys { spans, .. }) if spans.len() == 2));
}

#[test]
fn level_values_are_read_as_python_truthiness() {
    for (level, truthy) in [
        ("[]", false),
        ("[0]", true),
        (" [ ] ", false),
        ("\"\"", false),
        ("\"\\u0000\"", false),
        ("\"\\u0000a\"", true),
        ("\"\\ud83d\\ude00\"", true),
        ("0", false),
        ("-0", false),
        ("-0.0", false),
        ("0e7", false),
        ("1e-400", false),
        ("0.0000001", true),
        ("123456789012345678901234567890", true),
        ("-9223372036854775809", true),
        ("true", true),
        ("false", false),
        ("null", false),
    ] {
        let doc = format!(r#"{{"history":{{"messages":{level}}}}}"#);
        assert_eq!(found(&doc), Ok(Found::MessagesNotObject { truthy }), "{doc}");
        let doc = format!(r#"{{"history":{level}}}"#);
        assert_eq!(found(&doc), Ok(Found::HistoryNotObject), "{doc}");
    }
}

#[test]
fn level_values_are_checked_as_deserialize_any_does() {
    // Out of f64's range, or a lone surrogate in a decoded string: refused at a level
    // position (even one a later duplicate replaces), accepted anywhere else.
    for bad in ["1e400", "-1e400", "\"\\ud800\"", "\"\\udc00\"", "\"\\ud800\\u0041\"", "\"\\ud800x\"", "\"\\ud800\\n\""] {
        let long_integer = "1".repeat(400);
        for value in [bad, long_integer.as_str()] {
            for doc in [
                format!(r#"{{"history":{value}}}"#),
                format!(r#"{{"history":{value},"history":{{}}}}"#),
                format!(r#"{{"history":{{"messages":{value},"messages":{{}}}}}}"#),
            ] {
                assert_eq!(found(&doc), Err(ChatSkip::NotJson), "{doc}");
            }
            for doc in [
                format!(r#"{{"x":{value}}}"#),
                format!(r#"{{"history":[{value}]}}"#),
                format!(r#"{{"history":{{"currentId":{value},"messages":{{"{bad_key}":{value}}}}}}}"#, bad_key = "\\ud800"),
            ] {
                assert!(found(&doc).is_ok(), "{doc}");
            }
        }
    }
}

#[test]
fn a_long_level_number_defers_to_the_whole_document() {
    let long = format!("1{}e-2000", "0".repeat(2000));
    let doc = format!(r#"{{"history":{long}}}"#);
    assert!(find_messages_and_current(&doc, &mut || {}, Keys::Exact).is_ok());
    assert_eq!(stream(doc.as_bytes(), &[3], Keys::Exact), Ok(Streamed::ReadWhole(WhyWhole::LongLevelNumber)));
    // An error elsewhere still decides.
    assert_eq!(stream(format!("{doc} x").as_bytes(), &[], Keys::Exact), Err(ChatSkip::NotJson));
    // Exactly MAX_LEVEL_NUMBER bytes is still checked here.
    let edge = format!("1{}", "0".repeat(MAX_LEVEL_NUMBER - 1));
    all_splits(&format!(r#"{{"history":{edge}}}"#));
}

#[test]
fn skipped_values_nest_without_limit_but_levels_are_shallow() {
    for depth in [126, 127, 128, 129, 130, 100_000] {
        let deep = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let deep_obj = format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
        for value in [&deep, &deep_obj] {
            for doc in [
                format!(r#"{{"x":{value}}}"#),
                format!(r#"{{"history":[{value}]}}"#),
                format!(r#"{{"history":{{"messages":[{value}]}}}}"#),
                format!(r#"{{"history":{{"currentId":{value},"messages":{{"m":{value}}}}}}}"#),
            ] {
                let sizes: &[usize] = if depth > 1000 { &[4093] } else { &[1] };
                both_keys(&doc, sizes).unwrap();
                assert!(stream(doc.as_bytes(), sizes, Keys::Exact).is_ok());
                // One bracket short is an error at any depth.
                both_keys(&doc[..doc.len() - 2], sizes).unwrap();
            }
        }
    }
}

#[test]
fn nesting_beyond_the_bit_stack_gives_up() {
    let depth = MAX_SKIPPED_DEPTH as usize + 1;
    let doc = format!(r#"{{"x":{}{}}}"#, "[".repeat(depth), "]".repeat(depth));
    let mut index = StreamIndex::new(Keys::Exact);
    index.feed(doc.as_bytes(), &mut || {}).unwrap();
    assert!(index.gave_up());
    assert_eq!(index.finish(&mut || {}), Ok(Streamed::ReadWhole(WhyWhole::DeepNesting)));
}

#[test]
fn strings_are_validated_everywhere() {
    for bad in ["\"\u{1}\"", "\"\t\"", "\"\\x\"", "\"\\u12\"", "\"\\u12g4\"", "\"\\\"", "\"abc"] {
        for doc in [format!(r#"{{"x":{bad}}}"#), format!(r#"{{{bad}:1}}"#), format!(r#"{{"history":{{"messages":{{{bad}:1}}}}}}"#)] {
            assert_eq!(found(&doc), Err(ChatSkip::NotJson), "{doc}");
        }
    }
    // Lone surrogates in keys and skipped strings are fine; hex in either case; DEL and
    // non-ASCII pass.
    found(r#"{"\udc00":"\ud800","history":{"messages":{"\uDBFF\uDFFF":"\u00e9\u007f","é":1}}}"#).unwrap();
}

#[test]
fn grammar_edges() {
    for bad in [
        "", " ", "{", "}", "[]", "1", "\"{}\"", "{}x", "{} {}", "{,}", r#"{"a":1,}"#, r#"{"a":[1,]}"#, r#"{"a":[,1]}"#,
        r#"{"a"}"#, r#"{"a":}"#, r#"{"a" 1}"#, r#"{"a":01}"#, r#"{"a":1.}"#, r#"{"a":.5}"#, r#"{"a":1e}"#, r#"{"a":1e+}"#,
        r#"{"a":-}"#, r#"{"a":+1}"#, r#"{"a":tru}"#, r#"{"a":truex}"#, r#"{"a":nul}"#, r#"{"a":1 2}"#, r#"{"a":[}"#,
        r#"{"a":[1}"#, r#"{"a":{]}"#, r#"{1:2}"#, "{\u{b}}", "\u{feff}{}", r#"{"a":1x}"#, r#"{"history":01}"#,
        r#"{"history":{"messages":-}}"#, r#"{"history":{"messages":{"a":1}"#,
    ] {
        assert_eq!(found(bad), Err(ChatSkip::NotJson), "{bad:?}");
    }
    for good in [
        "{}", " \t\r\n{ } \n", r#"{"a":-0.0e-0}"#, r#"{"a":[0,-1,2.5E+3,true,false,null,"",{}]}"#, r#"{"":{"":[]}}"#,
        r#"{"history":{"messages":{"":{}}}}"#,
    ] {
        assert!(found(good).is_ok(), "{good:?}");
    }
}

#[test]
fn offsets_are_those_of_the_whole_text_and_leading_whitespace_is_reported() {
    let doc = " \n\t{\"history\" : { \"messages\" : { \"a\" :  {\"role\":\"u\"} , \"b\":[ ]}, \"currentId\" : \"a\" } }  ";
    all_splits(doc);
    let mut index = StreamIndex::new(Keys::Exact);
    index.feed(doc.as_bytes(), &mut || {}).unwrap();
    assert_eq!(index.leading_whitespace(), 3);
    let Ok(Streamed::Indexed(Found::Messages(spans), Some(current))) = index.finish(&mut || {}) else { panic!() };
    assert_eq!(spans[0].key(doc), "\"a\"");
    assert_eq!(spans[0].value(doc), "{\"role\":\"u\"}");
    assert_eq!(spans[1].value(doc), "[ ]");
    assert_eq!(&doc[current], "\"a\"");
    // Document::open's spans are relative to the trimmed text: the same less 3.
    let opened = crate::migration_rows::Document::open(Some(doc)).unwrap();
    let trimmed = opened.index().unwrap();
    assert_eq!(trimmed[0].key(opened.text()), "\"a\"");
    let shift = |s: &Span| {
        let k = s.key(doc).as_ptr() as usize - doc.as_ptr() as usize - 3;
        let v = s.value(doc).as_ptr() as usize - doc.as_ptr() as usize - 3;
        (k, v)
    };
    let at = |s: &Span, text: &str| {
        (s.key(text).as_ptr() as usize - text.as_ptr() as usize, s.value(text).as_ptr() as usize - text.as_ptr() as usize)
    };
    assert_eq!(spans.iter().map(shift).collect::<Vec<_>>(), trimmed.iter().map(|s| at(s, opened.text())).collect::<Vec<_>>());
}

#[test]
fn poll_is_called_every_poll_every_messages_and_every_few_megabytes() {
    let many: Vec<String> = (0..3 * POLL_EVERY).map(|i| format!("\"{i}\":0")).collect();
    let doc = format!(r#"{{"history":{{"messages":{{{}}}}}}}"#, many.join(","));
    let mut index = StreamIndex::new(Keys::Exact);
    let mut polls = 0;
    for piece in doc.as_bytes().chunks(100) {
        index.feed(piece, &mut || polls += 1).unwrap();
    }
    assert!(polls >= 3);
    let big = format!(r#"{{"x":"{}"}}"#, "a".repeat(5 * POLL_BYTES));
    let mut index = StreamIndex::new(Keys::Exact);
    let mut polls = 0;
    for piece in big.as_bytes().chunks(2048) {
        index.feed(piece, &mut || polls += 1).unwrap();
    }
    assert!(polls >= 5);
}

#[test]
fn surrogates_in_keys_pair_as_decode_string_does() {
    // A high surrogate before another high one stays alone; the second pairs with the low.
    let doc = r#"{"history":{"messages":{"\ud800\ud800\udc00":1,"\ud800\ud800\uDC00":2,"\ud800\u00e9":3,"\ud800é":4}}}"#;
    all_splits(doc);
    let Ok(Streamed::RepeatedKeys { spans, .. }) = streamed(doc, Keys::Exact) else { panic!() };
    assert_eq!(spans.len(), 4);
    // The edges of the surrogate ranges: U+10FFFF escaped is the character itself.
    let doc = "{\"history\":{\"messages\":{\"\\udbff\\udfff\":1,\"\u{10FFFF}\":2}}}";
    all_splits(doc);
    assert!(matches!(streamed(doc, Keys::Exact), Ok(Streamed::RepeatedKeys { .. })));
    assert_eq!(found(r#"{"history":{"messages":"\udbff\udfff"}}"#), Ok(Found::MessagesNotObject { truthy: true }));
    assert_eq!(found(r#"{"history":{"messages":"\ud7ff\ue000"}}"#), Ok(Found::MessagesNotObject { truthy: true }));
    assert_eq!(found(r#"{"history":{"messages":"\udbff\ue000"}}"#), Err(ChatSkip::NotJson));
    assert_eq!(found(r#"{"history":{"messages":"\ud800\udbff"}}"#), Err(ChatSkip::NotJson));
    // A surrogate next to other escapes.
    found(r#"{"\ud800\n":1,"\udc00\ud800":2,"history":{"messages":{"\ud800\"":1,"\ud800\\":2}}}"#).unwrap();
}

#[test]
fn a_hash_collision_is_reported_as_a_repeat_and_resolves_to_both_keys() {
    // No SipHash collision is known between short keys: plant the hash "b" will have.
    let doc = r#"{"history":{"messages":{"a":1,"b":2}}}"#;
    let (head, tail) = doc.split_at(doc.find(",\"b\"").unwrap());
    let mut index = StreamIndex::new(Keys::Exact);
    index.feed(head.as_bytes(), &mut || {}).unwrap();
    let mut hasher = DefaultHasher::new();
    hasher.write(b"b");
    hasher.write_u64(1);
    index.hashes.insert(hasher.finish());
    index.feed(tail.as_bytes(), &mut || {}).unwrap();
    let Ok(Streamed::RepeatedKeys { spans, current_id: None }) = index.finish(&mut || {}) else { panic!() };
    let Ok((Found::Messages(want), None)) = find_messages_and_current(doc, &mut || {}, Keys::Exact) else { panic!() };
    assert_eq!(dedupe_keys(doc, spans, &mut || {}, Keys::Exact), want);
    assert_eq!(want.len(), 2);
}

#[test]
fn more_than_u32_max_bytes_is_not_json() {
    let mut index = StreamIndex::new(Keys::Exact);
    index.feed(b"{", &mut || {}).unwrap();
    // As if 4 GB had been fed.
    index.pos = MAX_DOCUMENT_BYTES - 1;
    index.feed(b"}", &mut || {}).unwrap();
    assert_eq!(index.feed(b" ", &mut || {}), Err(ChatSkip::NotJson));
}

#[test]
fn an_error_is_final() {
    let mut index = StreamIndex::new(Keys::Exact);
    assert_eq!(index.feed(b"{x", &mut || {}), Err(ChatSkip::NotJson));
    assert_eq!(index.feed(b"}", &mut || {}), Err(ChatSkip::NotJson));
    assert_eq!(index.finish(&mut || {}), Err(ChatSkip::NotJson));
    // Invalid UTF-8 never panics.
    let mut index = StreamIndex::new(Keys::Sanitized);
    let _ = index.feed(b"{\"history\":{\"messages\":{\"\xff\xed\":\"\xc3\"}}}", &mut || {});
    let _ = index.finish(&mut || {});
}

// ---- Generated documents ----

fn ws() -> impl Strategy<Value = &'static str> {
    prop_oneof![4 => Just(""), 1 => Just(" "), 1 => Just("\n\t "), 1 => Just("\r\n")]
}

fn key_like(word: &'static str) -> impl Strategy<Value = String> {
    let escaped_first = format!("\"\\u{:04x}{}\"", word.as_bytes()[0], &word[1..]);
    let escaped_last = format!("\"{}\\u{:04X}\"", &word[..word.len() - 1], word.as_bytes()[word.len() - 1]);
    let with_nul = format!("\"{}\\u0000{}\"", &word[..2], &word[2..]);
    let with_surrogate = format!("\"{word}\\udbff\"");
    let paired = format!("\"{word}\\ud83d\\ude00\"");
    prop_oneof![
        14 => Just(format!("\"{word}\"")),
        1 => Just(escaped_first),
        1 => Just(escaped_last),
        1 => Just(with_nul),
        1 => Just(with_surrogate),
        1 => Just(paired),
        1 => Just(format!("\"{}\"", word.to_uppercase())),
        1 => Just(format!("\"{word}x\"")),
        1 => Just(format!("\"{word}{word}\"")),
    ]
}

pub(crate) fn json_text() -> impl Strategy<Value = String> {
    (arb_json(), any::<bool>()).prop_map(|(v, pretty)| {
        if pretty {
            serde_json::to_string_pretty(&v).unwrap()
        } else {
            v.to_string()
        }
    })
}

/// Values a level position must judge: every JSON type and the hard cases.
fn level_scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("[]".to_owned()),
        Just("[1, {\"history\":1}]".to_owned()),
        Just("\"\"".to_owned()),
        Just("\"\\u0000\"".to_owned()),
        Just("\"a\\\"b\"".to_owned()),
        Just("\"\\ud800\"".to_owned()),
        Just("\"\\udc00x\"".to_owned()),
        Just("\"\\ud83d\\ude00\"".to_owned()),
        Just("\"\\ud800\\ud800\"".to_owned()),
        Just("\"\\udbff\\udfff\"".to_owned()),
        Just("0".to_owned()),
        Just("-0".to_owned()),
        Just("-0.0".to_owned()),
        Just("1e400".to_owned()),
        Just("-1E+309".to_owned()),
        Just("1e-400".to_owned()),
        Just("0e5".to_owned()),
        Just("-0.0E-5".to_owned()),
        Just("1E2".to_owned()),
        Just("1.7976931348623157e308".to_owned()),
        Just("1.7976931348623159e308".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("-9223372036854775809".to_owned()),
        Just("true".to_owned()),
        Just("false".to_owned()),
        Just("null".to_owned()),
        (1usize..400).prop_map(|n| "9".repeat(n)),
        json_text(),
    ]
}

fn message_key() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just("\"a\"".to_owned()),
        1 => Just("\"\\u0061\"".to_owned()),
        1 => Just("\"b\"".to_owned()),
        1 => Just("\"a\\u0000\"".to_owned()),
        1 => Just("\"a\\ud800\"".to_owned()),
        1 => Just("\"\\ud800\"".to_owned()),
        1 => Just("\"\\udc00\"".to_owned()),
        1 => Just("\"\\ud800\\udc00\"".to_owned()),
        1 => Just("\"\u{10000}\"".to_owned()),
        1 => Just("\"\"".to_owned()),
        1 => Just("\"é\\u00e9\"".to_owned()),
        12 => "[a-z0-9]{1,4}".prop_map(|k| format!("\"{k}\"")),
        4 => "\\PC{0,80}".prop_map(|k| serde_json::Value::String(k).to_string()),
    ]
}

fn members(entries: Vec<(String, String)>, sep: &'static str) -> String {
    let body: Vec<String> = entries.into_iter().map(|(k, v)| format!("{sep}{k}{sep}:{sep}{v}{sep}")).collect();
    format!("{{{}}}", body.join(","))
}

fn messages_value() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (prop::collection::vec((message_key(), prop_oneof![4 => json_text(), 1 => level_scalar()]), 0..10), ws()).prop_map(|(e, sep)| members(e, sep)),
        1 => level_scalar(),
    ]
}

fn history_value() -> impl Strategy<Value = String> {
    let entry = prop_oneof![
        5 => (key_like("messages"), messages_value()),
        2 => (key_like("currentId"), prop_oneof![json_text(), level_scalar()]),
        1 => ("\"[a-z]{0,4}\"", json_text()),
    ];
    prop_oneof![
        5 => (prop::collection::vec(entry, 0..5), ws()).prop_map(|(e, sep)| members(e, sep)),
        1 => level_scalar(),
    ]
}

pub(crate) fn chat() -> impl Strategy<Value = String> {
    let entry = prop_oneof![
        6 => (key_like("history"), history_value()),
        1 => ("\"[a-z]{0,4}\"", json_text()),
        1 => ("\"x\"", history_value().prop_map(|h| format!("{{\"history\":{h}}}"))),
    ];
    (prop::collection::vec(entry, 1..5), ws(), ws()).prop_map(|(e, sep, outer)| format!("{outer}{}{outer}", members(e, sep)))
}

pub(crate) fn sizes() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![1 => Just(vec![1]), 1 => Just(vec![]), 3 => prop::collection::vec(1usize..40, 1..8)]
}

/// A mutation: truncation, one byte changed, removed or inserted.
pub(crate) fn mutate(doc: &str, kind: u8, at: usize, byte: u8) -> Option<String> {
    let mut b = doc.as_bytes().to_vec();
    let at = if b.is_empty() { 0 } else { at % (b.len() + 1) };
    match kind % 4 {
        0 => b.truncate(at),
        1 if at < b.len() => b[at] = byte,
        2 if at < b.len() => {
            b.remove(at);
        }
        _ => b.insert(at, byte),
    }
    String::from_utf8(b).ok()
}

pub(crate) fn interesting_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        prop::sample::select(b"\"\\{}[],: \n0-1e.Eu+atfnlr\x01\x1f\x7f/".to_vec()),
        any::<u8>().prop_map(|b| b & 0x7f),
    ]
}

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig { cases: n, failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(cases(5000))]

    #[test]
    fn generated_chats_agree(doc in chat(), sizes in sizes()) {
        both_keys(&doc, &sizes)?;
    }

    #[test]
    fn mutated_chats_agree(doc in chat(), kind in any::<u8>(), at in any::<usize>(), byte in interesting_byte(), sizes in sizes()) {
        if let Some(doc) = mutate(&doc, kind, at, byte) {
            both_keys(&doc, &sizes)?;
        }
    }

    #[test]
    fn arbitrary_json_in_chat_shapes_agrees(v in json_text(), w in json_text(), shape in 0u8..8, sizes in sizes()) {
        let doc = match shape {
            0 => v.clone(),
            1 => format!(r#"{{"history":{v}}}"#),
            2 => format!(r#"{{"history":{{"messages":{v}}}}}"#),
            3 => format!(r#"{{"history":{{"messages":{{"k":{v},"j":{w}}},"currentId":{w}}}}}"#),
            4 => format!(r#"{{"a":{v},"history":{{"currentId":{v},"messages":{w}}}}}"#),
            5 => format!(r#"{{"history":{v},"history":{{"messages":{w}}}}}"#),
            6 => format!(r#"{{"history":{{"messages":{v},"messages":{w}}}}}"#),
            _ => format!(r#"{{"history":{{"messages":{{"\u0061":{v},"a":{w}}}}}}}"#),
        };
        both_keys(&doc, &sizes)?;
    }

    #[test]
    fn deep_values_at_every_level_agree(depth in 125usize..132, objects in any::<bool>(), at in 0u8..5, cut in any::<bool>(), sizes in sizes()) {
        let v = if objects {
            format!("{}0{}", r#"{"history":"#.repeat(depth), "}".repeat(depth))
        } else {
            format!("{}{}", "[".repeat(depth), "]".repeat(depth))
        };
        let mut doc = match at {
            0 => format!(r#"{{"x":{v}}}"#),
            1 => format!(r#"{{"history":{v}}}"#),
            2 => format!(r#"{{"history":{{"messages":{v}}}}}"#),
            3 => format!(r#"{{"history":{{"messages":{{"m":{v}}}}}}}"#),
            _ => format!(r#"{{"history":{{"currentId":{v},"messages":{{}}}}}}"#),
        };
        if cut {
            doc.truncate(doc.len() / 2 + 1);
        }
        both_keys(&doc, &sizes)?;
    }

    /// Long strings with escapes, quotes and multi-byte characters anywhere, cut anywhere:
    /// the word-at-a-time scan across piece boundaries.
    #[test]
    fn long_strings_agree(parts in prop::collection::vec(prop_oneof![
        12 => "[a-z ]{0,30}",
        1 => Just("\\\"".to_owned()),
        1 => Just("\\\\".to_owned()),
        1 => Just("\\u00e9\\ud83d\\ude00".to_owned()),
        1 => Just("\\ud800".to_owned()),
        1 => Just("é€😀".to_owned()),
        1 => Just("\\n\\t\\/".to_owned()),
        1 => Just("\u{7f}".to_owned()),
        1 => Just("\u{1}".to_owned()),
    ], 0..24), at in 0u8..4, sizes in sizes()) {
        let text = parts.concat();
        let doc = match at {
            0 => format!(r#"{{"history":{{"messages":{{"{text}":{{"content":"{text}"}},"b":"{text}"}}}}}}"#),
            1 => format!(r#"{{"x":"{text}","history":{{"currentId":"{text}","messages":{{}}}}}}"#),
            2 => format!(r#"{{"history":{{"messages":"{text}"}}}}"#),
            _ => format!(r#"{{"{text}":1,"history":"{text}"}}"#),
        };
        both_keys(&doc, &sizes)?;
    }

    /// Any bytes at all, alone or where a key or a value goes: never a panic, and the
    /// oracle's answer whenever they are UTF-8.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..48), shape in 0u8..4, sizes in sizes()) {
        let doc: Vec<u8> = match shape {
            0 => bytes,
            1 => [&b"{\"history\":{\"messages\":{\""[..], &bytes, b"\":1}}}"].concat(),
            2 => [&b"{\"history\":\""[..], &bytes, b"\"}"].concat(),
            _ => [&b"{\"history\":{\"messages\":{\"a\":"[..], &bytes, b"}}}"].concat(),
        };
        for keys in [Keys::Exact, Keys::Sanitized] {
            let got = stream(&doc, &sizes, keys);
            if let Ok(text) = std::str::from_utf8(&doc) {
                agree(text, &sizes, keys).map_err(TestCaseError::fail)?;
            } else {
                prop_assert!(!matches!(got, Ok(Streamed::ReadWhole(_))));
            }
        }
    }

    /// The word-at-a-time scan stops where a byte-at-a-time one does, every byte value.
    #[test]
    fn string_run_finds_the_first_special_byte(b in prop::collection::vec(prop_oneof![12 => 0x20u8..=0xff, 1 => any::<u8>()], 0..64), skew in 0usize..8) {
        let b = &b[skew.min(b.len())..];
        let naive = b.iter().position(|&x| x == b'"' || x == b'\\' || x < 0x20).unwrap_or(b.len());
        prop_assert_eq!(string_run(b), naive);
    }

    #[test]
    fn garbage_agrees(doc in prop_oneof![
        "[{}\\[\\]\",:0-9a-z\\\\ .eE+\\-]{0,48}",
        "\\{\"history\":[{}\\[\\]\",:0-9a-z\\\\ .eE+\\-u]{0,40}\\}",
        "\\PC{0,64}",
    ], sizes in sizes()) {
        both_keys(&doc, &sizes)?;
    }
}

/// Times both indexes on `doc`: MB/s of the whole-text index and of this one in 2 KB slices.
fn race(name: &str, doc: &str, keys: Keys) {
    let mb = doc.len() as f64 / (1 << 20) as f64;
    let t = std::time::Instant::now();
    let (found, current) = find_messages_and_current(doc, &mut || {}, keys).unwrap();
    let whole = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let mut index = StreamIndex::new(keys);
    for piece in doc.as_bytes().chunks(2048) {
        index.feed(piece, &mut || {}).unwrap();
    }
    let got = index.finish(&mut || {}).unwrap();
    let streamed = t.elapsed().as_secs_f64();
    let n = match &found {
        Found::Messages(spans) => spans.len(),
        _ => 0,
    };
    assert_eq!(got, Streamed::Indexed(found, current));
    println!("{name}: {mb:.1} MB, {n} messages: whole text {:.0} MB/s, streamed in 2 KB slices {:.0} MB/s", mb / whole, mb / streamed);
}

/// The app rows' document scan (`scan` and the `\u0000` search) on the whole text against
/// `ShapeStream` in 2 KB slices.
fn shape_race(name: &str, doc: &str) {
    use crate::app_rows::scan::{scan, ShapeStream};
    let mb = doc.len() as f64 / (1 << 20) as f64;
    let t = std::time::Instant::now();
    let whole = (scan(doc).depth, doc.contains("\\u0000"));
    let whole_s = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let mut stream = ShapeStream::default();
    for piece in doc.as_bytes().chunks(2048) {
        stream.feed(piece);
    }
    let (shape, nul) = stream.finish().unwrap();
    let streamed_s = t.elapsed().as_secs_f64();
    assert_eq!((shape.depth, nul), whole);
    println!("{name}, the app's shape: whole text {:.0} MB/s, streamed in 2 KB slices {:.0} MB/s", mb / whole_s, mb / streamed_s);
}

/// 50 MB of realistic messages (and 50 MB of tiny ones) in 2 KB slices against the
/// whole-text index. Run with
/// `cargo test --release -p chat_backfill_rules -- --ignored --nocapture throughput`.
#[test]
#[ignore]
fn throughput() {
    let text = "Sure! Here is a \\\"quick\\\" overview of the café's menu:\\n\\n1. Croissants \u{1F950} \
        — buttery, flaky.\\n2. Espresso, from beans roasted in-house.\\t(see \\u00e9t\\u00e9 specials)\\n";
    let mut doc = String::from(r#"{"title":"bench","history":{"currentId":"m0","messages":{"#);
    let mut n = 0;
    while doc.len() < 50 << 20 {
        if n > 0 {
            doc.push(',');
        }
        let content = text.repeat(1 + n % 7);
        doc.push_str(&format!(
            r#""m{n}":{{"id":"m{n}","parentId":"m{p}","childrenIds":["m{c}"],"role":"{role}","content":"{content}","model":"gpt-4o","timestamp":{ts},"usage":{{"prompt_tokens":12,"completion_tokens":345}},"done":true}}"#,
            p = n.saturating_sub(1),
            c = n + 1,
            role = if n % 2 == 0 { "user" } else { "assistant" },
            ts = 1_700_000_000 + n,
        ));
        n += 1;
    }
    doc.push_str("}}}");
    race("realistic", &doc, Keys::Exact);
    race("realistic, sanitized keys", &doc, Keys::Sanitized);
    shape_race("realistic", &doc);

    let mut doc = String::from(r#"{"history":{"messages":{"#);
    let mut n = 0;
    while doc.len() < 50 << 20 {
        if n > 0 {
            doc.push(',');
        }
        doc.push_str(&format!(r#""{n:x}":{{"role":"u","content":"ok"}}"#));
        n += 1;
    }
    doc.push_str("}}}");
    race("tiny messages", &doc, Keys::Exact);
}
