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
