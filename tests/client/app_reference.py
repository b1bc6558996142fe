"""Open WebUI 0.12.4's own application code, loaded from its PyPI wheel at test time (never
copied into this repository), as a reference for what the app itself does:

- `build_head_schema(url)`: a fresh database the way Open WebUI creates one. 0.12.4 has no
  peewee stage any more (`open_webui/internal/` holds only db.py); on start-up
  `open_webui.config` runs `alembic upgrade head` with the wheel's own
  `open_webui/migrations/env.py` and `versions/*.py`, and nothing else creates tables (no
  `metadata.create_all`). We run exactly that chain, through real Alembic and the wheel's
  env.py, up to `HEAD` (0bd252b206fb).
- `app_messages_maps(url, chat_ids, now)`: the app's `Chats.get_messages_map_by_chat_id`
  (`open_webui.models.chats`), the entry point that writes `chat_message` rows for a chat
  that has none, awaited for each id in turn with `time.time()` pinned to `now`.
- `app_upsert_messages(url, chat_id, user_id, messages, now)`: the app's own
  `ChatMessages.upsert_messages`.
- `insert_chats(conn, rows)`: (id, user_id, chat JSON text) rows into the head schema's
  `chat` table, the other columns as the app's `insert_new_chat` fills them.

Easy to miss in what the app writes (observed with this harness): a JSON column whose value
is missing gets JSON `null`, not SQL NULL (ORM bulk INSERT through SQLAlchemy's JSON type),
while a missing text/bigint value is left out of the INSERT (SQL NULL; `done` takes its
Python default true); JSON is written by orjson, compact, falling back to stdlib `json`
(", "/": " separators) for a value orjson refuses (an int beyond 64 bits, nesting past
orjson's limit); one failing message leaves the whole chat without rows (one transaction,
logged as 'Backfill failed for chat <id>: <error>').

How the app is loaded: the wheel's `open_webui/**/*.py` and `open_webui/CHANGELOG.md` are
extracted once into `CACHE/open_webui-0.12.4-app/` (atomically; the rest of the 106 MB
wheel, the frontend and static files, is not needed) and that directory goes on sys.path.
The package is imported as it is: its `__init__.py` (typer/uvicorn CLI), `env.py` (which
parses the 1.5 MB CHANGELOG.md with markdown + BeautifulSoup: about 5 s, once a process),
`internal/db.py`, the models and utils they import. The environment is a default install's
but for two variables:
  * DATABASE_URL = the first `url` seen (read once, at import). Later calls for another
    database build the async engine again with the app's own recipe from `internal/db.py`
    (`_create_async_engine(_make_async_url(url), pool_pre_ping=True)`, its branch for an
    unset DATABASE_POOL_SIZE) and bind the app's `AsyncSessionLocal` to it for the call.
    For the migrations, `open_webui.env.DATABASE_URL` (what the wheel's env.py reads) is set
    to `url` for the call.
  * WEBUI_SECRET_KEY, if unset: env.py refuses to import without one (the supported start
    scripts generate one); it plays no part in what is tested here.
Variables that would change the database code's behaviour (ENABLE_ORJSON, DATABASE_*
tuning, DATABASE_SCHEMA, ...) are removed for the import, and the JSON codec is checked to
be the default one (orjson, `ENABLE_ORJSON` default True).

Stubs: none. Every module the loaded code imports is the real one, installed from PyPI at
the version the wheel's METADATA pins, or for the few it reaches unpinned (python-engineio,
typer, python-dotenv) the version a fresh install resolves (tests/client/requirements.txt).
Deviations from a server start, none of which touch the database code:
  * Alembic gets a `Config()` with `script_location` = the wheel's migrations directory
    instead of the wheel's alembic.ini, whose only other content is a logging
    configuration (`fileConfig` would replace the test process's root log handlers).
  * env.py's `load_dotenv(find_dotenv(BASE_DIR / '.env'))` looks for CACHE/.env (BASE_DIR
    is two levels above env.py); there is none, as in a wheel install without one.
  * `open_webui.config` / `main` are not imported: they start the server (static files,
    Redis, OAuth, config seeding), not the database code under test.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

from reference import CACHE, OPEN_WEBUI_VERSION, wheel_path

HEAD = "0bd252b206fb"
APP_DIR = CACHE / f"open_webui-{OPEN_WEBUI_VERSION}-app"

# What a fresh chat row holds besides id, user_id and chat (Chats.insert_new_chat).
CHAT_TIME = 1_700_000_000

# Environment variables the database code reads; unset, as in a default install.
_DEFAULTED_ENV = (
    "ENABLE_ORJSON", "DATABASE_TYPE", "DATABASE_USER", "DATABASE_PASSWORD", "DATABASE_SCHEMA",
    "DATABASE_POOL_SIZE", "DATABASE_POOL_MAX_OVERFLOW", "DATABASE_POOL_TIMEOUT", "DATABASE_POOL_RECYCLE",
    "DATABASE_ENABLE_SESSION_SHARING", "DATABASE_ENABLE_IAM_TOKEN_AUTH", "ENABLE_DB_MIGRATIONS",
    "USE_SLIM_DOCKER", "GLOBAL_LOG_LEVEL", "LOG_FORMAT", "ENABLE_ADMIN_CHAT_ACCESS", "FROM_INIT_PY", "DATA_DIR",
)


def app_dir() -> Path:
    """The wheel's Python sources (and the CHANGELOG.md env.py reads), extracted once."""
    done = APP_DIR / ".complete"
    if done.exists():
        return APP_DIR
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".open_webui-app-", dir=CACHE))
    tmp.chmod(0o755)
    try:
        with zipfile.ZipFile(wheel_path()) as whl:
            names = [n for n in whl.namelist()
                     if n.startswith("open_webui/") and (n.endswith(".py") or n == "open_webui/CHANGELOG.md")]
            whl.extractall(tmp, names)
        (tmp / ".complete").write_text(OPEN_WEBUI_VERSION)
        try:
            os.rename(tmp, APP_DIR)
        except OSError:  # extracted meanwhile by another process (or a stale partial one)
            if not done.exists():
                shutil.rmtree(APP_DIR, ignore_errors=True)
                os.rename(tmp, APP_DIR)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return APP_DIR


