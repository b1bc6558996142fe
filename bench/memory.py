"""Peak private memory of the backend during a backfill, on the shapes that cost memory.

    [PG_MAJOR=16] .venv/bin/python bench/memory.py [--out FILE] [--cases a,b,c,c2] [--seed 7] [--verify]
                                                   [--rows migration|app] [--stream-chats-over 1GB]

Cases (the target has Open WebUI's DDL, tests/client/load_sample.py TARGET_DDL):
  a   one chat of 1,000,000 tiny messages (~22 MB), batch_size 1000
  b   one ~50 MB chat of realistic text (words, markdown, code, non-ASCII; messages of
      200 B to 20 KB), default batch_size
  c   2000 chats x 10 messages of 20 KB (~400 MB), default batch_size
  c2  case c twice as large (4000 chats): memory must not grow with the table
  d   one chat of 1,000,000 messages that the rules reject (an object as role): recorded
      in chat_backfill.rejected_messages a batch at a time, none written
  t50, t200, t800   one chat of 50, 200, 800 MB of realistic text (issue 26)
  i50, i200, i800   the same sizes, every fourth message a pasted image of 0.5-3 MB as a
      base64 data URL (incompressible)
Each case runs twice: a first run into the empty target (the COPY path), then, after a
few rows are deleted, a re-run (COPY meets existing rows, the INSERT path writes the
missing ones). With --verify, 10 more rows are deleted and chat_backfill.verify() (the
migration's rows) is measured the same way. With --rows app, every call (verify() too)
makes the rows Open WebUI's app writes (`rows => 'app'`): a chat is all or nothing there.
With --stream-chats-over, every call runs with that `chat_backfill.stream_chats_over` (0:
every chat in a TOAST table streams; 1GB: every chat is held), to compare the two paths.

While the backfill runs, /proc/<backend pid>/status is sampled every 20 ms: peak RssAnon
(the backend's private memory: what the backfill allocates, not shared buffers) and
VmHWM (the kernel's high-water mark of the whole resident set, shared buffers touched
included; each measurement uses a fresh connection, so it covers that run only).

It starts its own cluster (scripts/cluster.sh start /tmp/cb_mem) and stops it. Progress
goes to stderr, the Markdown report to stdout (and to --out).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests/client"))

import psycopg2  # noqa: E402

from chatgen import NOW, Chat  # noqa: E402
from load_sample import TARGET_DDL, copy_chats  # noqa: E402

DATADIR = "/tmp/cb_mem"
CLUSTER = ROOT / "scripts/cluster.sh"
MB = 1_000_000  # chat sizes in 10^6 bytes; memory in MiB (kB / 1024), as bench/run.py


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Realistic, compressible text
# --------------------------------------------------------------------------------------

WORDS = """the of and to in is that for it as with was on be by this are or from at an which
have not but they you can all one has more their will if would about there been when what
so some other into only its time could than then these two may like use first any new
way people should each also make data model answer question example function value table
query index server client request response error result file memory batch message chat
history user assistant system context token output input stream config version update
performance database migration column string number list object parse return true false
simple better because however therefore instead usually often never always maybe really
""".split()
NON_ASCII = ["café", "naïve", "Straße", "größer", "niño", "déjà vu", "façade", "Ålesund", "Москва", "привет",
             "спасибо", "日本語", "中文", "東京", "한국어", "שלום", "مرحبا", "🙂", "🚀", "👍", "→", "…", "—", "±", "µs"]
LANGS = ["python", "rust", "sql", "javascript", "bash"]


def sentence(rng: random.Random) -> str:
    words = [rng.choice(NON_ASCII) if rng.random() < 0.04 else rng.choice(WORDS) for _ in range(rng.randint(5, 22))]
    if rng.random() < 0.15:
        i = rng.randrange(len(words))
        words[i] = rng.choice(["**%s**", "`%s`", "_%s_", "[%s](https://example.com/docs)"]) % words[i]
    return " ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!", ":"])


def code_block(rng: random.Random) -> str:
    lang = rng.choice(LANGS)
    names = [rng.choice(WORDS) + "_" + rng.choice(WORDS) for _ in range(4)]
    lines = []
    for _ in range(rng.randint(3, 25)):
        n = rng.choice(names)
        lines.append(rng.choice([
            f"def {n}(x, y=None):", f"    return {names[0]}(x) + {rng.randint(0, 999)}",
            f"let {n} = vec![{rng.randint(0, 9)}; {rng.randint(1, 64)}];", f"SELECT {n}, count(*) FROM {names[1]} GROUP BY 1;",
            f"const {n} = await fetch(`/api/{n}`);", f"for i in range({rng.randint(2, 100)}):",
            f'    print(f"{{i}}: {n}")', f"echo \"{n}\" | grep -c {names[2]}", f"    # {sentence(rng)}",
            f"if {n} is None: raise ValueError('{n}')",
        ]))
    return f"```{lang}\n" + "\n".join(lines) + "\n```"


def block(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.45:
        return " ".join(sentence(rng) for _ in range(rng.randint(1, 6)))
    if r < 0.6:
        return "\n".join(f"{rng.choice(['-', '*', '1.'])} {sentence(rng)}" for _ in range(rng.randint(2, 7)))
    if r < 0.8:
        return code_block(rng)
    if r < 0.9:
        cols = rng.randint(2, 5)
        rows = ["| " + " | ".join(rng.choice(WORDS) for _ in range(cols)) + " |" for _ in range(rng.randint(2, 8))]
        return "\n".join([rows[0], "|" + "---|" * cols] + rows[1:])
    return rng.choice(["## ", "### ", "> "]) + sentence(rng)


class TextPool:
    """Messages cut from a pool of a few thousand markdown blocks: realistic and compressible."""

    def __init__(self, rng: random.Random, blocks: int = 4000):
        self.rng = rng
        self.blocks = [block(rng) for _ in range(blocks)]

    def text(self, size: int) -> str:
        parts, n = [], 0
        while n < size:
            b = self.rng.choice(self.blocks)
            parts.append(b)
            n += len(b.encode()) + 2
        out = "\n\n".join(parts).encode()[:size]
        return out.decode(errors="ignore")


def chat_doc(rng: random.Random, pool: TextPool, cid: str, sizes: list[int]) -> str:
    """An Open WebUI chat: history.messages keyed by message id, a parent chain. The
    top-level `messages` list (never read by the migration) is left empty, so every byte
    of the document is in history.messages."""
    messages, parent = {}, None
    ts = rng.randint(1_650_000_000, NOW - 100_000)
    for i, size in enumerate(sizes):
        mid = f"{cid[:8]}-{i:06d}-{rng.getrandbits(32):08x}"
        m = {"id": mid, "parentId": parent, "childrenIds": [], "role": "user" if i % 2 == 0 else "assistant",
             "content": pool.text(size), "timestamp": ts + i}
        if i % 2:
            m.update(model="gpt-4o", modelName="GPT-4o", done=True,
                     usage={"prompt_tokens": rng.randint(1, 4000), "completion_tokens": rng.randint(1, 4000)})
        if parent is not None:
            messages[parent]["childrenIds"].append(mid)
        messages[mid] = m
        parent = mid
    return json.dumps({"id": cid, "title": "Chat " + cid[:6], "models": ["gpt-4o"],
                       "history": {"messages": messages, "currentId": parent}, "messages": [], "tags": [],
                       "timestamp": ts * 1000}, ensure_ascii=False)


# --------------------------------------------------------------------------------------
# The cases: each yields chunks of Chat rows (never the whole set in memory)
# --------------------------------------------------------------------------------------


def case_million(seed: int):
    body = ",".join(f'"{i:x}":{{"role":"user"}}' for i in range(1_000_000))
    yield [Chat("million", "user-1", '{"history":{"messages":{%s}}}' % body)]


def case_million_rejected(seed: int):
    """Every message is one the rules reject (an object as role): recorded, not written."""
    body = ",".join(f'"{i:x}":{{"role":{{"a":1}}}}' for i in range(1_000_000))
    yield [Chat("million-rejected", "user-1", '{"history":{"messages":{%s}}}' % body)]


def case_one_50mb(seed: int):
    rng = random.Random(seed)
    pool = TextPool(rng)
    sizes, total = [], 0
    while total < 50 * MB * 0.93:  # JSON framing brings it to ~50 MB
        s = int(200 * (100 ** rng.random()))  # log-uniform, 200 B .. 20 KB
        sizes.append(s)
        total += s
    yield [Chat("one-50mb", "user-1", chat_doc(rng, pool, "one50mb0000", sizes))]


def case_many_20kb(seed: int, chats: int):
    rng = random.Random(seed)
    pool = TextPool(rng)
    for start in range(0, chats, 100):
        chunk = []
        for i in range(start, min(chats, start + 100)):
            cid = f"{i:06d}-{rng.getrandbits(40):010x}"
            chunk.append(Chat(cid, f"user-{rng.randint(1, 200)}", chat_doc(rng, pool, cid, [20_000] * 10)))
        yield chunk


def case_big_chat(seed: int, mb: int, images: bool):
    """Issue 26: one chat of `mb` MB. Text-heavy: messages of realistic text, 200 B to
    20 KB. Image-heavy: every fourth message carries a pasted image as a data URL of 0.5 to
    3 MB of base64 (incompressible, as real images are), the way Open WebUI stores them in
    a message's `files`; the others are text as above."""
    rng = random.Random(seed)
    pool = TextPool(rng)
    sizes, total = [], 0
    while total < mb * MB * 0.93:
        s = int(200 * (100 ** rng.random()))
        sizes.append(s)
        total += s + (2_000_000 if images and len(sizes) % 4 == 0 else 0)
    doc = json.loads(chat_doc(rng, pool, f"big{mb}{'i' if images else 't'}00000", sizes))
    if images:
        for i, m in enumerate(doc["history"]["messages"].values()):
            if i % 4 == 3:
                raw = rng.randbytes(rng.randint(375_000, 2_250_000))
                m["files"] = [{"type": "image", "url": "data:image/png;base64," + base64.b64encode(raw).decode()}]
    yield [Chat(f"big-{mb}-{'images' if images else 'text'}", "user-1", json.dumps(doc, ensure_ascii=False))]


