"""Row-by-row comparison of a chat_message table against the reference's, and of our JSON
columns against the source documents' own text.

What `compare` can and cannot say: text, boolean and bigint columns are compared as
values; JSON columns are compared as *parsed values* (`strict_equal`), never as text,
because the reference re-serialises every JSON value (`json.dumps`: its own spacing,
escapes and number spelling). That our JSON columns keep the document's exact text is a
separate check, against the source documents: `source_json_texts` and `json_text_problems`.
"""

from __future__ import annotations

import json
import math
import re

COLUMNS = [
    "id", "chat_id", "user_id", "role", "parent_id", "content", "output", "model_id", "files",
    "sources", "embeds", "done", "status_history", "error", "usage", "created_at", "updated_at",
]
JSON_COLUMNS = {"content", "output", "files", "sources", "embeds", "status_history", "error", "usage"}

SELECT_ROWS = "SELECT " + ", ".join(
    f"{c}::text" if c in JSON_COLUMNS else c for c in COLUMNS
) + " FROM chat_message"


def fetch_rows(conn, parse_json=True) -> dict[str, dict]:
    """All rows by id; JSON columns parsed with Python's json (or left as text)."""
    with conn.cursor() as cur:
        cur.execute(SELECT_ROWS)
        rows = {}
        for values in cur.fetchall():
            row = dict(zip(COLUMNS, values))
            for c in JSON_COLUMNS if parse_json else ():
                row[c] = json.loads(row[c]) if row[c] is not None else SQL_NULL
            rows[row["id"]] = row
        return rows


class _SqlNull:
    def __repr__(self):
        return "SQL NULL"


SQL_NULL = _SqlNull()


def strict_equal(a, b) -> bool:
    """JSON equality that tells 1 from 1.0 from true (Python's == does not)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(strict_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(strict_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def row_differences(ours: dict, ref: dict) -> list[str]:
    return [
        f"{c}: ours={ours[c]!r:.120} reference={ref[c]!r:.120}"
        for c in COLUMNS
        if not strict_equal(ours[c], ref[c])
    ]


def failed_ids(failure_messages: list[str], candidate_ids) -> set[str]:
    """Ids named by the reference's 'Failed to insert message <id>: <error>' lines."""
    prefix = "Failed to insert message "
    out = set()
    for cid in candidate_ids:
        head = prefix + cid + ": "
        if any(m.startswith(head) for m in failure_messages):
            out.add(cid)
    return out


def compare(ours: dict, ref: dict, ref_failed: set[str], our_rejected: set[str]) -> list[str]:
    """Every difference that breaks the contract: a reference row we lack or store
    differently, a row we add that the reference did not fail on, a reference failure
    we neither stored nor reported."""
    problems = []
    for rid, ref_row in ref.items():
        if rid not in ours:
            problems.append(f"{rid!r}: in the reference, missing from ours")
            continue
        diffs = row_differences(ours[rid], ref_row)
        if diffs:
            problems.append(f"{rid!r}: " + "; ".join(diffs))
    for rid in ours.keys() - ref.keys():
        if rid not in ref_failed:
            problems.append(f"{rid!r}: ours only, and the reference did not fail on it")
    for rid in ref_failed:
        if rid not in ours and rid not in our_rejected:
            problems.append(f"{rid!r}: the reference failed on it; ours neither stored nor reported it")
    return problems


# ---------------------------------------------------------------------------
# The source documents' own JSON text, sliced without re-serialising anything.

JSON_SOURCE_FIELDS = {
    "content": "content", "output": "output", "files": "files", "sources": "sources",
    "embeds": "embeds", "status_history": "statusHistory", "error": "error", "usage": "usage",
}
_WS = " \t\n\r"
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_SCALAR_END = re.compile(r"[,\]} \t\n\r]")


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def _string_end(s: str, i: int) -> int:
    m = _STRING.match(s, i)
    if not m:
        raise ValueError(f"no string at {i}")
    return m.end()