_app = None


def _load_app(url: str):
    """Imports the app's database code once per process (DATABASE_URL = url at that time)."""
    global _app
    if _app is not None:
        return _app
    root = str(app_dir())
    if root not in sys.path:
        sys.path.insert(0, root)
    saved = dict(os.environ)
    try:
        for k in _DEFAULTED_ENV:
            os.environ.pop(k, None)
        os.environ["DATABASE_URL"] = url
        os.environ.setdefault("WEBUI_SECRET_KEY", "chat_backfill-tests")
        import open_webui.env as env
        import open_webui.internal.db as db
        import open_webui.models.chat_messages as chat_messages
        import open_webui.models.chats as chats
        from open_webui.utils import json_codec
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert Path(env.__file__).is_relative_to(root), env.__file__
    assert env.ENABLE_ORJSON and json_codec.JSONCodec is json_codec.ORJSONCodec
    assert db.DATABASE_POOL_SIZE is None and not db.DATABASE_ENABLE_SESSION_SHARING and db.DATABASE_SCHEMA is None
    _app = (env, db, chats, chat_messages)
    return _app


def build_head_schema(url: str) -> None:
    """Open WebUI 0.12.4's migration chain, through the wheel's env.py, on an empty database."""
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    env, _db, _chats, _msgs = _load_app(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(app_dir() / "open_webui" / "migrations"))
    assert ScriptDirectory.from_config(cfg).get_heads() == [HEAD]
    with mock.patch.object(env, "DATABASE_URL", url):
        command.upgrade(cfg, HEAD)


@contextmanager
def _pinned_time(now: int):
    with mock.patch.object(time, "time", lambda: float(now)):
        yield


class _Warnings(logging.Handler):
    def __init__(self, sink: list):
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record):
        if record.name.startswith("open_webui"):
            self.sink.append(record.getMessage())


def _run(url: str, now: int, make_coro, warnings: list | None):
    """Runs make_coro() on a private event loop with the app's sessions bound to `url`'s
    engine (built the app's way) and time.time() pinned; disposes the engine after."""
    _env, db, _chats, _msgs = _load_app(url)

    async def main():
        engine = db._create_async_engine(db._make_async_url(url), pool_pre_ping=True)
        saved_engine, saved_bind = db.async_engine, db.AsyncSessionLocal.kw.get("bind")
        db.async_engine = engine
        db.AsyncSessionLocal.configure(bind=engine)
        try:
            return await make_coro()
        finally:
            db.async_engine = saved_engine
            db.AsyncSessionLocal.configure(bind=saved_bind)
            await engine.dispose()

    handler = _Warnings(warnings if warnings is not None else [])
    logger = logging.getLogger("open_webui")
    logger.addHandler(handler)
    try:
        with _pinned_time(now):
            return asyncio.run(main())
    finally:
        logger.removeHandler(handler)


def app_messages_maps(url: str, chat_ids: list[str], now: int, *,
                      warnings: list | None = None) -> dict[str, dict | None | Exception]:
    """`await Chats.get_messages_map_by_chat_id(id)` for each id in turn (it backfills a chat
    without rows). Returns what each call returned, by id; a call that raised (the app does
    for some chat shapes, e.g. a `history` that is a string: a 500 for that request) has the
    exception as its value, and the next id is called all the same. The app's warning log
    lines (e.g. 'Backfill failed for chat <id>: <error>') are appended to `warnings` if given."""
    _env, _db, chats, _msgs = _load_app(url)

    async def calls():
        out = {}
        for cid in chat_ids:
            try:
                out[cid] = await chats.Chats.get_messages_map_by_chat_id(cid)
            except Exception as e:  # noqa: BLE001 - reported to the caller as the result
                out[cid] = e
        return out

    return _run(url, now, calls, warnings)


def app_upsert_messages(url: str, chat_id: str, user_id: str, messages: dict, now: int, *,
                        warnings: list | None = None) -> None:
    """The app's `ChatMessages.upsert_messages(chat_id, user_id, messages)` (raises what it raises)."""
    _env, _db, _chats, msgs = _load_app(url)
    return _run(url, now, lambda: msgs.ChatMessages.upsert_messages(chat_id, user_id, messages), warnings)


def insert_chats(conn, rows, created_at: int = CHAT_TIME) -> None:
    """(id, user_id, chat JSON text or None) rows into the head schema's `chat` table, the
    other columns as `Chats.insert_new_chat` sets them (so the app's ChatModel validates:
    title, created_at, updated_at, archived, meta must not be NULL)."""
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO chat (id, user_id, title, chat, created_at, updated_at, last_read_at, share_id, archived,"
            " pinned, meta, variables, folder_id) VALUES (%s, %s, 't', %s::json, %s, %s, %s, NULL, false, false,"
            " '{}', '{}', NULL)",
            [(id_, user_id, chat, created_at, created_at, created_at) for id_, user_id, chat in rows],
        )
    if not conn.autocommit:
        conn.commit()