CASES = {
    "a": ("(a) 1 chat x 1,000,000 tiny messages, batch_size 1000", 1000, lambda s: case_million(s)),
    "b": ("(b) 1 chat of ~50 MB, messages 200 B-20 KB, batch_size 5000", 5000, lambda s: case_one_50mb(s)),
    "c": ("(c) 2000 chats x 10 messages of 20 KB, batch_size 5000", 5000, lambda s: case_many_20kb(s, 2000)),
    "c2": ("(c) x2: 4000 chats x 10 messages of 20 KB, batch_size 5000", 5000, lambda s: case_many_20kb(s, 4000)),
    "d": ("(d) 1 chat x 1,000,000 messages the rules reject (recorded, none written), batch_size 5000", 5000,
          lambda s: case_million_rejected(s)),
}
for _mb in (50, 200, 800):
    CASES[f"t{_mb}"] = (f"(t{_mb}) 1 chat of ~{_mb} MB of text, messages 200 B-20 KB", 5000,
                        lambda s, mb=_mb: case_big_chat(s, mb, images=False))
    CASES[f"i{_mb}"] = (f"(i{_mb}) 1 chat of ~{_mb} MB, every 4th message an image of 0.5-3 MB as a data URL", 5000,
                        lambda s, mb=_mb: case_big_chat(s, mb, images=True))


