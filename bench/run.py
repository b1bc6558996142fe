"""Side-by-side benchmark of the chat_message backfill, on the same generated data, in one run.

    .venv/bin/python bench/run.py --mb 150 [--out BENCHMARKS.md]

Methods: backfill_chat_messages(); the equivalent single SQL statement (INSERT ... SELECT
... FROM chat, json_each(...)); Open WebUI's real migration (wheel, Alembic); and the
physical floor, COPY of the already-expanded rows. Two DDL modes: the reference's (primary
key, 7 secondary indexes and the foreign key in place before the load) and bulk-load order
(primary key only; indexes, then the foreign key NOT VALID + VALIDATE, after), timed end to
end. Reports time, messages/s, source MB/s, the backend's peak RssAnon (sampled from
/proc during the run) and WAL bytes.
"""

from __future__ import annotations

import argparse
import shutil
import base64
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests/client"))

import psycopg2  # noqa: E402

from load_sample import TARGET_DDL, copy_chats  # noqa: E402
from chatgen import Chat, NOW  # noqa: E402
from reference import run_reference  # noqa: E402

PK_ONLY_DDL = TARGET_DDL.split(";")[0].replace(
    "chat_id text NOT NULL REFERENCES chat(id) ON DELETE CASCADE", "chat_id text NOT NULL"
)
POST_LOAD = [s.strip() for s in TARGET_DDL.split(";")[1:] if s.strip()] + [
    "ALTER TABLE chat_message ADD CONSTRAINT chat_message_chat_id_fkey FOREIGN KEY (chat_id) "
    "REFERENCES chat(id) ON DELETE CASCADE NOT VALID",
    "ALTER TABLE chat_message VALIDATE CONSTRAINT chat_message_chat_id_fkey",
]

SINGLE_STATEMENT = """
INSERT INTO chat_message
SELECT c.id || '-' || m.key, c.id, c.user_id, m.value->>'role', m.value->>'parentId',
       coalesce(m.value->'content', 'null'), coalesce(m.value->'output', 'null'), m.value->>'model',
       coalesce(m.value->'files', 'null'), coalesce(m.value->'sources', 'null'),
       coalesce(m.value->'embeds', 'null'), coalesce((m.value->>'done')::boolean, true),
       coalesce(m.value->'statusHistory', 'null'), coalesce(m.value->'error', 'null'),
       coalesce(m.value->'usage', 'null'), ts.t, ts.t
FROM chat c
CROSS JOIN LATERAL json_each(c.chat->'history'->'messages') m
CROSS JOIN LATERAL (SELECT CASE WHEN r.t IS NULL OR r.t < 1577836800 OR r.t > %(now)s + 86400 THEN %(now)s ELSE r.t END AS t
                    FROM (SELECT CASE WHEN (m.value->>'timestamp')::numeric > 10000000000
                                      THEN floor((m.value->>'timestamp')::numeric / 1000)::bigint
                                      ELSE trunc((m.value->>'timestamp')::numeric)::bigint END AS t) r) ts
WHERE c.user_id NOT LIKE 'shared-%%' AND json_typeof(m.value) = 'object'
  AND coalesce(m.value->>'role', '') <> ''
ON CONFLICT (id) DO NOTHING
"""


