"""Generator of Open WebUI-shaped `chat` rows: realistic chats and hostile ones.

Every chat is produced as raw JSON text (not via json.dumps of a dict) where the case
needs it: duplicate keys, lone surrogates, NUL escapes, 400-digit numbers and deep
nesting only exist in text. Each hostile chat is tagged with the rule it exercises and
whether it crashes Open WebUI's migration as a whole (those cannot share a run with the
others, since the reference aborts on them).
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass

# The clock every test hands to both implementations.
NOW = 1_760_000_000


@dataclass
class Chat:
    id: str
    user_id: str | None
    chat: str | None  # JSON text, or None for SQL NULL
    tag: str = "realistic"
    crashes_reference: bool = False


def _words(rng: random.Random, n_bytes: int) -> str:
    """Incompressible-ish text: random letters and punctuation, some non-ASCII."""
    alphabet = string.ascii_letters + string.digits + "     .,;:!?'-éßж中🙂"
    return "".join(rng.choice(alphabet) for _ in range(n_bytes))


def realistic_chat(rng: random.Random, chat_id: str, n_messages: int, content_bytes: int) -> str:
    """A chat as Open WebUI writes it: history.messages keyed by message id, a parent
    chain, and the top-level `messages` list that the migration never reads."""
    messages = {}
    order = []
    parent = None
    per_message = max(1, content_bytes // max(1, n_messages))
    ts_base = rng.randint(1_600_000_000, NOW - 1000)
    for i in range(n_messages):
        mid = f"{chat_id[:8]}-{i:04d}-{rng.getrandbits(32):08x}"
        role = "user" if i % 2 == 0 else "assistant"
        msg = {
            "id": mid,
            "parentId": parent,
            "childrenIds": [],
            "role": role,
            "content": _words(rng, per_message),
            "timestamp": ts_base + i * 7 if rng.random() < 0.8 else (ts_base + i * 7) * 1000,
        }
        if role == "assistant":
            msg.update(
                model=rng.choice(["gpt-4o", "llama3.1:8b", "claude-3-5-sonnet"]),
                modelName="Some Model",
                done=rng.random() < 0.97,
                usage={"prompt_tokens": rng.randint(1, 4000), "completion_tokens": rng.randint(1, 4000)},
                statusHistory=[{"action": "web_search", "done": True, "description": "Searched"}]
                if rng.random() < 0.2
                else None,
                sources=[{"source": {"name": "doc.pdf"}, "document": [_words(rng, 40)]}] if rng.random() < 0.1 else None,
            )
            if rng.random() < 0.05:
                msg["error"] = {"content": "Upstream timeout"}
        elif rng.random() < 0.1:
            msg["files"] = [{"type": "file", "name": "notes.txt", "size": rng.randint(1, 10**6)}]
        if parent is not None:
            messages[parent]["childrenIds"].append(mid)
        messages[mid] = msg
        order.append(msg)
        parent = mid
    doc = {
        "id": "",
        "title": "Chat " + chat_id[:6],
        "models": ["gpt-4o"],
        "history": {"messages": messages, "currentId": parent},
        "messages": order,
        "tags": [],
        "timestamp": ts_base * 1000,
    }
    return json.dumps(doc, ensure_ascii=False)


def _history(messages_raw: str) -> str:
    return '{"title":"t","history":{"currentId":null,"messages":%s}}' % messages_raw


def _one(key_raw: str, msg_raw: str) -> str:
    return _history("{%s:%s}" % (key_raw, msg_raw))


def hostile_chats() -> list[Chat]:
    """One chat per hostile case of the rules (docs/rules.md)."""
    out: list[Chat] = []

    def add(tag, chat, user_id="u-hostile", crashes=False):
        out.append(Chat(f"hostile-{len(out):03d}", user_id, chat, tag, crashes))

    ok = '{"role":"user","content":"hi","timestamp":1700000000}'
    # Rule 1: source rows.
    add("shared snapshot row", _one('"m"', ok), user_id="shared-abc")
    add("user_id NULL", _one('"m"', ok), user_id=None)
    add("Shared- is case-sensitive", _one('"m"', ok), user_id="Shared-abc")
    # Rule 2: the chat value.
    for tag, text in [
        ("SQL NULL chat", None),
        ("JSON null", "null"),
        ("empty object", "{}"),
        ("empty list", "[]"),
        ("empty string", '""'),
        ("zero", "0"),
        ("false", "false"),
        ("zero float", "0.0"),
        ("whitespace around the document", "  \n" + _one('"m"', ok) + "\n "),
    ]:
        add("chat: " + tag, text)
    add("chat: double-encoded", json.dumps(_one('"m"', ok)))
    add("chat: double-encoded with escapes inside", json.dumps(_one('"m\\u00e9"', '{"role":"user","content":"a\\"b\\ud83d\\ude00"}')))
    add("chat: double-encoded lone surrogate in a value", json.dumps(_one('"m"', '{"role":"user","content":"x\\udc00"}')))
    add("chat: string that is not JSON", '"not json at all"')
    add("chat: double-encoded empty object", '"{}"')
    for tag, text in [
        ("list", "[1,2]"),
        ("number", "5"),
        ("true", "true"),
        ("string holding a list", '"[1]"'),
        ("string holding null", '"null"'),
        ("string holding a string", json.dumps(json.dumps(_one('"m"', ok)))),
    ]:
        add("chat: " + tag, text, crashes=True)
    # Rule 3: history and messages.
    add("history missing", '{"title":"x","messages":[{"role":"user","content":"never read"}]}')
    add("history null", '{"history":null}')
    add("history list", '{"history":[{"messages":{}}]}')
    add("history string", '{"history":"{}"}')
    add("messages missing", '{"history":{"currentId":"a"}}')
    add("messages list", '{"history":{"messages":[%s]}}' % ok)
    add("messages null", '{"history":{"messages":null}}')
    add("history duplicated: last wins", '{"history":{"messages":{"a":%s}},"history":{"messages":{"b":%s}}}' % (ok, ok))
    add("history escaped key", '{"hist\\u006fry":{"messages":{"esc":%s}}}' % ok)
    lists = _entry_lists()
    # Rule 4: entries of history.messages.
    msgs = ",".join(lists["message entries"])
    add("message entries", _history("{%s}" % msgs))
    cols = ",".join(lists["columns"])
    add("columns", _history("{%s}" % cols))
    bad = ",".join(lists["unstorable messages"])
    add("unstorable messages", _history("{%s}" % bad))
    ts_msgs = ",".join(lists["timestamps"])
    add("timestamps", _history("{%s}" % ts_msgs))
    # Rule 8: nesting deep enough to crash Python's json module (the reference).
    deep = "[" * 5000 + "]" * 5000
    add("deep nesting", _one('"deep"', '{"role":"user","content":%s}' % deep), crashes=True)
    return out


def hostile_message_chats(prefix: str = "solo") -> list[Chat]:
    """One chat per hostile message entry (key and value as raw JSON), so that a rule that
    judges a chat by its worst message (Open WebUI's app writes a chat all or nothing)
    still sees every case on its own."""
    out = []
    for tag, entries in _entry_lists().items():
        for n, entry in enumerate(entries):
            out.append(Chat(f"{prefix}-{len(out):03d}", "u-hostile", _history("{%s}" % entry), f"{tag} #{n}", False))
    return out


def _entry_lists() -> dict[str, list[str]]:
    """The raw `"key":value` entries of the hostile chats' history.messages, by chat tag."""
    ok = '{"role":"user","content":"hi","timestamp":1700000000}'
    lists = {}
    lists["message entries"] = (
        [
            '"str":"just a string"',
            '"num":42',
            '"nul":null',
            '"lst":[%s]' % ok,
            '"no_role":{"content":"x"}',
            '"role_null":{"role":null}',
            '"role_empty":{"role":""}',
            '"role_false":{"role":false}',
            '"role_zero":{"role":0}',
            '"role_zero_float":{"role":0.0}',
            '"role_list_empty":{"role":[]}',
            '"role_obj_empty":{"role":{}}',
            '"role_string_zero":{"role":"0"}',
            '"dup":{"role":"user","content":"first"}',
            '"other":%s' % ok,
            '"dup":{"role":"assistant","content":"last"}',
            '"":{"role":"user","content":"empty key"}',
            '"k\\u00e9y \\ud83d\\ude00":%s' % ok,
            '"esc\\"quote":%s' % ok,
        ]
    )
    # Rule 5 and 7: columns.
    lists["columns"] = (
        [
            '"role_int":{"role":1}',
            '"role_float":{"role":1.5}',
            '"role_float_int":{"role":2.0}',
            '"role_big_float":{"role":1e20}',
            '"role_tiny_float":{"role":1.5e-7}',
            '"role_true":{"role":true}',
            '"role_list":{"role":["a","b"]}',
            '"role_list_quoted":{"role":["a b","","x,y","q\\"","NULL","back\\\\slash"]}',
            '"role_list_ints":{"role":[1,2,3]}',
            '"role_list_null":{"role":["a",null]}',
            '"role_list_bools":{"role":[true,false]}',
            '"role_list_nested":{"role":[["a","b"],["c","d"]]}',
            '"role_big_int":{"role":%s}' % ("9" * 60),
            '"parent_num":{"role":"user","parentId":123}',
            '"parent_list":{"role":"user","parentId":[]}',
            '"parent_false":{"role":"user","parentId":false}',
            '"model_list":{"role":"assistant","model":["m1","m2"]}',
            '"model_float":{"role":"assistant","model":-0.5}',
            '"all_json_cols":{"role":"assistant","content":{"a":[1,2,{"b":null}]},"output":[{"type":"message"}],'
            '"files":[{"x":1}],"sources":[],"embeds":["e"],"statusHistory":[{"done":true}],"error":{"content":"e"},'
            '"usage":{"total_tokens":12},"done":false}',
            '"json_nulls":{"role":"user","content":null,"output":null,"files":null}',
            '"done_null":{"role":"user","done":null}',
            '"done_0":{"role":"user","done":0}',
            '"done_1":{"role":"user","done":1}',
            '"done_00":{"role":"user","done":0.0}',
            '"done_10":{"role":"user","done":1.0}',
            '"big_int_content":{"role":"user","content":%s}' % ("1234567890" * 40),
            '"float_content":{"role":"user","content":[1.0, 1.10, 2.5e3, -0.0]}',
            '"nul_in_content":{"role":"user","content":"a\\u0000b"}',
            '"surrogate_in_content":{"role":"user","content":"a\\ud800b"}',
            '"nested_300":{"role":"user","content":%s}' % ("[" * 300 + "]" * 300),
            '"unicode":{"role":"user","content":"日本語 🙂 \\u2028"}',
            '"dup_fields":{"role":"user","role":"assistant","content":"x","content":"y"}',
            '"escaped_field_name":{"r\\u006fle":"user","content":"escaped key"}',
        ]
    )
    # Rule 7: messages that cannot be stored.
    lists["unstorable messages"] = (
        [
            '"role_obj":{"role":{"a":1}}',
            '"parent_obj":{"role":"user","parentId":{"x":1}}',
            '"model_obj":{"role":"user","model":{"id":"m"}}',
            '"role_nul":{"role":"us\\u0000er"}',
            '"role_surrogate":{"role":"us\\ud800er"}',
            '"parent_nul":{"role":"user","parentId":"\\u0000"}',
            '"model_surrogate":{"role":"user","model":"\\udfff"}',
            '"key_nul\\u0000":%s' % ok,
            '"key_surrogate\\ud800":%s' % ok,
            '"done_2":{"role":"user","done":2}',
            '"done_str":{"role":"user","done":"true"}',
            '"done_list":{"role":"user","done":[]}',
            '"done_half":{"role":"user","done":0.5}',
            '"inf_content":{"role":"user","content":1e400}',
            '"fine_neighbour":%s' % ok,
        ]
    )
    # Rule 6: timestamps.
    ts_cases = {
        "ts_missing": None,
        "ts_seconds": "1700000000",
        "ts_ms": "1700000000123",
        "ts_float": "1700000000.987",
        "ts_exp": "1.7e9",
        "ts_str": '"1700000000"',
        "ts_str_ws": '" 1700000000.5\\n"',
        "ts_str_exp": '"1.7e9"',
        "ts_str_underscore": '"1_700_000_000"',
        "ts_garbage": '"yesterday"',
        "ts_inf": '"inf"',
        "ts_nan": '"NaN"',
        "ts_true": "true",
        "ts_null": "null",
        "ts_list": "[1700000000]",
        "ts_obj": '{"t":1}',
        "ts_exactly_1e10": "10000000000",
        "ts_1e10_plus": "10000000001",
        "ts_lower_bound": "1577836800",
        "ts_below": "1577836799",
        "ts_now_plus_day": str(NOW + 86400),
        "ts_now_plus_day_1": str(NOW + 86401),
        "ts_negative": "-1700000000",
        "ts_huge": "1e400",
        "ts_400_digits": "9" * 400,
        "ts_ms_float": "1700000000123.9",
    }
    lists["timestamps"] = [
        '"%s":{"role":"user"%s}' % (k, "" if v is None else ',"timestamp":' + v) for k, v in ts_cases.items()
    ]
    return lists


def realistic_chats(seed: int, count: int, content_bytes=(400, 6000), messages=(1, 16)) -> list[Chat]:
    rng = random.Random(seed)
    chats = []
    for i in range(count):
        cid = f"{rng.getrandbits(64):016x}-{i}"
        user = f"user-{rng.randint(1, 50)}" if rng.random() > 0.05 else f"shared-{cid}"
        n = rng.randint(*messages)
        chats.append(Chat(cid, user, realistic_chat(rng, cid, n, rng.randint(*content_bytes))))
    return chats
