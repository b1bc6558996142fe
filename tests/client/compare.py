"""Row-by-row comparison of a chat_message table against the reference's."""

from __future__ import annotations

import json
import math

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
