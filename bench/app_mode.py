"""rows => 'migration' against rows => 'app', and verify() in each mode, on the same data:
realistic chats (tests/client/chatgen.py) into Open WebUI 0.12.4's head-schema chat_message.

    PGHOST=... PGPORT=... .venv/bin/python bench/app_mode.py [--chats 20000] [--rounds 3]

Prints each round's seconds and the medians; the ratio is app / migration."""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "client"))
import chatgen  # noqa: E402
import conftest  # noqa: E402

TARGET_DDL = """CREATE TABLE chat_message (id text PRIMARY KEY, chat_id text NOT NULL REFERENCES chat(id) ON DELETE CASCADE,
 user_id text, role text NOT NULL, parent_id text, content json, output json, model_id text, files json, sources json,
 embeds json, meta json, done boolean DEFAULT true, status_history json, error json, usage json, context_summary text,
 created_at bigint, updated_at bigint);
CREATE INDEX ON chat_message (chat_id)"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chats", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import os
    cluster = conftest.Cluster({"PGHOST": os.environ["PGHOST"], "PGPORT": os.environ["PGPORT"]})
    db = cluster.create_db("bench_app")
    chats = chatgen.realistic_chats(seed=3, count=args.chats, content_bytes=(400, 6000), messages=(1, 16))
    times: dict[str, list[float]] = {}
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE chat (id text PRIMARY KEY, user_id text, title text, chat json)")
        buf = io.StringIO()
        for c in chats:
            text = c.chat.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
            buf.write(f"{c.id}\t{c.user_id}\tt\t{text}\n")
        buf.seek(0)
        cur.copy_expert("COPY chat (id, user_id, title, chat) FROM STDIN", buf)
        cur.execute("SELECT pg_size_pretty(sum(pg_column_size(chat))), count(*) FROM chat")
        size, n = cur.fetchone()
        print(f"source: {n} chats, {size} stored")
        for _ in range(args.rounds):
            for mode in ("migration", "app"):
                cur.execute("DROP TABLE IF EXISTS chat_message")
                cur.execute(TARGET_DDL)
                cur.execute("CHECKPOINT")
                t = time.perf_counter()
                cur.execute("SELECT sum(messages_inserted) FROM backfill_chat_messages(now => 1760000000, rows => %s)",
                            (mode,))
                rows = int(cur.fetchone()[0])
                times.setdefault(f"backfill {mode}", []).append(time.perf_counter() - t)
                t = time.perf_counter()
                cur.execute("SELECT count(*) FROM chat_backfill.verify(rows => %s)", (mode,))
                findings = cur.fetchone()[0]
                times.setdefault(f"verify {mode}", []).append(time.perf_counter() - t)
                assert findings == 0, (mode, findings)
                print(f"{mode}: {rows} rows, backfill {times[f'backfill {mode}'][-1]:.2f} s, "
                      f"verify {times[f'verify {mode}'][-1]:.2f} s, 0 findings")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"median {k}: {v:.2f} s")
    print(f"app / migration: backfill {med['backfill app'] / med['backfill migration']:.2f}x, "
          f"verify {med['verify app'] / med['verify migration']:.2f}x")
    with cluster.connect() as conn, conn.cursor() as cur:
        cur.execute(f'DROP DATABASE "{db}"')


if __name__ == "__main__":
    main()
