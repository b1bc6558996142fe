"""Side-by-side benchmark of the chat_message backfill, on the same generated data, in one run.

    .venv/bin/python bench/run.py --mb 150 --big 2 [--fsync on] [--out bench/headline.md]
    .venv/bin/python bench/run.py --batch-sizes 100,500,1000,2000,5000,10000,50000 --out bench/batch_sizes.md

Methods: backfill_chat_messages() (`ours`); the committing CALL in one session (`call`) and
on 2 and 4 background workers (`call_w2`, `call_w4`); the portable SQL edition's committing
CALL (`portable_call`, portable/chat_backfill_portable.sql, installed before the clock starts); the equivalent single SQL statement,
json (`single_sql`) and as an expert writes it, jsonb parsed once per chat with jsonb_each
(`single_jsonb`); Open WebUI's real migration (wheel, Alembic; its Python imports happen
before the clock starts); and the physical floor, COPY of the already-expanded rows. Two DDL
modes: the reference's (primary key, 7 secondary indexes and the foreign key in place before
the load) and bulk-load order (primary key only; indexes, then the foreign key NOT VALID +
VALIDATE, after), timed end to end, with the load phase reported apart. Reports time,
messages/s, source MB/s, the peak RssAnon of each backend doing the work (sampled from /proc
during the run) and WAL bytes. The data is realistic, compressible chat text (prose with
non-ASCII words, markdown, code) with messages of 200 B to 20 KB, plus --big chats of 30 MB.
"""

from __future__ import annotations

import argparse
import math
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

PORTABLE_SQL = ROOT / "portable/chat_backfill_portable.sql"

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

# The statement a PostgreSQL expert would write: each document parsed once, as jsonb, and
# its messages walked with jsonb_each (json_each re-reads the text for every ->).
SINGLE_JSONB = """
INSERT INTO chat_message
SELECT c.id || '-' || m.key, c.id, c.user_id, m.value->>'role', m.value->>'parentId',
       coalesce(m.value->'content', 'null')::json, coalesce(m.value->'output', 'null')::json, m.value->>'model',
       coalesce(m.value->'files', 'null')::json, coalesce(m.value->'sources', 'null')::json,
       coalesce(m.value->'embeds', 'null')::json, coalesce((m.value->>'done')::boolean, true),
       coalesce(m.value->'statusHistory', 'null')::json, coalesce(m.value->'error', 'null')::json,
       coalesce(m.value->'usage', 'null')::json, ts.t, ts.t
FROM chat c
CROSS JOIN LATERAL (SELECT c.chat::jsonb AS doc) d
CROSS JOIN LATERAL jsonb_each(CASE WHEN jsonb_typeof(d.doc->'history'->'messages') = 'object'
                                   THEN d.doc->'history'->'messages' END) m
CROSS JOIN LATERAL (SELECT CASE WHEN r.t IS NULL OR r.t < 1577836800 OR r.t > %(now)s + 86400 THEN %(now)s ELSE r.t END AS t
                    FROM (SELECT CASE WHEN jsonb_typeof(m.value->'timestamp') <> 'number' THEN NULL
                                      WHEN (m.value->>'timestamp')::numeric > 10000000000
                                      THEN floor((m.value->>'timestamp')::numeric / 1000)::bigint
                                      ELSE trunc((m.value->>'timestamp')::numeric)::bigint END AS t) r) ts
WHERE c.user_id NOT LIKE 'shared-%%' AND jsonb_typeof(m.value) = 'object'
  AND coalesce(m.value->>'role', '') <> ''
ON CONFLICT (id) DO NOTHING
"""