def _value_end(s: str, i: int) -> int:
    """End of the JSON value starting at s[i]; iterative, so any depth."""
    depth = 0
    while True:
        c = s[i]
        if c == '"':
            i = _string_end(s, i)
        elif c in "[{":
            depth += 1
            i += 1
        elif c in "]}":
            depth -= 1
            i += 1
        elif depth > 0 and (c in _WS or c in ",:"):
            i += 1
        else:
            m = _SCALAR_END.search(s, i)
            i = m.start() if m else len(s)
        if depth == 0:
            return i


def _members(s: str, i: int) -> list[tuple[str, int, int]]:
    """The members of the object at s[i] as (decoded key, value start, value end), in
    document order, duplicates included."""
    if s[i] != "{":
        raise ValueError("not an object")
    out = []
    i = _skip_ws(s, i + 1)
    if s[i] == "}":
        return out
    while True:
        key_end = _string_end(s, i)
        key = json.loads(s[i:key_end])
        i = _skip_ws(s, key_end)
        if s[i] != ":":
            raise ValueError("no colon")
        start = _skip_ws(s, i + 1)
        end = _value_end(s, start)
        out.append((key, start, end))
        i = _skip_ws(s, end)
        if s[i] == "}":
            return out
        if s[i] != ",":
            raise ValueError("no comma")
        i = _skip_ws(s, i + 1)


def _last(members, key):
    found = [m for m in members if m[0] == key]
    return found[-1] if found else None


def source_json_texts(chat_id: str, text: str | None) -> dict[str, dict[str, str]]:
    """For every message of one chat document (rules 2 to 5: double encoding, history,
    messages, duplicate keys): the exact source text of each JSON column's value, the
    literal `null` where the key is missing. Keyed by row id (`chat_id-key`)."""
    if text is None:
        return {}
    doc = text.strip(_WS)
    try:
        if doc.startswith('"'):
            inner = json.loads(doc)
            if not isinstance(inner, str):
                return {}
            # The extension keeps unpaired surrogates of the decoded text as \uXXXX escapes.
            doc = "".join(f"\\u{ord(ch):04x}" if 0xD800 <= ord(ch) < 0xE000 else ch for ch in inner).strip(_WS)
        if not doc.startswith("{"):
            return {}
        history = _last(_members(doc, 0), "history")
        if history is None or doc[history[1]] != "{":
            return {}
        messages = _last(_members(doc, history[1]), "messages")
        if messages is None or doc[messages[1]] != "{":
            return {}
        entries: dict[str, tuple[int, int]] = {}
        for key, start, end in _members(doc, messages[1]):
            entries[key] = (start, end)  # first position, last value (dict semantics)
    except (ValueError, IndexError):
        return {}
    out = {}
    for key, (start, end) in entries.items():
        if doc[start] != "{":
            continue
        fields = {k: doc[a:b] for k, a, b in _members(doc, start)}  # last duplicate wins
        out[f"{chat_id}-{key}"] = {col: fields.get(src, "null") for col, src in JSON_SOURCE_FIELDS.items()}
    return out


def json_text_problems(rows_as_text: dict[str, dict], chats) -> list[str]:
    """Every stored row whose JSON columns are not, byte for byte, the text of the value in
    its source document. `rows_as_text`: `fetch_rows(conn, parse_json=False)`."""
    expected: dict[str, dict[str, str]] = {}
    for c in chats:
        for rid, cols in source_json_texts(c.id, c.chat).items():
            expected.setdefault(rid, cols)  # ids of two chats that collide: the first one
    problems = []
    for rid, row in rows_as_text.items():
        if rid not in expected:
            problems.append(f"{rid!r}: stored, but no such message in the source documents")
            continue
        for col, want in expected[rid].items():
            if row[col] is None or row[col].encode() != want.encode():
                problems.append(f"{rid!r} {col}: stored {row[col]!r:.80}, source text {want!r:.80}")
    return problems
