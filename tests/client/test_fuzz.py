"""Fuzz layer: hostile chat documents through every SQL entry point, on a cluster of this
file's own started with `restart_after_crash = off`, so that a backend crash cannot hide
behind a quick restart: the server stays down, the sentinel connection dies and the
server log says "terminated by signal".

Entry points: chat_message_problems() and chat_messages() (text, json and jsonb
overloads), and both backfill forms (SELECT * FROM backfill_chat_messages() and
CALL backfill_chat_messages_resumable()) over a source whose chat column is json and one
whose chat column is text, into Open WebUI's chat_message (load_sample.TARGET_DDL).

Documents (all built as raw JSON text, from one seeded RNG: CB_FUZZ_SEED=n reproduces a
run): every JSON scalar and edge list in every field position, random hostile values and
whole random chats, byte-mutated chats (text only), strings of several MB, 10^6 keys in
history.messages, nesting of 14,000 / 25,000 / 100,000 levels of `[`, of `{"a":` and of
a random mix of both in every position, and double-encoded chats holding all of those.

What counts as a failure: a lost connection or dead server (a crash), an error without a
SQLSTATE, an XX000 (internal error, e.g. a Rust panic); for the backfill forms, any error
at all (they record bad data, they do not raise on it). Any other SQL error from the
per-chat functions is acceptable (jsonb, for one, refuses \\u0000 and very deep input).

Also here: cancel latency inside one huge chat (statement_timeout and pg_cancel_backend
must end the statement within 1 s; the only timing assertion of the suite, a stated
requirement of issue 7).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest

from chatgen import NOW, Chat
from conftest import CHAT_DDL, ROOT, Cluster, _start_cluster
from load_sample import TARGET_DDL, copy_chats

FUZZ_DIR = "/tmp/cb_fuzz"
SERVER_LOG = Path(FUZZ_DIR) / "server.log"
SEED = int(os.environ.get("CB_FUZZ_SEED", "20250607"))
CRASH_LINE = re.compile(r"terminated by signal|server process")
CRASH_DETAIL = re.compile(r"Failed process was running")

# Statements erroring on multi-MB documents would otherwise copy each document into the
# server log (log_min_error_statement = error).
QUIET = "-c log_min_error_statement=panic"


# --------------------------------------------------------------------------------------
# The cluster and the sentinel
# --------------------------------------------------------------------------------------


@dataclass
class Fuzz:
    cluster: Cluster
    sentinel: object  # a psycopg2 connection opened before any fuzzing

    def connect(self, db: str = "postgres"):
        try:
            conn = psycopg2.connect(self.cluster.dsn(db), options=QUIET)
        except psycopg2.OperationalError as e:
            crashed(f"connecting to {db}", e)
        conn.autocommit = True
        return conn

    def create_db(self, prefix: str) -> str:
        try:
            return self.cluster.create_db(prefix)
        except psycopg2.OperationalError as e:
            crashed(f"creating a database {prefix}_...", e)


def crash_lines() -> list[str]:
    try:
        text = SERVER_LOG.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [line[:400] for line in text.splitlines() if CRASH_LINE.search(line) or CRASH_DETAIL.search(line)]


def log_tail(n: int = 15) -> str:
    try:
        lines = SERVER_LOG.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no server log)"
    return "\n".join(line[:300] for line in lines[-n:])


def crashed(where: str, err: Exception) -> None:
    pytest.fail(
        f"{where}: the connection died ({type(err).__name__}: {str(err).strip()[:300]}); "
        f"seed {SEED}.\ncrash lines in {SERVER_LOG}:\n" + ("\n".join(crash_lines()) or "(none)")
        + f"\nlog tail:\n{log_tail()}",
        pytrace=False,
    )


@pytest.fixture(scope="module")
def fuzz():
    # Two runs of this file at once would share FUZZ_DIR (each restarts it): the second
    # waits for the first.
    with open(FUZZ_DIR + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stop = ["bash", str(ROOT / "scripts/cluster.sh"), "stop", FUZZ_DIR]
        subprocess.run(stop, check=False)  # never reuse a cluster (and its log) left running
        env = _start_cluster(FUZZ_DIR, "restart_after_crash = off")
        cluster = Cluster(env)
        sentinel = psycopg2.connect(cluster.dsn())
        sentinel.autocommit = True
        with sentinel.cursor() as cur:
            cur.execute("SELECT 1")
        print(f"fuzz seed {SEED} (CB_FUZZ_SEED), cluster {FUZZ_DIR} port {env['PGPORT']}")
        yield Fuzz(cluster, sentinel)
        sentinel.close()
        subprocess.run(stop, check=False)


# --------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------

OK_MSG = '{"role":"user","content":"fine neighbour","timestamp":1700000000}'

TEXT_FIELDS = ["role", "parentId", "model"]
JSON_FIELDS = ["content", "output", "files", "sources", "embeds", "statusHistory", "error", "usage"]
MESSAGE_FIELDS = TEXT_FIELDS + JSON_FIELDS + ["done", "timestamp"]
CHAT_POSITIONS = ["message", "history.messages", "history", "chat"]
POSITIONS = MESSAGE_FIELDS + CHAT_POSITIONS

# Every JSON scalar type and the edge cases of each (raw JSON text).
SCALARS = [
    "null", "true", "false",
    "0", "-0", "0.0", "-0.0", "0e0", "-0E-0", "1", "-1", "1.0", "1.5", "2", "0.5", "1e20", "1.5e-7",
    "1e400", "-1e400", "1e-400", "123456789012345678901234567890", "9" * 400, "-" + "9" * 400,
    "0." + "0" * 400 + "1", "1" + "0" * 309, "1700000000", "1700000000123", "17e8",
    '""', '"x"', '"0"', '"true"', '"null"', '"NULL"', '"{a,b}"', '"user"',
    r'"\u0000"', r'"a\u0000b"', r'"\ud800"', r'"\udfff"', r'"x\ud83d"', r'"\ude00x"', r'"\ud800\ud800"',
    r'"\udbff\udfff"', r'"\ud83d\ude00"', r'"\\u0000"', r'"\"\\\/\b\f\n\r\t"', r'"\u00e9\u2028"',
    '"inf"', '"-Infinity"', '"NaN"', r'" 1700000000.5\n"', '"1_700_000_000"', '"1__7"', '"\uff11\uff17"',
    '"日本語 🙂"', '"é"',
]
CONTAINERS = [
    "[]", "{}", "[null]", "[[]]", "[{}]", '["a","b c"]', '["a",1]', "[1,2]", "[true,false]", '["a",null]',
    "[[1],[2,3]]", '[["a"],null]', '[null,["a"]]', r'["\u0000"]', r'["\ud800"]', "[1e400]", '["x",[]]',
    '{"a":1}', '{"":null}', r'{"a":"\u0000"}', r'{"\ud800":1}',
    # Around PostgreSQL's 6 array dimensions.
    '[' * 6 + '"x"' + ']' * 6, '[' * 7 + '"x"' + ']' * 7, '[' * 8 + '1' + ']' * 8,
    '[' * 6 + 'null' + ']' * 6, '[' * 7 + ']' * 7,
]


def _cube(dims: int) -> str:
    """A 2x2x...x2 list: 2**dims elements in `dims` dimensions."""
    value = '"e"'
    for _ in range(dims):
        value = "[%s,%s]" % (value, value)
    return value


CONTAINERS += [_cube(6), _cube(7)]
LEAVES = SCALARS + ["[]", "{}"]

for _v in SCALARS + CONTAINERS:
    json.loads(_v)  # every fixed value is valid JSON (Python accepts lone surrogates and 1e400)


def message_with(field: str, value: str) -> str:
    """A message holding `value` in `field`; role "assistant" unless role is the field."""
    fields = {"role": '"assistant"', "content": '"x"', "timestamp": "1700000000", field: value}
    return "{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}"


def chat_of(entries: list[tuple[str, str]]) -> str:
    """history.messages from (raw key token, raw value) pairs, after a fine neighbour."""
    body = ",".join(f"{k}:{v}" for k, v in [('"ok"', OK_MSG)] + entries)
    return '{"title":"fuzz","history":{"currentId":null,"messages":{%s}}}' % body


def place(position: str, value: str) -> str:
    """A whole chat document with `value` (raw JSON) at `position`."""
    if position == "chat":
        return value
    if position == "history":
        return '{"title":"fuzz","history":%s}' % value
    if position == "history.messages":
        return '{"title":"fuzz","history":{"currentId":null,"messages":%s}}' % value
    if position == "message":
        return chat_of([('"m"', value)])
    if position == "key":  # value must be a JSON string token
        return chat_of([(value, OK_MSG)])
    return chat_of([('"m"', message_with(position, value))])


def deep(depth: int, form: str, rng: random.Random, leaf: str = '"x"') -> str:
    if form == "[":
        return "[" * depth + leaf + "]" * depth
    if form == "{":
        return '{"a":' * depth + leaf + "}" * depth
    opens = [rng.random() < 0.5 for _ in range(depth)]  # mixed: True is a list
    return "".join("[" if o else '{"a":' for o in opens) + leaf + "".join("]" if o else "}" for o in reversed(opens))


def rand_key(rng: random.Random) -> str:
    return rng.choice([
        '"k%d"' % rng.randint(0, 9), '""', r'"\u0000"', r'"k\ud800"', r'"\ud83d\ude00"', r'"a\"b"', '"ключ"',
        '"%s"' % ("k" * rng.randint(1, 300)), r'"\u006b1"', '"k1"',
    ])


def ws(rng: random.Random) -> str:
    return rng.choice(["", "", "", " ", "\n", "\t ", " \r\n "])


def rand_value(rng: random.Random, depth: int = 0) -> str:
    r = rng.random()
    if depth > 6 or r < 0.5:
        return rng.choice(LEAVES)
    if r < 0.62:
        return rng.choice(CONTAINERS)
    if r < 0.8:
        items = [rand_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
        return "[" + ",".join(ws(rng) + i + ws(rng) for i in items) + "]"
    if r < 0.88:
        return deep(rng.randint(1, 80), rng.choice("[{m"), rng, rng.choice(LEAVES))
    items = [f"{rand_key(rng)}{ws(rng)}:{ws(rng)}{rand_value(rng, depth + 1)}" for _ in range(rng.randint(0, 4))]
    return "{" + ",".join(items) + "}"


def rand_message(rng: random.Random) -> str:
    if rng.random() < 0.1:
        return rand_value(rng)
    fields = []
    for name in rng.sample(MESSAGE_FIELDS + ["id", "childrenIds", "modelName"], rng.randint(0, 8)):
        value = rand_value(rng) if rng.random() < 0.6 else {
            "role": '"user"', "parentId": '"p"', "model": '"gpt-4o"', "done": "true", "timestamp": "1700000000",
        }.get(name, '"v"')
        fields.append(f'"{name}"{ws(rng)}:{ws(rng)}{value}')
        if rng.random() < 0.1:  # a duplicated field: the last one wins
            fields.append(f'"{name}":{rand_value(rng)}')
    if rng.random() < 0.7:
        fields.insert(rng.randint(0, len(fields)), '"role":"%s"' % rng.choice(["user", "assistant"]))
    return "{" + ",".join(fields) + "}"


def rand_chat(rng: random.Random) -> str:
    entries = [(rand_key(rng), rand_message(rng)) for _ in range(rng.randint(0, 25))]
    messages = "{" + ",".join(f"{ws(rng)}{k}{ws(rng)}:{ws(rng)}{v}" for k, v in entries) + "}"
    doc = '{"title":"soup","history":{"currentId":null,"messages":%s},"messages":[]}' % messages
    if rng.random() < 0.15:  # history repeated: the last one wins
        doc = doc[:-1] + ',"history":{"messages":%s}}' % messages
    return doc


def mutate(rng: random.Random, doc: str) -> str:
    for _ in range(rng.randint(1, 3)):
        if not doc:
            break
        i = rng.randrange(len(doc))
        op = rng.random()
        if op < 0.3:
            doc = doc[:i] + doc[i + rng.randint(1, 8):]
        elif op < 0.6:
            doc = doc[:i] + rng.choice(['"', "[", "]", "{", "}", ",", ":", "\\", "\\u", "\\ud800", "0", "-", "e"]) + doc[i:]
        elif op < 0.8:
            doc = doc[:i]
        else:
            j = rng.randrange(len(doc))
            doc = doc[:i] + doc[min(i, j):max(i, j)] + doc[i:]
    return doc


def million_doc(dup: bool) -> str:
    """10^6 entries in history.messages, tiny: one in 20 a row, one in 100,000 a message that
    cannot be stored, the rest skipped by the rules. `dup`: every key appears twice."""
    skip = ["0", "null", "{}", '{"role":""}', "[]", '"s"', '{"content":1}', '{"role":null}', '{"role":false}', "true"]
    parts = []
    for i in range(1_000_000):
        key = i // 2 if dup else i
        if i % 100_000 == 7:
            value = r'{"role":"\u0000"}'
        elif i % 20 == 0:
            value = '{"role":"user"}'
        else:
            value = skip[i % len(skip)]
        parts.append(f'"{key:x}":{value}')
    return '{"history":{"messages":{%s}}}' % ",".join(parts)


@dataclass
class Case:
    name: str
    doc: str
    user_id: str | None = "u-fuzz"


def double(cases: list[Case], rng: random.Random) -> list[Case]:
    return [Case(c.name + " [double-encoded]", json.dumps(c.doc, ensure_ascii=rng.random() < 0.5), c.user_id)
            for c in cases]


KNOWN_CRASH = '{"history":{"messages":{"a":{"role":' + "[" * 25000 + '"x"' + "]" * 25000 + "}}}}"


def build_corpus(seed: int) -> dict[str, list[Case]]:
    rng = random.Random(seed)
    groups: dict[str, list[Case]] = {}

    # Every scalar and edge list in every position: one chat per message-level position
    # (a message per value), one chat per value at the chat levels, plus the message key.
    cases = []
    for pos in MESSAGE_FIELDS:
        entries = [(f'"v{i}"', message_with(pos, v)) for i, v in enumerate(SCALARS + CONTAINERS)]
        cases.append(Case(f"scalars in {pos}", chat_of(entries)))
    cases.append(Case("scalars as the message", chat_of([(f'"v{i}"', v) for i, v in enumerate(SCALARS + CONTAINERS)])))
    for pos in ["history.messages", "history", "chat"]:
        for v in SCALARS + CONTAINERS:
            cases.append(Case(f"{v[:40]} as {pos}", place(pos, v)))
    strings = [v for v in SCALARS if v.startswith('"')]
    cases.append(Case("strings as keys", chat_of([(s, OK_MSG) for s in strings])))
    for s in strings:  # a double-encoded chat that is itself a string holding a scalar
        cases.append(Case(f"string {s[:30]} holding a scalar", json.dumps(s)))
    groups["scalars"] = cases + double(cases, rng)

    # Random hostile values in random positions, and whole random chats.
    cases = []
    for i in range(150):
        pos = rng.choice(POSITIONS)
        cases.append(Case(f"random #{i} in {pos}", place(pos, rand_value(rng))))
    for i in range(80):
        cases.append(Case(f"random chat #{i}", rand_chat(rng), rng.choice(["u-fuzz"] * 8 + [None, "shared-x"])))
    groups["random"] = cases + double(rng.sample(cases, 60), rng)

    # Byte-level mutations: mostly not JSON any more (text only; json refuses them).
    cases = [Case(f"mutated chat #{i}", mutate(rng, rand_chat(rng))) for i in range(120)]
    cases += [Case("unclosed [ x100000", "[" * 100_000), Case("unclosed {\"a\": x100000", '{"a":' * 100_000),
              Case("unclosed deep content", place("content", "[" * 30_000)[:-3])]
    groups["mutated"] = cases

    # Strings of several MB in every position that takes a string, and huge numbers.
    mb = 4_000_000
    huge = {
        "ascii": '"' + "a" * mb + '"',
        "escapes": '"' + r"\u00e9" * (mb // 6) + '"',
        "non-ASCII": '"' + "é日" * (mb // 5) + '"',
        "NUL at the end": '"' + "b" * mb + r'\u0000"',
        "lone surrogate at the end": '"' + "c" * mb + r'\ud800"',
        "2,000,000-digit number": "1" * 2_000_000,
    }
    cases = []
    names = list(huge)
    for pos in MESSAGE_FIELDS + ["key", "message"]:
        choices = [n for n in names if pos != "key" or huge[n].startswith('"')]
        name = choices[[*MESSAGE_FIELDS, "key", "message"].index(pos) % len(choices)]
        cases.append(Case(f"huge {name} in {pos}", place(pos, huge[name])))
    cases.append(Case("huge escaped string as the chat", huge["escapes"]))
    groups["huge"] = cases + double(rng.sample(cases, 3), rng)

    # 10^6 keys in history.messages.
    mixed = Case("10^6 keys", million_doc(dup=False))
    groups["million"] = [mixed, Case("10^6 entries, every key twice", million_doc(dup=True))] + double([mixed], rng)

    # Deep nesting in every position, three forms, three depths (14,000 still fits json_in
    # and the json column; 25,000 and 100,000 only fit text, or a double-encoded chat).
    for depth in (14_000, 25_000, 100_000):
        cases = [Case("known 0.1.0 crash: role [ x25000", KNOWN_CRASH)] if depth == 25_000 else []
        for pos in POSITIONS:
            for form in ("[", "{", "mixed"):
                cases.append(Case(f"{form} x{depth} in {pos}", place(pos, deep(depth, form, rng))))
        groups[f"deep-{depth}"] = cases + double(cases, rng)
    return groups


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[Case]]:
    return build_corpus(SEED)


# --------------------------------------------------------------------------------------
# The per-chat functions
# --------------------------------------------------------------------------------------

CALLS = [
    (f"chat_message_problems({t})", f"SELECT count(*), sum(length(p::text)) FROM chat_message_problems(%s, %s::{t}) p")
    for t in ("text", "json", "jsonb")
] + [
    (f"chat_messages({t})", f"SELECT count(*), sum(length(m::text)) FROM chat_messages(%s, %s, %s::{t}) m")
    for t in ("text", "json", "jsonb")
]

GROUPS = ["scalars", "random", "mutated", "huge", "million", "deep-14000", "deep-25000", "deep-100000"]


@pytest.fixture(scope="module")
def functions_db(fuzz) -> str:
    return fuzz.create_db("fz_functions")


@pytest.mark.parametrize("group", GROUPS)
def test_functions_survive_hostile_documents(fuzz, functions_db, corpus, group):
    bad, states = [], Counter()
    conn = fuzz.connect(functions_db)
    try:
        cur = conn.cursor()
        for i, case in enumerate(corpus[group]):
            chat_id = f"f{i}"
            for call, sql in CALLS:
                params = (chat_id, case.doc) if "problems" in call else (chat_id, case.user_id, case.doc)
                try:
                    cur.execute(sql, params)
                    cur.fetchall()
                    states[(call, "ok")] += 1
                except psycopg2.Error as e:
                    if e.pgcode is None or conn.closed:
                        crashed(f"{group} / {case.name} / {call}", e)
                    states[(call, e.pgcode)] += 1
                    # XX000: an internal error (a Rust panic among them). Class 42: the
                    # call itself is wrong (a missing function), never the data.
                    if e.pgcode == "XX000" or e.pgcode.startswith("42"):
                        bad.append(f"{case.name} / {call}: {e.pgcode} {e.pgerror.strip()[:200]}")
    finally:
        conn.close()
    print(f"{group}: outcomes {dict(sorted(states.items()))}")
    assert not bad, f"internal errors (seed {SEED}):\n" + "\n".join(bad)
    # Whatever jsonb refuses, the text overloads take every document of the group.
    assert states[("chat_message_problems(text)", "ok")] + states[("chat_messages(text)", "ok")] > 0
    assert not crash_lines(), crash_lines()


# --------------------------------------------------------------------------------------
# Both backfill forms, json and text source
# --------------------------------------------------------------------------------------


def load_source(fuzz: Fuzz, db: str, column_type: str, cases: list[Case]) -> dict[str, str]:
    """Source `chat` with the chat column of `column_type`; returns chat id -> case name.
    A json column takes only what json_in accepts: the rest is left out (with a SQLSTATE)."""
    names, chats = {}, []
    for i, case in enumerate(cases):
        names[f"c{i:05d}"] = case.name
        chats.append(Chat(f"c{i:05d}", case.user_id, case.doc))
    conn = fuzz.connect(db)
    try:
        cur = conn.cursor()
        cur.execute(f"CREATE TABLE chat (id text PRIMARY KEY, user_id text, title text, chat {column_type})")
        if column_type == "text":
            copy_chats(conn, chats)
        else:
            for c in chats:
                try:
                    cur.execute("INSERT INTO chat VALUES (%s, %s, 't', %s::json)", (c.id, c.user_id, c.chat))
                except psycopg2.Error as e:
                    if e.pgcode is None or conn.closed:
                        crashed(f"loading {names[c.id]} into a json column", e)
                    assert e.pgcode != "XX000", (names[c.id], e.pgerror)
                    del names[c.id]
        cur.execute(TARGET_DDL)
        cur.execute("ANALYZE chat")
    finally:
        conn.close()
    return names


def run_backfill(fuzz: Fuzz, db: str, sql: str, what: str) -> list[tuple]:
    conn = fuzz.connect(db)
    try:
        with conn.cursor() as cur:
            try:
                cur.execute(sql)
                return cur.fetchall() if cur.description else []
            except psycopg2.Error as e:
                if e.pgcode is None or conn.closed:
                    crashed(what, e)
                pytest.fail(f"{what} raised on data (seed {SEED}): {e.pgcode} {e.pgerror.strip()[:500]}",
                            pytrace=False)
    finally:
        conn.close()


def one_value(fuzz: Fuzz, db: str, sql: str):
    conn = fuzz.connect(db)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()[0]
    finally:
        conn.close()


@pytest.mark.parametrize("column_type", ["json", "text"])
def test_backfill_forms_never_raise_on_hostile_documents(fuzz, corpus, column_type):
    cases = [c for g in GROUPS for c in corpus[g]]
    db = fuzz.create_db(f"fz_{column_type}")
    names = load_source(fuzz, db, column_type, cases)
    assert names, "nothing loaded"
    print(f"{column_type} source: {len(names)} of {len(cases)} documents loaded")

    select = "SELECT * FROM backfill_chat_messages(batch_size => 100, now => %d)" % NOW
    first = run_backfill(fuzz, db, select, f"SELECT backfill_chat_messages() over a {column_type} source")
    inserted = sum(r[2] for r in first)
    assert one_value(fuzz, db, "SELECT count(*) FROM chat_message") == inserted

    # A re-run goes through the INSERT path (COPY meets existing rows): nothing new.
    again = run_backfill(fuzz, db, select, f"re-run of backfill_chat_messages() over a {column_type} source")
    assert sum(r[2] for r in again) == 0
    assert one_value(fuzz, db, "SELECT count(*) FROM chat_message") == inserted

    # The committing form, from an empty target, stores the same rows.
    one_value(fuzz, db, "TRUNCATE chat_message; SELECT 1")
    run_backfill(fuzz, db, "CALL backfill_chat_messages_resumable(batch_size => 100, now => %d)" % NOW,
                 f"CALL backfill_chat_messages_resumable() over a {column_type} source")
    assert one_value(fuzz, db, "SELECT state FROM chat_backfill.status ORDER BY run_id DESC LIMIT 1") == "finished"
    assert one_value(fuzz, db, "SELECT count(*) FROM chat_message") == inserted
    assert not crash_lines(), crash_lines()


# --------------------------------------------------------------------------------------
# Cancel latency inside one huge chat
# --------------------------------------------------------------------------------------

DEEP_ROLE_DEPTH = 14_000
DEEP_ROLE_MESSAGES = 1500  # ~40 MB: still being expanded when the interrupt arrives


def million_tiny_messages() -> str:
    return '{"history":{"messages":{%s}}}' % ",".join(f'"{i:x}":{{"role":"user"}}' for i in range(1_000_000))


def deep_role_messages() -> str:
    role = "[" * DEEP_ROLE_DEPTH + '"x"' + "]" * DEEP_ROLE_DEPTH
    return '{"history":{"messages":{%s}}}' % ",".join(
        f'"m{i}":{{"role":{role},"content":"c"}}' for i in range(DEEP_ROLE_MESSAGES))


@pytest.fixture(scope="module")
def huge_chat_dbs(fuzz) -> dict[str, str]:
    dbs = {}
    for name, doc in [("million", million_tiny_messages()), ("deep_role", deep_role_messages())]:
        db = fuzz.create_db(f"cx_{name}")
        conn = fuzz.connect(db)
        try:
            cur = conn.cursor()
            cur.execute(CHAT_DDL)
            copy_chats(conn, [Chat(f"huge-{name}", "u", doc)])
            cur.execute(TARGET_DDL)
        finally:
            conn.close()
        dbs[name] = db
    return dbs


STATEMENTS = {
    "backfill": "SELECT * FROM backfill_chat_messages(batch_size => 1000)",
    "chat_messages": "SELECT count(*) FROM chat c, chat_messages(c.id, c.user_id, c.chat) m",
}


@pytest.mark.parametrize("interrupt", ["statement_timeout", "pg_cancel_backend"])
@pytest.mark.parametrize("statement", list(STATEMENTS))
@pytest.mark.parametrize("chat", ["million", "deep_role"])
def test_cancel_takes_effect_within_1s_inside_one_huge_chat(fuzz, huge_chat_dbs, chat, statement, interrupt):
    db = huge_chat_dbs[chat]
    conn, admin = fuzz.connect(db), fuzz.connect(db)
    try:
        cur = conn.cursor()
        cur.execute("SELECT pg_backend_pid()")
        (pid,) = cur.fetchone()
        canceller = None
        if interrupt == "statement_timeout":
            cur.execute("SET statement_timeout = '300ms'")
        else:
            def cancel():
                time.sleep(0.3)
                with admin.cursor() as a:
                    a.execute("SELECT pg_cancel_backend(%s)", (pid,))
            canceller = threading.Thread(target=cancel)
        started = time.monotonic()
        if canceller:
            canceller.start()
        outcome = None
        try:
            cur.execute(STATEMENTS[statement])
            cur.fetchall()
        except psycopg2.Error as e:
            if e.pgcode is None or conn.closed:
                crashed(f"cancel test {chat} / {statement} / {interrupt}", e)
            outcome = e.pgcode
        elapsed = time.monotonic() - started
        if canceller:
            canceller.join()
        assert outcome == "57014", f"expected 57014 (query canceled), got {outcome} after {elapsed:.2f} s"
        # The one timing assertion of the suite (issue 7: cancel takes effect within 1 s
        # inside one huge chat). The interrupt arrives at 0.3 s.
        assert elapsed < 1.0, f"{interrupt} took effect only after {elapsed:.2f} s inside one huge chat"
        cur.execute("RESET statement_timeout")
        cur.execute("SELECT 1")  # the session is usable
        assert cur.fetchone() == (1,)
    finally:
        conn.close()
        admin.close()


# --------------------------------------------------------------------------------------
# After everything: the server never went down
# --------------------------------------------------------------------------------------


def test_zz_server_survived_the_fuzz(fuzz):
    """Runs last (file order). The sentinel was opened before any fuzzing: with
    restart_after_crash = off, any backend crash on the way would have killed it."""
    try:
        with fuzz.sentinel.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    except psycopg2.Error as e:
        crashed("the sentinel connection", e)
    lines = crash_lines()
    assert not lines, f"{SERVER_LOG} reports a crash:\n" + "\n".join(lines)