def random_text(rng: random.Random, n: int) -> str:
    """Random, incompressible text (base64 of random bytes, with spaces): --text random."""
    raw = base64.b64encode(rng.randbytes(n * 3 // 4 + 3)).decode()[:n]
    return " ".join(raw[i:i + 60] for i in range(0, len(raw), 60))


WORDS = ("the of and to a in is that for it with as was on be at by this are from or have an they which one you "
         "were all we when there can more if no out so what up about into than them only other new some could time "
         "these two may first then do any like my now over such our man me even most made after also did many "
         "before must through back years where much your way well down should because each just those people how "
         "too little state good very make world still own see men work long get here between both life being under "
         "never day same another know while last might us great old year off come since against go came right used "
         "take three query index table column server latency cache thread buffer vector model token prompt answer "
         "naïve façade Größe données Привет мир 数据库 日本語 한국어 ñandú café déjà 😀 🚀 ✅").split()
CODE = ["def handler(event, context):", "    rows = fetch_rows(cursor, limit=100)", "    for row in rows:",
        "        total += row['amount'] * rate", "    return {\"status\": 200, \"body\": json.dumps(total)}",
        "SELECT id, created_at FROM chat_message WHERE chat_id = $1 ORDER BY created_at;",
        "const result = await fetch(`/api/v1/chats/${id}`, { method: 'GET' });", "if (!result.ok) throw new Error(msg);",
        "fn main() { let v: Vec<u32> = (0..10).map(|x| x * x).collect(); println!(\"{v:?}\"); }"]


def paragraph(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.12:
        lang = rng.choice(["python", "sql", "javascript", "rust"])
        return f"```{lang}\n" + "\n".join(rng.choice(CODE) for _ in range(rng.randint(3, 14))) + "\n```"
    if kind < 0.25:
        return "\n".join(f"- {' '.join(rng.choices(WORDS, k=rng.randint(3, 12)))}" for _ in range(rng.randint(2, 6)))
    head = f"## {' '.join(rng.choices(WORDS, k=rng.randint(2, 6))).capitalize()}\n\n" if kind < 0.32 else ""
    sentences = []
    for _ in range(rng.randint(2, 7)):
        words = rng.choices(WORDS, k=rng.randint(6, 24))
        if rng.random() < 0.2:
            words[rng.randrange(len(words))] = f"**{rng.choice(WORDS)}**"
        sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!"]))
    return head + " ".join(sentences)


class Prose:
    """Compressible chat text: paragraphs drawn from a pool of 4000 (prose with non-ASCII
    words, markdown lists and headings, code blocks) and cut to the size asked for."""

    def __init__(self, rng: random.Random):
        self.pool = [paragraph(rng) for _ in range(4000)]

    def text(self, rng: random.Random, n: int) -> str:
        parts, size = [], 0
        while size < n:
            p = rng.choice(self.pool)
            parts.append(p)
            size += len(p) + 2
        return "\n\n".join(parts)[:n]


TEXT: dict = {}


def text_of(rng: random.Random, n: int) -> str:
    if TEXT.get("kind") == "random":
        return random_text(rng, n)
    if "prose" not in TEXT:
        TEXT["prose"] = Prose(random.Random(7))
    return TEXT["prose"].text(rng, n)


def message_size(rng: random.Random) -> int:
    """200 B to 20 KB, log-uniform (most messages short, a long tail of long answers)."""
    return int(math.exp(rng.uniform(math.log(200), math.log(20_000))))


def chat_of_size(rng: random.Random, cid: str, size: int) -> str:
    ts = rng.randint(1_650_000_000, NOW - 10_000)
    messages = {}
    parent = None
    total, i = 0, 0
    while total < size or i == 0:
        mid = f"{cid}-{i}"
        content = text_of(rng, min(message_size(rng), max(200, size - total)))
        m = {"id": mid, "parentId": parent, "childrenIds": [], "role": "user" if i % 2 == 0 else "assistant",
             "content": content, "timestamp": ts + i}
        if i % 2:
            m.update(model="gpt-4o", done=True, usage={"total_tokens": rng.randint(1, 5000)})
        messages[mid] = m
        parent = mid
        total += len(content) + 200
        i += 1
    # As Open WebUI stores it (SQLAlchemy's JSON type: json.dumps, non-ASCII as \\u escapes).
    return json.dumps({"title": "t", "history": {"messages": messages, "currentId": parent}, "messages": []})


def skewed(rng: random.Random, total_mb: float) -> list[Chat]:
    """The skewed set: tiny chats of one or two messages of 100 to 600 bytes each (with --big chats of
    such short messages, most bytes and most messages are in a few chats)."""
    chats, total = [], 0
    while total < total_mb * 1e6:
        cid = f"{rng.getrandbits(48):012x}"
        doc = chat_of_short_messages(rng, cid, rng.randint(100, 1200))
        chats.append(Chat(cid, f"user-{rng.randint(1, 200)}", doc))
        total += len(doc)
    return chats


def chat_of_short_messages(rng: random.Random, cid: str, size: int) -> str:
    """A chat of `size` bytes of short messages (100 to 600 bytes of text each)."""
    ts = rng.randint(1_650_000_000, NOW - 10_000)
    messages, parent, total, i = {}, None, 0, 0
    while total < size or i == 0:
        mid = f"{cid}-{i}"
        content = text_of(rng, rng.randint(100, 600))
        messages[mid] = {"id": mid, "parentId": parent, "childrenIds": [], "role": "user" if i % 2 == 0 else "assistant",
                         "content": content, "timestamp": ts + i}
        parent = mid
        total += len(content) + 120
        i += 1
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
    """Peak RssAnon (private memory) of the backends doing the work, from /proc every 20 ms:
    `pid`, plus whatever `more()` names (background workers, found as they start). The peak
    is per backend (the largest any one reached)."""

    def __init__(self, pid: int | None, more=None):
        super().__init__(daemon=True)
        self.pids = {pid} if pid else set()
        self.more, self.peak_kb, self.stop = more, 0, threading.Event()

    def run(self):
        tick = 0
        while not self.stop.is_set():
            if self.more and tick % 25 == 0:
                self.pids |= set(self.more())
            tick += 1
            for pid in list(self.pids):
                try:
                    for line in open(f"/proc/{pid}/status"):
                        if line.startswith("RssAnon:"):
                            self.peak_kb = max(self.peak_kb, int(line.split()[1]))
                except OSError:
                    pass
            time.sleep(0.02)


class WaitSampler(threading.Thread):
    """What the backends doing the work wait on, from pg_stat_activity every 50 ms: the share
    of samples per wait event (no event: on CPU). Where parallel workers contend shows here:
    WAL insertion and flush (LWLock WALInsert/WALWrite, IO WALSync), index and heap pages
    (LWLock BufferContent), row locks (Lock transactionid/tuple, the foreign key's share locks)."""

    def __init__(self, dsn: str, db: str, exclude: int | None):
        super().__init__(daemon=True)
        self.dsn, self.db, self.exclude = dsn, db, exclude
        self.counts: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self):
        conn = psycopg2.connect(self.dsn)
        conn.autocommit = True
        with conn.cursor() as cur:
            while not self.stop.is_set():
                cur.execute("SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') FROM pg_stat_activity"
                            " WHERE datname = %s AND state = 'active' AND pid <> %s"
                            " AND backend_type IN ('client backend', 'chat_backfill worker')",
                            (self.db, self.exclude or 0))
                for (event,) in cur.fetchall():
                    self.counts[event] = self.counts.get(event, 0) + 1
                time.sleep(0.05)
        conn.close()

    def shares(self) -> dict[str, float]:
        total = sum(self.counts.values()) or 1
        return {k: v / total for k, v in sorted(self.counts.items(), key=lambda kv: -kv[1])}


def psql(dsn, sql, params=None, fetch=False):
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql, params)
        out = cur.fetchall() if fetch else None
    conn.close()
    return out


WORKERS = {"call": 1, "call_w2": 2, "call_w4": 4}


def run(env, template, method, mode, chats_mb, expanded_file, batch_size=None):
    # "<method>_lz4": the same on a target whose text and json columns compress with lz4
    # (ALTER TABLE ... SET COMPRESSION lz4, as plan() advises where the server has lz4).
    lz4 = method.endswith("_lz4")
    base = method.removesuffix("_lz4")
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
    if base == "portable_call":
        cur.execute("CREATE SCHEMA chat_backfill_portable")
        cur.execute(PORTABLE_SQL.read_text())
        cur.execute("RESET search_path; RESET client_min_messages")
    if method != "openwebui":
        cur.execute(TARGET_DDL if mode == "reference" else PK_ONLY_DDL)
    if lz4:
        cur.execute("SELECT string_agg(format('ALTER COLUMN %I SET COMPRESSION lz4', attname), ', ') FROM pg_attribute "
                    "WHERE attrelid = 'chat_message'::regclass AND attnum > 0 AND attlen = -1")
        cur.execute(f"ALTER TABLE chat_message {cur.fetchone()[0]}")
    if base == "ours_copy":
        # A statement trigger is one thing the direct path leaves to COPY (binary format here).
        cur.execute("CREATE FUNCTION pg_temp.nothing() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END'")
        cur.execute("CREATE TRIGGER s AFTER INSERT ON chat_message FOR EACH STATEMENT EXECUTE FUNCTION pg_temp.nothing()")
    cur.execute("CHECKPOINT")
    cur.execute("SELECT pg_backend_pid(), pg_current_wal_lsn()")
    pid, lsn0 = cur.fetchone()
    # One connection finds the backends doing the work, twice a second (a connection per look
    # would cost the methods measured a fork each time).
    watcher = psycopg2.connect(admin)
    watcher.autocommit = True

    def others():
        with watcher.cursor() as w:
            w.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> %s"
                      " AND backend_type IN ('client backend', 'chat_backfill worker')", (db, pid))
            return [r[0] for r in w.fetchall()]
    t0 = time.perf_counter()
    if method == "openwebui":
        # The migration runs in its own connection: sample the backend that does the work.
        sampler = RssSampler(None, others)
        sampler.start()
        run_reference(env["url"](db), NOW)
    else:
        sampler = RssSampler(pid, others if base in WORKERS else None)
        sampler.start()
        # With workers the CALL only waits: sample the workers, not it.
        waits = WaitSampler(admin, db, pid if base in WORKERS and WORKERS[base] > 1 else None)
        waits.start()
        size = f", batch_size => {int(batch_size)}" if batch_size else ""
        if base in ("ours", "baseline", "ours_text", "ours_copy"):
            if base == "ours_text":
                # A client encoding other than the database's makes the batches go to COPY in
                # its text format (the output here is ASCII either way).
                cur.execute("SET client_encoding = 'SQL_ASCII'")
            cur.execute(f"SELECT sum(messages_inserted) FROM backfill_chat_messages(now => %s{size})", (NOW,))
        elif base == "portable_call":
            cur.execute(f"CALL chat_backfill_portable.backfill_chat_messages_resumable(now => %s{size})", (NOW,))
        elif base in WORKERS:
            cur.execute(f"CALL backfill_chat_messages_resumable(now => %s, workers => {WORKERS[base]}{size})", (NOW,))
        elif base == "single_sql":
            cur.execute(SINGLE_STATEMENT, {"now": NOW})
        elif base == "single_jsonb":
            cur.execute(SINGLE_JSONB, {"now": NOW})
        elif base == "copy":
            with open(expanded_file) as f:
                cur.copy_expert("COPY chat_message FROM STDIN", f)
    loaded = time.perf_counter() - t0
    if mode == "bulk":
        for stmt in POST_LOAD:
            cur.execute(stmt)
    elapsed = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    if method != "openwebui":
        waits.stop.set()
        waits.join()
    watcher.close()
    cur.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn, (SELECT count(*) FROM chat_message)", (lsn0,))
    wal, rows = cur.fetchone()
    if method == "ours" and expanded_file and not os.path.exists(expanded_file):
        with open(expanded_file, "w") as f:
            cur.copy_expert("COPY chat_message TO STDOUT", f)
    conn.close()
    psql(admin, f'DROP DATABASE "{db}"')
    return {
        "method": method, "mode": mode, "seconds": elapsed, "load_seconds": loaded, "rows": rows,
        "msgs_per_s": rows / elapsed, "mb_per_s": chats_mb / elapsed, "batch_size": batch_size,
        "rss_mb": sampler.peak_kb / 1024 if sampler.peak_kb else None, "wal_mb": int(wal) / 1e6,
        "waits": waits.shares() if method != "openwebui" else {},
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
    ap.add_argument("--big", type=int, default=2, help="chats of --big-mb MB added to the data")
    ap.add_argument("--big-mb", type=int, default=30)
    ap.add_argument("--skewed", action="store_true",
                    help="--mb of tiny chats (1 or 2 short messages) instead of the realistic mix, and big chats of "
                         "short messages: most bytes and most messages in a few chats")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default=None)
    ap.add_argument("--fsync", choices=["on", "off"], default="on",
                    help="on: PostgreSQL's default durability (fsync, synchronous_commit on)")
    ap.add_argument("--text", choices=["realistic", "random"], default="realistic")
    ap.add_argument("--baseline", nargs=3, metavar=("VERSION", "LIBRARY", "SQL"),
                    help="also run a previous release: its version, its chat_backfill.so and its install script")
    ap.add_argument("--methods", default=None,
                    help="comma-separated subset of ours,ours_copy,ours_text,call,call_w2,call_w4,portable_call,baseline,single_sql,"
                         "single_jsonb,openwebui,copy, and copy_lz4,ours_lz4,call_w2_lz4 (target columns lz4)")
    ap.add_argument("--batch-sizes", default=None,
                    help="instead: the batch-size study, backfill_chat_messages() at each of these sizes in both modes")
    ap.add_argument("--datadir", default="/tmp/chat_backfill_bench",
                    help="the throwaway cluster's directory (PG_MAJOR picks the server)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run everything N times, this build and the baseline in alternating order; report medians")
    args = ap.parse_args()
    TEXT["kind"] = args.text
    if args.baseline:
        version, library, script = args.baseline
        so = f"/tmp/chat_backfill_baseline_{version}.so"
        shutil.copy(library, so)
        os.chmod(so, 0o755)
        BASELINE.update(version=version, so=so, sql=script)
    # Open WebUI's side is timed without its Python imports.
    import alembic.command  # noqa: F401
    import alembic.config  # noqa: F401
    import sqlalchemy.dialects.postgresql.psycopg2  # noqa: F401
    out = subprocess.run(["bash", str(ROOT / "scripts/cluster.sh"), "start", args.datadir,
                          "shared_buffers = '1GB'", "max_wal_size = '8GB'", "checkpoint_timeout = '30min'",
                          f"fsync = {args.fsync}", f"synchronous_commit = {args.fsync}"],
                         check=True, capture_output=True, text=True).stdout
    kv = dict(x.split("=", 1) for x in out.replace("export ", "").split())
    env = {
        "dsn": lambda db: f"host={kv['PGHOST']} port={kv['PGPORT']} user=postgres dbname={db}",
        "url": lambda db: f"postgresql://postgres@/{db}?host={kv['PGHOST']}&port={kv['PGPORT']}",
    }
    print(f"generating ~{args.mb} MB of chats and {args.big} of {args.big_mb} MB ...", flush=True)
    rng = random.Random(args.seed + 1)
    chats = skewed(rng, args.mb) if args.skewed else dataset(args.mb, args.seed)
    for i in range(args.big):
        cid = f"big{i:09x}"
        size = args.big_mb * 1_000_000
        chats.append(Chat(cid, "user-big", chat_of_short_messages(rng, cid, size) if args.skewed
                          else chat_of_size(rng, cid, size)))
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
    stored = psql(env["dsn"](template), "SELECT pg_total_relation_size('chat')", fetch=True)[0][0] / 1e6
    conn.close()
    print(f"{len(chats)} chats, {chats_mb:.1f} MB ({stored:.1f} MB stored)", flush=True)
    expanded = tempfile.mktemp(suffix=".copy")
    facts = {"n_chats": len(chats), "chats_mb": chats_mb, "stored_mb": stored, "shared_buffers": "1GB"}
    if args.batch_sizes:
        sizes = [int(x) for x in args.batch_sizes.split(",")]
        plan = [("ours", mode, size) for mode in ("reference", "bulk") for size in sizes]
    else:
        plan = [(m, "reference", None) for m in ("ours", "ours_copy", "ours_text", "baseline", "call", "call_w2",
                                                 "call_w4", "portable_call", "single_sql", "single_jsonb", "openwebui", "copy",
                                                 "copy_lz4", "ours_lz4", "call_w2_lz4")]
        plan += [(m, "bulk", None) for m in ("ours", "ours_copy", "ours_text", "baseline", "call", "call_w2", "call_w4",
                                             "portable_call", "single_sql", "single_jsonb", "copy", "copy_lz4", "ours_lz4",
                                             "call_w2_lz4")]
        wanted = set(args.methods.split(",")) if args.methods else {m for m, _, _ in plan}
        wanted |= {"ours", "copy"}  # every ratio is against these
        if not BASELINE:
            wanted.discard("baseline")
        plan = [step for step in plan if step[0] in wanted]
    # The first method of each mode pays for warming the copied database; alternate which
    # build that is, and report each method's median run.
    runs: dict = {}
    for n in range(args.repeat):
        order = plan if n % 2 == 0 or not BASELINE else [swap_builds(step) for step in plan]
        for method, mode, size in order:
            r = run(env, template, method, mode, chats_mb, expanded, size)
            runs.setdefault((method, mode, size), []).append(r)
            print(json.dumps(r), flush=True)
    results = [median_run(runs[step]) for step in plan]
    if os.path.exists(expanded):
        os.unlink(expanded)
    report = (render_sizes if args.batch_sizes else render)(results, facts, args)
    print(report)
    if args.out:
        Path(args.out).write_text(report)


