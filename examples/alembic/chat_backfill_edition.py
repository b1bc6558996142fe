"""Which edition of chat_backfill the example migrations use, and the SQL each one runs.

The extension when the server has it (`pg_available_extensions`) and this role may create
it (CREATE EXTENSION needs CREATE on the database; a managed service's owner role often has
it only on its own schema); otherwise the portable SQL edition (portable/, plain SQL and
PL/pgSQL), installed from portable/chat_backfill_portable.sql into the schema
chat_backfill_portable, which must exist or be creatable by this role.
CHAT_BACKFILL_EDITION=extension|portable forces the choice; CHAT_BACKFILL_PORTABLE_SQL
names another copy of the SQL file."""

from __future__ import annotations

import os
from pathlib import Path

PORTABLE_SQL = Path(__file__).resolve().parents[2] / "portable/chat_backfill_portable.sql"


def choose(bind) -> str:
    """'extension' or 'portable', with the extension created if that is the choice."""
    forced = os.environ.get("CHAT_BACKFILL_EDITION")
    if forced not in (None, "", "extension", "portable"):
        raise RuntimeError(f"CHAT_BACKFILL_EDITION must be 'extension' or 'portable', not {forced!r}")
    if forced != "portable":
        available = bind.exec_driver_sql(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'chat_backfill'").scalar()
        if available:
            savepoint = bind.begin_nested()
            try:
                bind.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS chat_backfill")
                savepoint.commit()
                return "extension"
            except Exception:
                savepoint.rollback()
                if forced == "extension":
                    raise
        elif forced == "extension":
            raise RuntimeError("CHAT_BACKFILL_EDITION=extension, but the server has no chat_backfill extension")
    install_portable(bind)
    return "portable"


def install_portable(bind) -> None:
    """Runs the portable SQL file (idempotent: it replaces its functions, keeps its state)."""
    if bind.exec_driver_sql("SELECT to_regnamespace('chat_backfill_portable') IS NULL").scalar():
        bind.exec_driver_sql("CREATE SCHEMA chat_backfill_portable")
    sql = Path(os.environ.get("CHAT_BACKFILL_PORTABLE_SQL") or PORTABLE_SQL).read_text()
    saved = bind.exec_driver_sql(
        "SELECT current_setting('search_path'), current_setting('client_min_messages')").one()
    # The file's own statements, as psql sends them (no parameters: its % and : are SQL).
    with bind.connection.dbapi_connection.cursor() as cur:
        cur.execute(sql)
    bind.exec_driver_sql(
        f"SELECT set_config('search_path', '{saved[0]}', false), set_config('client_min_messages', '{saved[1]}', false)")


def schema(edition: str) -> str:
    """Where the edition's functions and state live ('' : the extension's, on the search_path)."""
    return "chat_backfill_portable." if edition == "portable" else ""


def last_state(bind, edition: str):
    """The state of the latest backfill of chat into chat_message (None: no run)."""
    state_schema = "chat_backfill_portable" if edition == "portable" else "chat_backfill"
    return bind.exec_driver_sql(
        f"SELECT s.state FROM {state_schema}.status s JOIN {state_schema}.runs r USING (run_id) "
        "WHERE r.source_oid = 'chat'::regclass AND r.target_oid = 'chat_message'::regclass "
        "ORDER BY run_id DESC LIMIT 1"
    ).scalar()
