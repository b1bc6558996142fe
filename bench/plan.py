"""How close chat_backfill.plan() comes to the run it estimates, on the benchmark data.

    .venv/bin/python bench/plan.py [--mb 150] [--big 2] [--repeat 3] [--out bench/plan.md]

The data is bench/run.py's (same generator and seed) plus --big chats of 30 MB each (the
largest chats real installations have). A throwaway cluster with PostgreSQL's default
durability (fsync and synchronous_commit on). For each DDL mode and sample size: plan() on
a fresh copy (its own time is reported), then the one-transaction run with its defaults
(admission control included: what admission took, from its DEBUG1 line, is reported too)
measured for time, WAL (pg_current_wal_lsn before and after), target growth
(pg_total_relation_size), rows and chats; then the target is emptied and the committing
CALL is timed. Ratios are estimate / measured. In bulk-load order the plan estimates the load
into the primary-key-only table, which is what is measured here (no index builds after).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests/client"))
sys.path.insert(0, str(ROOT / "bench"))

import psycopg2  # noqa: E402
import psycopg2.errors  # noqa: E402

from chatgen import NOW, Chat  # noqa: E402
from load_sample import TARGET_DDL, copy_chats  # noqa: E402
from run import PK_ONLY_DDL, chat_of_short_messages, chat_of_size, dataset, skewed  # noqa: E402

ITEMS = [("chats", "chats"), ("estimated_messages", "messages"), ("estimated_target_bytes", "target bytes"),
         ("estimated_wal_bytes", "WAL bytes"), ("estimated_seconds", "seconds, one transaction"),
         ("estimated_seconds_resumable", "seconds, committing CALL")]


@contextlib.contextmanager
def connect(dsn):
    """An autocommit connection closed on exit (psycopg2's own `with` opens a transaction)."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        yield conn
    finally:
        conn.close()


def measure(dsn, ddl, sample) -> dict:
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(ddl)
        cur.execute("CHECKPOINT")
        cur.execute(f"SET chat_backfill.plan_sample_size = '{sample}'")
        began = time.monotonic()
        cur.execute("SELECT item, value FROM chat_backfill.plan() WHERE value IS NOT NULL")
        est = {k: float(v) for k, v in cur.fetchall()}
        est["plan seconds"] = time.monotonic() - began
        # What the estimate's constants are fitted from: the trial's parts, logged at DEBUG1.
        cur.execute("SET client_min_messages = debug1")
        cur.execute("SELECT count(*) FROM chat_backfill.plan()")
        trial = [n.strip() for n in conn.notices if "chat_backfill trial:" in n]
        cur.execute("RESET client_min_messages")
        # A fresh session, so that the run does not profit from the plan's warm caches more than
        # any run after a plan would.
    with connect(dsn) as conn, conn.cursor() as cur:
        # No checkpoint of what came before lands in the timed run.
        cur.execute("CHECKPOINT")
        cur.execute("SELECT pg_total_relation_size('chat_message'), pg_current_wal_lsn()")
        size0, lsn0 = cur.fetchone()
        # The run as a user starts it, admission control included; what admission took is in
        # its DEBUG1 line.
        cur.execute("SET client_min_messages = debug1")
        conn.notices.clear()
        began = time.monotonic()
        cur.execute("SELECT sum(messages_inserted + messages_rejected + messages_existing), sum(chats_read) "
                    "FROM backfill_chat_messages(now => %s)", (NOW,))
        messages, chats = cur.fetchone()
        seconds = time.monotonic() - began
        cur.execute("RESET client_min_messages")
        admitted = [n for n in conn.notices if "chat_backfill admission:" in n]
        if admitted:
            est["admission seconds"] = float(admitted[-1].split("admission:")[1].split(" s,")[0])
            est["admission looks"] = 1.0 if "first look" in admitted[-1] else 2.0
        cur.execute("SELECT pg_total_relation_size('chat_message') - %s, pg_wal_lsn_diff(pg_current_wal_lsn(), %s)",
                    (size0, lsn0))
        grown, wal = cur.fetchone()
        cur.execute("TRUNCATE chat_message")
        cur.execute("CHECKPOINT")
        began = time.monotonic()
        cur.execute("CALL backfill_chat_messages_resumable(now => %s)", (NOW,))
        resumable = time.monotonic() - began
    got = {"chats": chats, "estimated_messages": messages, "estimated_target_bytes": grown,
           "estimated_wal_bytes": float(wal), "estimated_seconds": seconds, "estimated_seconds_resumable": resumable}
    return {"est": est, "got": got, "trial": trial[-1:]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=150)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--big", type=int, default=2, help="chats of --big-mb MB added to the data")
    ap.add_argument("--big-mb", type=int, default=30)
    ap.add_argument("--skewed", action="store_true",
                    help="--mb of tiny chats (1 or 2 short messages) instead of bench/run.py's mix, and big chats of "
                         "short messages: most bytes and most messages in a few chats")
    ap.add_argument("--samples", default="4MB,16MB,64MB")
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell; the table shows each figure's median")
    args = ap.parse_args()
    out = subprocess.run(["bash", str(ROOT / "scripts/cluster.sh"), "start", "/tmp/chat_backfill_planbench",
                          "fsync = on", "synchronous_commit = on", "shared_buffers = '1GB'"],
                         check=True, capture_output=True, text=True).stdout
    kv = dict(x.split("=", 1) for x in out.replace("export ", "").split())
    dsn = lambda db: f"host={kv['PGHOST']} port={kv['PGPORT']} user=postgres dbname={db}"  # noqa: E731
    rng = random.Random(args.seed + 1)
    chats = skewed(rng, args.mb) if args.skewed else dataset(args.mb, args.seed)
    for i in range(args.big):
        cid = f"big{i:09x}"
        size = args.big_mb * 1_000_000
        chats.append(Chat(cid, "user-big", chat_of_short_messages(rng, cid, size) if args.skewed
                          else chat_of_size(rng, cid, size)))
    chats_mb = sum(len(c.chat) for c in chats) / 1e6
    with connect(dsn("postgres")) as conn, conn.cursor() as cur:
        cur.execute("DROP DATABASE IF EXISTS plan_template")
        cur.execute("CREATE DATABASE plan_template")
    with connect(dsn("plan_template")) as conn, conn.cursor() as cur:
        cur.execute("CREATE EXTENSION chat_backfill")
        cur.execute("CREATE TABLE chat (id text PRIMARY KEY, user_id text, title text, chat json)")
        copy_chats(conn, chats)
        cur.execute("VACUUM ANALYZE chat")
        cur.execute("SELECT pg_total_relation_size('chat'), current_setting('server_version')")
        source_bytes, version = cur.fetchone()
    print(f"{len(chats)} chats, {chats_mb:.1f} MB of JSON, {source_bytes / 1e6:.1f} MB as stored", flush=True)
    results = []
    for mode, ddl in (("reference", TARGET_DDL), ("bulk", PK_ONLY_DDL)):
        for sample in args.samples.split(","):
            db = f"plan_{mode}_{sample.lower()}"
            runs = []
            for _ in range(args.repeat):
                with connect(dsn("postgres")) as conn, conn.cursor() as cur:
                    cur.execute(f"DROP DATABASE IF EXISTS {db}")
                    cur.execute(f"CREATE DATABASE {db} TEMPLATE plan_template")
                runs.append(measure(dsn(db), ddl, sample))
                print(runs[-1], flush=True)
                with connect(dsn("postgres")) as conn, conn.cursor() as cur:
                    cur.execute(f"DROP DATABASE {db}")
            r = {side: {k: statistics.median(float(run[side][k]) for run in runs) for k in runs[0][side]}
                 for side in ("est", "got")}
            r["trials"] = [t for run in runs for t in run["trial"]]
            r.update(mode=mode, sample=sample)
            results.append(r)
    subprocess.run(["bash", str(ROOT / "scripts/cluster.sh"), "stop", "/tmp/chat_backfill_planbench"], check=False)
    report = render(results, len(chats), chats_mb, source_bytes, version, args)
    print(report)
    if args.out:
        Path(args.out).write_text(report)


def render(results, n_chats, chats_mb, source_bytes, version, args) -> str:
    lines = [
        (f"Data (skewed): {args.mb:.0f} MB of tiny chats (1 or 2 messages of 100-600 B) plus {args.big} chats of "
         f"{args.big_mb} MB of such messages: {n_chats} chats, " if args.skewed else
         f"Data: bench/run.py's {args.mb:.0f} MB set (seed {args.seed}) plus {args.big} chats of {args.big_mb} MB: "
         f"{n_chats} chats, ") +
        f"{chats_mb:.1f} MB of JSON, {source_bytes / 1e6:.1f} MB as stored. PostgreSQL {version}, fsync and "
        f"synchronous_commit on, shared_buffers 1GB, 2 cores. Medians of {args.repeat} runs each (each on a fresh copy of the data).",
        "",
        "| DDL mode | sample | plan() s | admission s (% of the run; looks) | sample % | " + " | ".join(f"{label}: est / measured (ratio)" for _, label in ITEMS) + " |",
        "|---|---|---:|---:|---:|" + "---:|" * len(ITEMS),
    ]
    for r in results:
        cells = []
        for item, _ in ITEMS:
            est, got = r["est"].get(item), r["got"][item]
            if est is None:
                cells.append("-")
                continue
            ratio = est / float(got) if got else float("nan")
            cells.append(f"{fmt(est, item)} / {fmt(got, item)} ({ratio:.2f})")
        lines.append(f"| {r['mode']} | {r['sample']} | {r['est']['plan seconds']:.2f} | "
                     f"{admission(r)} | {r['est'].get('sample', 0):.1f} | "
                     + " | ".join(cells) + " |")
    worst = max(max(r["est"][i] / float(r["got"][i]), float(r["got"][i]) / r["est"][i])
                for r in results for i, _ in ITEMS if r["got"][i] and r["est"].get(i))
    lines += ["", f"Largest deviation either way: {worst:.2f}x."]
    return "\n".join(lines) + "\n"


def admission(r) -> str:
    """What admission control took inside the measured one-transaction run."""
    took = r["est"].get("admission seconds")
    if took is None:
        return "-"
    return (f"{took:.3f} ({100 * took / float(r['got']['estimated_seconds']):.1f}%; "
            f"{r['est'].get('admission looks', 0):.0f})")


def fmt(value, item) -> str:
    value = float(value)
    if "bytes" in item:
        return f"{value / 1e6:.0f} MB"
    if "seconds" in item:
        return f"{value:.1f}"
    return f"{value:.0f}"


if __name__ == "__main__":
    os.environ.pop("PGHOST", None)
    main()