def swap_builds(step):
    method, mode, size = step
    return ({"ours": "baseline", "baseline": "ours"}.get(method, method), mode, size)


def median_run(rs):
    return sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2]


NAMES = {"ours": "backfill_chat_messages()",
         "ours_copy": "backfill_chat_messages(), COPY binary format (a statement trigger on the target)",
         "ours_text": "backfill_chat_messages(), COPY text format (the same, client encoding not the database's)",
         "call": "CALL ..._resumable(), 1 session",
         "call_w2": "CALL ..._resumable(workers => 2)", "call_w4": "CALL ..._resumable(workers => 4)",
         "single_sql": "single SQL statement (json, json_each)",
         "single_jsonb": "single SQL statement (jsonb once per chat, jsonb_each)",
         "openwebui": "Open WebUI migration (wheel 0.12.4, Alembic, psycopg2)", "copy": "COPY of expanded rows (floor)",
         "copy_lz4": "COPY of expanded rows, target columns lz4", "ours_lz4": "backfill_chat_messages(), target columns lz4",
         "call_w2_lz4": "CALL ..._resumable(workers => 2), target columns lz4",
         "portable_call": "portable SQL edition: CALL chat_backfill_portable..._resumable()"}


def setup_line(facts, args) -> str:
    durability = ("PostgreSQL's default durability (fsync on, synchronous_commit on)" if args.fsync == "on"
                  else "fsync off, synchronous_commit off")
    text = ("realistic compressible chat text (prose with non-ASCII words, markdown, code; stored as Open WebUI "
            "stores it, non-ASCII as \\u escapes)" if args.text == "realistic" else "random base64 text")
    return (f"A throwaway PostgreSQL {os.environ.get('PG_MAJOR', '15')} cluster on this machine (2 cores): {durability}, shared_buffers "
            f"{facts['shared_buffers']}, max_wal_size 8GB; every method starts from a copy of the same loaded `chat` "
            f"table, after a CHECKPOINT. Data: {facts['n_chats']} generated chats, {facts['chats_mb']:.1f} MB of chat JSON "
            f"({facts['stored_mb']:.1f} MB stored, TOAST-compressed; seed {args.seed}): "
            + (f"the skewed set: tiny chats of 1 or 2 messages of 100-600 B, plus {args.big} chats of {args.big_mb} MB "
               f"of such messages; {text}." if args.skewed else
               f"55% under 10 KB, 33% of 10-100 KB, 12% of 150 KB to 4 MB, plus {args.big} chats of {args.big_mb} MB; "
               f"messages of 200 B to 20 KB (log-uniform); {text}.")
            + f" Each figure is the median of {args.repeat} run(s).")