# --------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Peak RssAnon and VmHWM of one process, from /proc/<pid>/status every 20 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.rss_anon_kb = self.hwm_kb = 0
        self.samples = 0
        self.halt = threading.Event()

    def sample(self) -> None:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        self.rss_anon_kb = max(self.rss_anon_kb, int(line.split()[1]))
                    elif line.startswith("VmHWM:"):
                        self.hwm_kb = max(self.hwm_kb, int(line.split()[1]))
            self.samples += 1
        except OSError:
            pass

    def run(self) -> None:
        while not self.halt.is_set():
            self.sample()
            time.sleep(0.02)

    def finish(self) -> None:
        self.halt.set()
        self.join()
        self.sample()  # VmHWM is a high-water mark: the last read has it all


def start_cluster() -> dict[str, str]:
    subprocess.run(["bash", str(CLUSTER), "stop", DATADIR], check=False)
    out = subprocess.run(["bash", str(CLUSTER), "start", DATADIR, "shared_buffers = '128MB'"],
                         check=True, capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.replace("export ", "").split())


class Server:
    def __init__(self, env: dict[str, str]):
        self.host, self.port = env["PGHOST"], env["PGPORT"]

    def connect(self, db: str = "postgres"):
        conn = psycopg2.connect(host=self.host, port=self.port, user="postgres", dbname=db)
        conn.autocommit = True
        return conn

    def run(self, db: str, sql: str, params=None):
        conn = self.connect(db)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else None
        finally:
            conn.close()