def text_of(rng: random.Random, n: int) -> str:
    """Random, incompressible text (base64 of random bytes, with spaces)."""
    raw = base64.b64encode(rng.randbytes(n * 3 // 4 + 3)).decode()[:n]
    return " ".join(raw[i:i + 60] for i in range(0, len(raw), 60))


def chat_of_size(rng: random.Random, cid: str, size: int) -> str:
    n = max(1, min(400, size // 1500))
    per = max(16, size // n - 200)
    ts = rng.randint(1_650_000_000, NOW - 10_000)
    messages = {}
    parent = None
    for i in range(n):
        mid = f"{cid}-{i}"
        m = {"id": mid, "parentId": parent, "childrenIds": [], "role": "user" if i % 2 == 0 else "assistant",
             "content": text_of(rng, per), "timestamp": ts + i}
        if i % 2:
            m.update(model="gpt-4o", done=True, usage={"total_tokens": rng.randint(1, 5000)})
        messages[mid] = m
        parent = mid
    return json.dumps({"title": "t", "history": {"messages": messages, "currentId": parent}, "messages": []})


def dataset(total_mb: float, seed: int) -> list[Chat]:
    """Sizes modelled on a real 68 GB installation: 55% under 10 KB (mean 4 KB), 33% of
    10-100 KB (mean 27 KB), 12% of hundreds of KB to MBs (the tail, scaled to the set)."""
    rng = random.Random(seed)
    chats, total, i = [], 0, 0
    while total < total_mb * 1e6:
        r = rng.random()
        if r < 0.55:
            size = int(min(9_900, rng.expovariate(1 / 4_000) + 300))
        elif r < 0.88:
            size = int(min(99_000, 10_000 + rng.expovariate(1 / 17_000)))
        else:
            size = int(min(4_000_000, 150_000 + rng.expovariate(1 / 350_000)))
        cid = f"{rng.getrandbits(48):012x}"
        doc = chat_of_size(rng, cid, size)
        chats.append(Chat(cid, f"user-{rng.randint(1, 200)}", doc))
        total += len(doc)
        i += 1
    return chats


class RssSampler(threading.Thread):
    """Peak RssAnon (private memory) of one backend, from /proc every 20 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_kb, self.stop = pid, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                for line in open(f"/proc/{self.pid}/status"):
                    if line.startswith("RssAnon:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            except OSError:
                pass
            time.sleep(0.02)


def psql(dsn, sql, params=None, fetch=False):
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql, params)
        out = cur.fetchall() if fetch else None
    conn.close()
    return out


def run(env, template, method, mode, chats_mb, expanded_file):
    db = f"b_{method}_{mode}_{os.getpid()}"
    admin = env["dsn"]("postgres")
    psql(admin, f'DROP DATABASE IF EXISTS "{db}"')
    psql(admin, f'CREATE DATABASE "{db}" TEMPLATE "{template}"')
    dsn = env["dsn"](db)
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    cur = conn.cursor()
    if method == "baseline":
        install_baseline(cur, BASELINE)
    if method != "openwebui":
        cur.execute(TARGET_DDL if mode == "reference" else PK_ONLY_DDL)
    cur.execute("CHECKPOINT")
    cur.execute("SELECT pg_backend_pid(), pg_current_wal_lsn()")
    pid, lsn0 = cur.fetchone()
    sampler = None
    t0 = time.perf_counter()
    if method == "openwebui":
        # The migration runs in its own connection: sample the backend that does the work.
        done = threading.Event()
        pids = {}

        def find_backend():
            while not done.is_set():
                rows = psql(admin, "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> %s",
                            (db, pid), fetch=True)
                if rows and "s" not in pids:
                    pids["s"] = RssSampler(rows[0][0])
                    pids["s"].start()
                time.sleep(0.05)

        finder = threading.Thread(target=find_backend, daemon=True)
        finder.start()
        run_reference(env["url"](db), NOW)
        done.set()
        sampler = pids.get("s")
    else:
        sampler = RssSampler(pid)
        sampler.start()
        if method in ("ours", "baseline"):
            cur.execute("SELECT sum(messages_inserted) FROM backfill_chat_messages(now => %s)", (NOW,))
        elif method == "single_sql":
            cur.execute(SINGLE_STATEMENT, {"now": NOW})
        elif method == "copy":
            with open(expanded_file) as f:
                cur.copy_expert("COPY chat_message FROM STDIN", f)
    if mode == "bulk":
        for stmt in POST_LOAD:
            cur.execute(stmt)
    elapsed = time.perf_counter() - t0
    if sampler:
        sampler.stop.set()
    cur.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn, (SELECT count(*) FROM chat_message)", (lsn0,))
    wal, rows = cur.fetchone()
    if method == "ours" and expanded_file and not os.path.exists(expanded_file):
        with open(expanded_file, "w") as f:
            cur.copy_expert("COPY chat_message TO STDOUT", f)
    conn.close()
    psql(admin, f'DROP DATABASE "{db}"')
    return {
        "method": method, "mode": mode, "seconds": elapsed, "rows": rows,
        "msgs_per_s": rows / elapsed, "mb_per_s": chats_mb / elapsed,
        "rss_mb": (sampler.peak_kb / 1024) if sampler else None, "wal_mb": int(wal) / 1e6,
    }


# A previous release to run side by side with this build (--baseline), loaded by path.
BASELINE: dict = {}


def install_baseline(cur, baseline) -> None:
    """Replaces this build's extension in a copied database with a previous release's SQL
    pointing at that release's library by path (both libraries can then be in one cluster)."""
    cur.execute("DROP EXTENSION chat_backfill")
    sql = Path(baseline["sql"]).read_text()
    sql = sql.replace("'MODULE_PATHNAME'", f"'{baseline['so']}'").replace("@extschema@", "public")
    # Only an extension script may register its tables for pg_dump.
    sql = "\n".join(line for line in sql.splitlines() if "pg_extension_config_dump" not in line)
    cur.execute(sql)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=150)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default=None)
    ap.add_argument("--baseline", nargs=3, metavar=("VERSION", "LIBRARY", "SQL"),
                    help="also run a previous release: its version, its chat_backfill.so and its install script")
    ap.add_argument("--methods", default=None, help="comma-separated subset of ours,baseline,single_sql,openwebui,copy")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run everything N times, this build and the baseline in alternating order; report medians")
    args = ap.parse_args()
    if args.baseline:
        version, library, script = args.baseline
        so = f"/tmp/chat_backfill_baseline_{version}.so"
        shutil.copy(library, so)
        os.chmod(so, 0o755)
        BASELINE.update(version=version, so=so, sql=script)
    out = subprocess.run(["bash", str(ROOT / "scripts/cluster.sh"), "start", "/tmp/chat_backfill_bench",
                          "shared_buffers = '1GB'", "max_wal_size = '8GB'", "checkpoint_timeout = '30min'"],
                         check=True, capture_output=True, text=True).stdout
    kv = dict(x.split("=", 1) for x in out.replace("export ", "").split())
    env = {
        "dsn": lambda db: f"host={kv['PGHOST']} port={kv['PGPORT']} user=postgres dbname={db}",
        "url": lambda db: f"postgresql://postgres@/{db}?host={kv['PGHOST']}&port={kv['PGPORT']}",
    }
    print(f"generating ~{args.mb} MB of chats ...", flush=True)
    chats = dataset(args.mb, args.seed)
    chats_mb = sum(len(c.chat) for c in chats) / 1e6
    template = "bench_template"
    admin = env["dsn"]("postgres")
    psql(admin, f'DROP DATABASE IF EXISTS "{template}"')
    psql(admin, f'CREATE DATABASE "{template}"')
    conn = psycopg2.connect(env["dsn"](template))
    conn.autocommit = True
    conn.cursor().execute("CREATE EXTENSION chat_backfill")
    conn.cursor().execute("CREATE TABLE chat (id text PRIMARY KEY, user_id text, title text, chat json)")
    copy_chats(conn, chats)
    conn.cursor().execute("VACUUM ANALYZE chat")
    conn.close()
    print(f"{len(chats)} chats, {chats_mb:.1f} MB", flush=True)
    expanded = tempfile.mktemp(suffix=".copy")
    plan = [("ours", "reference"), ("baseline", "reference"), ("single_sql", "reference"), ("openwebui", "reference"),
            ("copy", "reference"), ("ours", "bulk"), ("baseline", "bulk"), ("single_sql", "bulk"), ("copy", "bulk")]
    wanted = set(args.methods.split(",")) if args.methods else {"ours", "single_sql", "openwebui", "copy", "baseline"}
    wanted |= {"ours", "copy"}  # every ratio is against these
    if not BASELINE:
        wanted.discard("baseline")
    plan = [(m, mode) for m, mode in plan if m in wanted]
    # The first method of each mode pays for warming the copied database; alternate which
    # build that is, and report each method's median run.
    runs: dict = {}
    for n in range(args.repeat):
        order = plan if n % 2 == 0 else [swap_builds(step) for step in plan]
        for method, mode in order:
            r = run(env, template, method, mode, chats_mb, expanded)
            runs.setdefault((method, mode), []).append(r)
            print(json.dumps(r), flush=True)
    results = [median_run(runs[step]) for step in plan]
    os.unlink(expanded)
    report = render(results, len(chats), chats_mb, args)
    print(report)
    if args.out:
        Path(args.out).write_text(report)


def swap_builds(step):
    method, mode = step
    return ({"ours": "baseline", "baseline": "ours"}.get(method, method), mode)


def median_run(rs):
    return sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2]


def render(results, n_chats, chats_mb, args) -> str:
    by = {(r["method"], r["mode"]): r for r in results}
    names = {"ours": "backfill_chat_messages()", "baseline": f"backfill_chat_messages() {BASELINE.get('version')}",
             "single_sql": "single SQL statement (json_each)",
             "openwebui": "Open WebUI migration (wheel 0.12.4, Alembic, psycopg2)", "copy": "COPY of expanded rows (floor)"}
    lines = [
        "| DDL mode | method | seconds | messages/s | source MB/s | x COPY floor | peak RssAnon (MB) | WAL (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        floor = by[("copy", r["mode"])]["seconds"]
        rss = f"{r['rss_mb']:.0f}" if r["rss_mb"] is not None else "n/a"
        lines.append(f"| {r['mode']} | {names[r['method']]} | {r['seconds']:.2f} | {r['msgs_per_s']:.0f} | "
                     f"{r['mb_per_s']:.1f} | {r['seconds'] / floor:.2f} | {rss} | {r['wal_mb']:.0f} |")
    ours_ref, ours_bulk = by[("ours", "reference")], by[("ours", "bulk")]
    ratio = lambda a, b: f"{by[a]['seconds'] / by[b]['seconds']:.2f}x" if a in by and b in by else "n/a"
    ratios = [
        f"- this build vs {BASELINE.get('version')} (time ratio, under 1 is faster): "
        f"{ratio(('ours', 'reference'), ('baseline', 'reference'))} (reference DDL), "
        f"{ratio(('ours', 'bulk'), ('baseline', 'bulk'))} (bulk)" if BASELINE else "",
    ] + [
        f"- ours vs Open WebUI's migration (reference DDL): {ratio(('openwebui', 'reference'), ('ours', 'reference'))} faster",
        f"- ours (bulk-load order) vs Open WebUI's migration: {ratio(('openwebui', 'reference'), ('ours', 'bulk'))} faster",
        f"- ours vs the single SQL statement: {ratio(('single_sql', 'reference'), ('ours', 'reference'))} (reference DDL), "
        f"{ratio(('single_sql', 'bulk'), ('ours', 'bulk'))} (bulk)",
        f"- ours vs the COPY floor: {ratio(('ours', 'reference'), ('copy', 'reference'))} (reference DDL), "
        f"{ratio(('ours', 'bulk'), ('copy', 'bulk'))} (bulk)",
    ]
    ratios = [line for line in ratios if line]
    width = max(r["seconds"] for r in results)
    chart = ["```", "seconds (shorter is better)"] + [
        f"{r['mode']:9} {r['method']:10} {'#' * max(1, round(40 * r['seconds'] / width)):40} {r['seconds']:.2f}"
        for r in results
    ] + ["```"]
    return "\n".join([
        "# Benchmarks",
        "",
        f"Rerun: `bash scripts/setup.sh && .venv/bin/python bench/run.py --mb {args.mb:g} --repeat {args.repeat}"
        + (f" --baseline {BASELINE['version']} LIBRARY SQL" if BASELINE else "") + " --out BENCHMARKS.md` "
        "(a throwaway cluster on this machine: shared_buffers 1GB, fsync off; every method starts from a "
        "copy of the same loaded `chat` table, after a CHECKPOINT). "
        f"Each figure is the median of {args.repeat} run(s); this build and the baseline take turns going first.",
        "",
        f"Data: {n_chats} generated chats, {chats_mb:.1f} MB of chat JSON (seed {args.seed}): 55% under 10 KB, "
        "33% of 10-100 KB, 12% of 150 KB to 4 MB; random base64 text. Machine: 2 cores, PostgreSQL 15 (Debian).",
        "",
        *lines,
        "",
        *chart,
        "",
        *ratios,
        "",
        "Peak RssAnon is the backend's private memory (not shared buffers). For Open WebUI the backend's figure "
        "is shown; its Python client holds the rest. WAL is measured from before the load to the end "
        "(including index builds in bulk mode).",
    ]) + "\n"


if __name__ == "__main__":
    main()