def render(results, facts, args) -> str:
    by = {(r["method"], r["mode"]): r for r in results}
    names = dict(NAMES, baseline=f"backfill_chat_messages() {BASELINE.get('version')}")
    lines = [
        "| DDL mode | method | seconds | load phase s | messages/s | source MB/s | x COPY floor | peak RssAnon per backend (MB) | WAL (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        floor = by[("copy", r["mode"])]["seconds"]
        rss = f"{r['rss_mb']:.0f}" if r["rss_mb"] is not None else "n/a"
        load = f"{r['load_seconds']:.2f}" if r["mode"] == "bulk" else ""
        lines.append(f"| {r['mode']} | {names[r['method']]} | {r['seconds']:.2f} | {load} | {r['msgs_per_s']:.0f} | "
                     f"{r['mb_per_s']:.1f} | {r['seconds'] / floor:.2f} | {rss} | {r['wal_mb']:.0f} |")
    ratio = lambda a, b: f"{by[a]['seconds'] / by[b]['seconds']:.2f}x" if a in by and b in by else "n/a"
    ratios = [
        f"- this build vs {BASELINE.get('version')} (time ratio, under 1 is faster): "
        f"{ratio(('ours', 'reference'), ('baseline', 'reference'))} (reference DDL), "
        f"{ratio(('ours', 'bulk'), ('baseline', 'bulk'))} (bulk)" if BASELINE else "",
    ] + [
        f"- ours vs Open WebUI's migration (reference DDL): {ratio(('openwebui', 'reference'), ('ours', 'reference'))} faster",
        f"- ours (bulk-load order) vs Open WebUI's migration: {ratio(('openwebui', 'reference'), ('ours', 'bulk'))} faster",
        f"- ours vs the expert's single statement (jsonb): {ratio(('single_jsonb', 'reference'), ('ours', 'reference'))} "
        f"(reference DDL), {ratio(('single_jsonb', 'bulk'), ('ours', 'bulk'))} (bulk); vs the json one: "
        f"{ratio(('single_sql', 'reference'), ('ours', 'reference'))}, {ratio(('single_sql', 'bulk'), ('ours', 'bulk'))}",
        f"- ours (direct path) vs ours through COPY's binary format, time ratio: "
        f"{ratio(('ours', 'reference'), ('ours_copy', 'reference'))} (reference DDL), "
        f"{ratio(('ours', 'bulk'), ('ours_copy', 'bulk'))} (bulk); COPY binary vs the COPY floor: "
        f"{ratio(('ours_copy', 'reference'), ('copy', 'reference'))}, {ratio(('ours_copy', 'bulk'), ('copy', 'bulk'))}"
        if ('ours_copy', 'reference') in by else "",
        f"- ours with COPY's text format vs the COPY floor: "
        f"{ratio(('ours_text', 'reference'), ('copy', 'reference'))}, {ratio(('ours_text', 'bulk'), ('copy', 'bulk'))}"
        if ('ours_text', 'reference') in by else "",
        f"- lz4 on the target's columns, vs the pglz COPY floor: COPY {ratio(('copy_lz4', 'reference'), ('copy', 'reference'))}, "
        f"ours {ratio(('ours_lz4', 'reference'), ('copy', 'reference'))}, two workers "
        f"{ratio(('call_w2_lz4', 'reference'), ('copy', 'reference'))} (reference DDL); "
        f"COPY {ratio(('copy_lz4', 'bulk'), ('copy', 'bulk'))}, ours {ratio(('ours_lz4', 'bulk'), ('copy', 'bulk'))}, "
        f"two workers {ratio(('call_w2_lz4', 'bulk'), ('copy', 'bulk'))} (bulk)"
        if ('ours_lz4', 'reference') in by or ('copy_lz4', 'reference') in by else "",
        f"- ours vs the COPY floor: {ratio(('ours', 'reference'), ('copy', 'reference'))} (reference DDL), "
        f"{ratio(('ours', 'bulk'), ('copy', 'bulk'))} (bulk); the committing CALL, one session: "
        f"{ratio(('call', 'reference'), ('copy', 'reference'))}, {ratio(('call', 'bulk'), ('copy', 'bulk'))}",
        f"- the portable SQL edition's CALL vs the extension's CALL, one session (time ratio): "
        f"{ratio(('portable_call', 'reference'), ('call', 'reference'))} (reference DDL), "
        f"{ratio(('portable_call', 'bulk'), ('call', 'bulk'))} (bulk); Open WebUI's migration vs it: "
        f"{ratio(('openwebui', 'reference'), ('portable_call', 'reference'))}"
        if ('portable_call', 'reference') in by else "",
    ]
    ratios = [line for line in ratios if line]
    width = max(r["seconds"] for r in results)
    chart = ["```", "seconds, end to end (shorter is better)"] + [
        f"{r['mode']:9} {r['method']:12} {'#' * max(1, round(50 * r['seconds'] / width)):50} {r['seconds']:.2f}"
        for r in results
    ] + ["```"]
    parallel = render_parallel(by)
    return "\n".join([
        f"Rerun: `.venv/bin/python bench/run.py --mb {args.mb:g} --big {args.big} --big-mb {args.big_mb} --fsync {args.fsync} "
        f"--text {args.text} --repeat {args.repeat}" + (" --skewed" if args.skewed else "")
        + (f" --methods {args.methods}" if args.methods else "")
        + (f" --baseline {BASELINE['version']} LIBRARY SQL" if BASELINE else "") + "`. "
        + setup_line(facts, args),
        "",
        *lines,
        "",
        *chart,
        "",
        *ratios,
        "",
        *parallel,
        "Peak RssAnon is the private memory of the backend doing the work (for the CALL with workers, the largest "
        "of the CALL and its workers; not shared buffers). For Open WebUI the backend's figure is shown; its Python "
        "client holds the rest. WAL is measured from before the load to the end (including index builds in bulk mode).",
    ]) + "\n"


def render_parallel(by) -> list[str]:
    rows = ["| DDL mode | workers | load phase s | end to end s | x COPY floor (end to end) | load x one worker's load | "
            "messages/s per worker (load) | vs Open WebUI (end to end) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in ("reference", "bulk"):
        one = by.get(("call", mode))
        for method, n in (("call", 1), ("call_w2", 2), ("call_w4", 4)):
            r = by.get((method, mode))
            if not r or not one:
                continue
            ow = by.get(("openwebui", "reference"))
            rows.append(f"| {mode} | {n} | {r['load_seconds']:.2f} | {r['seconds']:.2f} | "
                        f"{r['seconds'] / by[('copy', mode)]['seconds']:.2f} | {r['load_seconds'] / one['load_seconds']:.2f} | "
                        f"{r['rows'] / r['load_seconds'] / n:.0f} | "
                        f"{(ow['seconds'] / r['seconds']) if ow else float('nan'):.2f}x faster |")
    if len(rows) == 2:
        return []
    waits = ["| DDL mode | method | where the working backends were (share of 50 ms samples of pg_stat_activity) |",
             "|---|---|---|"]
    for mode in ("reference", "bulk"):
        for method in ("copy", "call", "call_w2", "call_w4"):
            r = by.get((method, mode))
            if r and r.get("waits"):
                top = ", ".join(f"{k} {v:.0%}" for k, v in list(r["waits"].items())[:5])
                waits.append(f"| {mode} | {method} | {top} |")
    return ["Parallel (the committing CALL; this machine has 2 cores, so 4 workers share them):", "", *rows, "",
            *waits, ""]


def render_sizes(results, facts, args) -> str:
    lines = ["| DDL mode | batch_size | seconds | load phase s | messages/s | peak RssAnon (MB) | WAL (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['mode']} | {r['batch_size']} | {r['seconds']:.2f} | {r['load_seconds']:.2f} | "
                     f"{r['msgs_per_s']:.0f} | {r['rss_mb']:.0f} | {r['wal_mb']:.0f} |")
    width_t = max(r["seconds"] for r in results)
    width_m = max(r["rss_mb"] for r in results)
    chart = ["```", "batch_size   seconds (end to end)                      peak RssAnon MB"]
    for r in results:
        chart.append(f"{r['mode'][:3]} {r['batch_size']:>6} {'#' * max(1, round(30 * r['seconds'] / width_t)):30} "
                     f"{r['seconds']:6.2f}  {'=' * max(1, round(20 * r['rss_mb'] / width_m)):20} {r['rss_mb']:.0f}")
    chart.append("```")
    return "\n".join([
        f"Rerun: `.venv/bin/python bench/run.py --mb {args.mb:g} --big {args.big} --fsync {args.fsync} --text {args.text} "
        f"--repeat {args.repeat} --batch-sizes {args.batch_sizes}`. " + setup_line(facts, args)
        + " The one-transaction `backfill_chat_messages(batch_size => n)`.",
        "", *lines, "", *chart, "",
    ]) + "\n"


if __name__ == "__main__":
    main()