def load(server: Server, db: str, chunks) -> None:
    server.run("postgres", f'DROP DATABASE IF EXISTS "{db}"')
    server.run("postgres", f'CREATE DATABASE "{db}"')
    conn = server.connect(db)
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE EXTENSION chat_backfill")
            cur.execute("CREATE TABLE chat (id text PRIMARY KEY, user_id text, title text, chat json)")
            for chunk in chunks:
                copy_chats(conn, chunk)
            cur.execute(TARGET_DDL)
            if ROWS == "app":  # the head's columns (revisions 856c5b02fb54, 4c5ce3d2f27f)
                cur.execute("ALTER TABLE chat_message ADD COLUMN meta json, ADD COLUMN context_summary text")
            cur.execute("VACUUM ANALYZE chat")
            cur.execute("CHECKPOINT")
    finally:
        conn.close()


ROWS = "migration"  # --rows
STREAM_CHATS_OVER = None  # --stream-chats-over
BACKFILL = ("SELECT count(*), coalesce(sum(messages_inserted), 0), coalesce(sum(messages_existing), 0),"
            " coalesce(sum(messages_rejected), 0) FROM backfill_chat_messages(batch_size => %s, now => %s,"
            " rows => %s)")
# verify() in the shape of a backfill's result: its findings, then three zeros.
VERIFY = "SELECT count(*), 0, 0, 0 FROM chat_backfill.verify(rows => %s)"


def measure(server: Server, db: str, batch_size: int, sql: str = BACKFILL) -> dict:
    conn = server.connect(db)
    try:
        with conn.cursor() as cur:
            if STREAM_CHATS_OVER is not None:
                cur.execute("SET chat_backfill.stream_chats_over = %s", (STREAM_CHATS_OVER,))
            cur.execute("SELECT pg_backend_pid()")
            (pid,) = cur.fetchone()
            idle = Sampler(pid)
            idle.sample()
            sampler = Sampler(pid)
            sampler.start()
            t0 = time.perf_counter()
            cur.execute(sql, (batch_size, NOW, ROWS) if sql == BACKFILL else (ROWS,))
            batches, inserted, existing, rejected = cur.fetchone()
            seconds = time.perf_counter() - t0
            sampler.finish()
    finally:
        conn.close()
    return {"batches": batches, "inserted": int(inserted), "existing": int(existing), "rejected": int(rejected),
            "seconds": seconds, "rss_anon_mb": sampler.rss_anon_kb / 1024, "hwm_mb": sampler.hwm_kb / 1024,
            "idle_rss_anon_mb": idle.rss_anon_kb / 1024, "samples": sampler.samples}


def run_case(server: Server, key: str, seed: int, verify: bool) -> list[dict]:
    label, batch_size, chunks = CASES[key]
    db = f"mem_{key}"
    log(f"{label}: generating and loading ...")
    t0 = time.perf_counter()
    load(server, db, chunks(seed))
    (chats, chat_bytes), = server.run(db, "SELECT count(*), coalesce(sum(octet_length(chat::text)), 0) FROM chat")
    log(f"  loaded {chats} chats, {chat_bytes / MB:.1f} MB in {time.perf_counter() - t0:.1f} s")
    rows = []
    first = measure(server, db, batch_size)
    log(f"  first run: {json.dumps(first)}")
    messages = server.run(db, "SELECT count(*) FROM chat_message")[0][0]
    rows.append(dict(first, case=label, path="first run (COPY)", chats=chats, messages=messages, chat_mb=chat_bytes / MB))
    deleted = server.run(db, "DELETE FROM chat_message WHERE id IN "
                             "(SELECT id FROM chat_message ORDER BY md5(id) LIMIT 10) RETURNING id")
    again = measure(server, db, batch_size)
    log(f"  re-run after deleting {len(deleted)} rows: {json.dumps(again)}")
    if again["inserted"] != len(deleted) or again["existing"] != messages - len(deleted):
        log(f"  WARNING: re-run inserted {again['inserted']} (expected {len(deleted)}), "
            f"existing {again['existing']} (expected {messages - len(deleted)})")
    rows.append(dict(again, case=label, path=f"re-run (INSERT; {len(deleted)} rows missing)", chats=chats,
                     messages=messages, chat_mb=chat_bytes / MB))
    if verify:
        # Rows the target lacks, for verify() to find: 10 missing, the chats they were in partial.
        server.run(db, "DELETE FROM chat_message WHERE id IN (SELECT id FROM chat_message ORDER BY md5(id) LIMIT 10)")
        checked = measure(server, db, batch_size, VERIFY)
        log(f"  verify() after deleting 10 rows: {json.dumps(checked)}")
        rows.append(dict(checked, case=label, path=f"verify() ({checked['batches']} findings)", chats=chats,
                         messages=messages, chat_mb=chat_bytes / MB))
    server.run("postgres", f'DROP DATABASE "{db}"')
    return rows


