use std::borrow::Cow;

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

// ---- A chat given in pieces (issue 26): the same answer as the whole text ----

mod streamed {
    use proptest::prelude::*;

    use super::*;
    use crate::app_rows::scan::{scan, ShapeStream};
    use crate::stream_index::tests::{chat, interesting_byte, json_text, mutate, sizes};

    /// `doc` cut into pieces of the given sizes, cycled (none: whole).
    fn pieces<'a>(doc: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
        let (mut out, mut rest, mut n) = (Vec::new(), doc, 0);
        while !rest.is_empty() {
            let size = if sizes.is_empty() { rest.len() } else { sizes[n % sizes.len()].clamp(1, rest.len()) };
            n += 1;
            out.push(&rest[..size]);
            rest = &rest[size..];
        }
        out
    }

    fn shape_agrees(doc: &str, sizes: &[usize]) -> Result<(), TestCaseError> {
        let mut stream = ShapeStream::default();
        pieces(doc.as_bytes(), sizes).into_iter().for_each(|p| stream.feed(p));
        let want = scan(doc);
        let Some((got, nul_text)) = stream.finish() else {
            // Only a number token longer than it keeps, not an integer literal.
            prop_assert!(doc.len() > crate::app_rows::scan::MAX_STREAMED_NUMBER);
            return Ok(());
        };
        prop_assert_eq!(nul_text, doc.contains("\\u0000"));
        prop_assert_eq!(
            (got.depth, got.longest_integer, got.overflow, got.lone_surrogate, got.rewritten_strings, got.wide_integer),
            (want.depth, want.longest_integer, want.overflow, want.lone_surrogate, want.rewritten_strings, want.wide_integer),
            "{:?}",
            doc
        );
        Ok(())
    }

    /// `open` + `index` + `check` of the whole text, and the same through `StreamOpen` and
    /// `RepairCheck` fed in pieces, with offsets made relative to the trimmed text.
    fn open_agrees(doc: &str, sizes: &[usize], user: Option<&str>) -> Result<(), TestCaseError> {
        let whole = open(Some(doc), user, APP_MAX_DEPTH).and_then(|o| {
            let indexed = index(o.doc, &mut || {})?;
            let checked = check(o.doc, &indexed, &mut || {});
            Ok((indexed.spans, indexed.current_id, o.codec, checked))
        });
        let lead = doc.len() - doc.trim_start_matches([' ', '\t', '\n', '\r']).len();
        if !doc[lead..].starts_with('{') {
            return Ok(());
        }
        let mut stream = StreamOpen::default();
        pieces(doc.as_bytes(), sizes).into_iter().for_each(|p| stream.feed(p, &mut || {}));
        let streamed = match stream.finish(user, APP_MAX_DEPTH, &mut || {}) {
            Ok(StreamOpened::ReadWhole) => return Ok(()),
            Ok(StreamOpened::Indexed(indexed, codec)) => {
                let mut repair = RepairCheck::default();
                for &span in &indexed.spans {
                    // Each message read alone, as the engine's cursor gives it.
                    let bytes = span.bytes();
                    repair.add(&doc[bytes.clone()], span.shifted_back(bytes.start));
                }
                let current_id = indexed.current_id.clone().map(|r| &doc[r]);
                let checked = repair.finish(current_id, &mut || {});
                let spans = indexed.spans.iter().map(|s| s.shifted_back(lead)).collect::<Vec<_>>();
                let current_id = indexed.current_id.map(|r| r.start - lead..r.end - lead);
                Ok((spans, current_id, codec, checked))
            }
            Err(skip) => Err(skip),
        };
        prop_assert_eq!(format!("{streamed:?}"), format!("{whole:?}"), "{:?}", doc);
        Ok(())
    }

    #[test]
    fn hand_written_shapes() {
        for doc in [
            r#"{"a":"\ud800"}"#,
            r#"{"a":"\ud800\udc00","b":"\udc00"}"#,
            r#"{"a":"\ud800x","b":"\u0000"}"#,
            r#"{"a":"\u0000","b":"\ud800"}"#,
            r#"{"a":"\\u0000"}"#,
            r#"{"a":"\\\ud800\\"}"#,
            r#"{"a":[1e400,-12345678901234567890123,18446744073709551615,18446744073709551616]}"#,
            r#"{"a":[[[[{"b":[]}]]]],"c":-0.5e-3}"#,
        ] {
            for size in 1..8 {
                shape_agrees(doc, &[size]).unwrap();
            }
        }
        let long = format!(r#"{{"a":{},"b":-{}}}"#, "9".repeat(5000), "1".repeat(4097));
        shape_agrees(&long, &[7]).unwrap();
        let mut stream = ShapeStream::default();
        stream.feed(format!(r#"{{"a":0.{}}}"#, "1".repeat(5000)).as_bytes());
        assert!(stream.finish().is_none(), "a long float is left to the whole text");
    }

    #[test]
    fn hand_written_repairs() {
        for doc in [
            r#"{"history":{"currentId":"b","messages":{"a":{"id":"a","role":"user"},"b":{"id":"b","role":"assistant","parentId":"a"}}}}"#,
            r#"{"history":{"messages":{"a":{"role":"user","timestamp":"x"},"b":{"role":"user","timestamp":2}}}}"#,
            r#"{"history":{"messages":{"a":{"role":"user","timestamp":1},"b":{"role":"user","parentId":"a","timestamp":"x"}}}}"#,
            r#"{"history":{"messages":{"a":{"role":"user","parentId":["x"]}}}}"#,
            r#"{"history":{"currentId":{"x":1},"messages":{"a":{"role":"user"}}}}"#,
            r#"{"history":{"currentId":"a","messages":{"a":{"role":"user","id":"a","output":3}}}}"#,
            r#"{"history":{"currentId":"a","messages":{"a":{"role":"user","id":"a","output":[{"role":"assistant"}]},"b":{"role":"user","timestamp":"t"}}}}"#,
            r#"{"history":{"currentId":"a\u0000","messages":{"a":{"id":"a","role":"user"},"b":1}}}"#,
            r#"  {"history":{"messages":{"a":1,"b":{"role":"x","parentId":"a","timestamp":"z"},"c":{"role":"y","timestamp":4}}}}  "#,
        ] {
            for size in [1, 3, 1000] {
                open_agrees(doc, &[size], Some("u")).unwrap();
            }
        }
        open_agrees(r#"{"history":{}}"#, &[], None).unwrap();
    }

    fn hostile_text() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("\"\\ud800\"".to_owned()),
            Just("\"\\udc00\\ud800\\udc00\"".to_owned()),
            Just("\"\\u0000\"".to_owned()),
            Just("\"\\\\u0000\"".to_owned()),
            Just("\"\\\\\\ud83d\\ude00\"".to_owned()),
            Just("1e400".to_owned()),
            Just("-1.5e-3".to_owned()),
            Just("123456789012345678901234".to_owned()),
            (1usize..120).prop_map(|n| format!("-{}", "7".repeat(n))),
            json_text(),
        ];
        (prop::collection::vec(piece, 0..6), 0usize..6).prop_map(|(items, depth)| {
            format!("{}{{\"x\":[{}]}}{}", "[".repeat(depth), items.join(","), "]".repeat(depth))
        })
    }

    fn cases(n: u32) -> ProptestConfig {
        ProptestConfig { cases: n, failure_persistence: None, ..ProptestConfig::default() }
    }

    proptest! {
        #![proptest_config(cases(3000))]

        #[test]
        fn the_shape_streamed_is_the_shape(doc in prop_oneof![chat(), hostile_text(), json_text()], sizes in sizes()) {
            shape_agrees(&doc, &sizes)?;
        }

        #[test]
        fn a_chat_streamed_opens_indexes_and_repairs_as_the_whole_text(doc in chat(), sizes in sizes(), user in any::<bool>()) {
            open_agrees(&doc, &sizes, user.then_some("u"))?;
        }

        #[test]
        fn a_mutated_chat_streamed_agrees(doc in chat(), kind in any::<u8>(), at in any::<usize>(), byte in interesting_byte(), sizes in sizes()) {
            // The column holds JSON (the json type, or text the engine checks first).
            let valid = |d: &String| serde_json::from_str::<serde::de::IgnoredAny>(d).is_ok();
            if let Some(doc) = mutate(&doc, kind, at, byte).filter(valid) {
                shape_agrees(&doc, &sizes)?;
                open_agrees(&doc, &sizes, Some("u"))?;
            }
        }
    }
}