def build_info(server: Server) -> str:
    pg_config = subprocess.run(["bash", str(ROOT / "scripts/pg_majors.sh"), "pg_config", os.environ.get("PG_MAJOR", "15")],
                               capture_output=True, text=True, check=True).stdout.strip()
    pkglibdir = subprocess.run([pg_config, "--pkglibdir"], capture_output=True, text=True).stdout.strip()
    so = Path(pkglibdir) / "chat_backfill.so"
    digest = hashlib.sha256(so.read_bytes()).hexdigest()[:12] if so.exists() else "?"
    mtime = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(so.stat().st_mtime)) if so.exists() else "?"
    version = server.run("postgres", "SELECT default_version FROM pg_available_extensions WHERE name = 'chat_backfill'")
    pg = server.run("postgres", "SHOW server_version")[0][0]
    return (f"chat_backfill {version[0][0] if version else '?'} ({so}, sha256 {digest}…, built {mtime}); "
            f"PostgreSQL {pg}; shared_buffers 128MB; {os.cpu_count()} cores; {platform.machine()}")


def render(rows: list[dict], info: str, seed: int) -> str:
    lines = [
        "# Backend memory during a backfill",
        "",
        f"`.venv/bin/python bench/memory.py --rows {ROWS}` (seed {seed}), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Build: {info}.",
        "",
        "| case | path | chats | messages | MB of chat | peak RssAnon MB | peak VmHWM MB | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['path']} | {r['chats']} | {r['messages']} | {r['chat_mb']:.1f} | "
                     f"{r['rss_anon_mb']:.0f} | {r['hwm_mb']:.0f} | {r['seconds']:.2f} |")
    idle = max((r["idle_rss_anon_mb"] for r in rows), default=0)
    lines += [
        "",
        "RssAnon: the backend's private (anonymous) resident memory, peak of samples every 20 ms during the "
        "statement; what the backfill allocates. VmHWM: the kernel's high-water mark of the backend's whole "
        "resident set, including the shared buffers it touched (shared_buffers 128MB), for reference. "
        f"A fresh backend's RssAnon before the call: at most {idle:.1f} MB. MB of chat: 10^6 bytes of chat JSON "
        "text; memory in MiB. Target: Open WebUI's DDL (primary key, foreign key, 7 indexes). The re-run "
        "deletes 10 rows first, so COPY meets existing rows and the INSERT path writes the missing ones.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="a,b,c,c2,d")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=None)
    ap.add_argument("--verify", action="store_true", help="also measure chat_backfill.verify() after each case's re-run")
    ap.add_argument("--rows", choices=["migration", "app"], default="migration",
                    help="whose rows every call makes: the migration's (default) or the app's")
    ap.add_argument("--stream-chats-over", default=None,
                    help="chat_backfill.stream_chats_over for every call (0: stream every chat; 1GB: hold every one)")
    args = ap.parse_args()
    global ROWS, STREAM_CHATS_OVER
    ROWS = args.rows
    STREAM_CHATS_OVER = args.stream_chats_over
    keys = [k for k in args.cases.split(",") if k]
    unknown = [k for k in keys if k not in CASES]
    if unknown:
        ap.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    server = Server(start_cluster())
    try:
        info = build_info(server)
        if STREAM_CHATS_OVER is not None:
            info += f"; chat_backfill.stream_chats_over = {STREAM_CHATS_OVER}"
        log(info)
        rows = []
        for key in keys:
            rows += run_case(server, key, args.seed, args.verify)
        report = render(rows, info, args.seed)
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", DATADIR], check=False)
    print(report, end="")
    if args.out:
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
