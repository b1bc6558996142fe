"""Open WebUI's real migration 8452d01d26d7, loaded from the open-webui wheel on PyPI
at test time (never copied into this repository) and run through real Alembic."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from unittest import mock

OPEN_WEBUI_VERSION = "0.12.4"
MIGRATION = "open_webui/migrations/versions/8452d01d26d7_add_chat_message_table.py"
CACHE = Path(os.environ.get("CHAT_BACKFILL_CACHE", Path.home() / ".cache" / "chat_backfill"))

ENV_PY = '''
from alembic import context
from sqlalchemy import create_engine, pool

engine = create_engine(context.config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
'''

# The revision 8452d01d26d7 follows; an empty stand-in so Alembic can walk to it.
BASE_REVISION = '''
revision = "374d2f66af06"
down_revision = None
branch_labels = None
depends_on = None
def upgrade(): pass
def downgrade(): pass
'''


def wheel_path() -> Path:
    """Downloads the wheel once (no dependencies) into the cache."""
    wheel = CACHE / f"open_webui-{OPEN_WEBUI_VERSION}-py3-none-any.whl"
    if not wheel.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             f"open-webui=={OPEN_WEBUI_VERSION}", "-d", str(CACHE)],
            check=True,
        )
    return wheel


def migration_source() -> str:
    with zipfile.ZipFile(wheel_path()) as whl:
        return whl.read(MIGRATION).decode()


class _FailureLog(logging.Handler):
    """Collects the ids the migration reports as 'Failed to insert message <id>: ...'."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.failed: dict[str, str] = {}

    def emit(self, record):
        msg = record.getMessage()
        prefix = "Failed to insert message "
        if msg.startswith(prefix):
            rest = msg[len(prefix):]
            # ids may contain ': ', the error text follows the last id; ids come from us.
            self.failed[rest] = msg


def run_reference(url: str, now: int) -> list[str]:
    """Runs `alembic upgrade 8452d01d26d7` against `url` with the clock fixed at `now`.
    Returns the raw failure messages the migration logged (one per failed message)."""
    from alembic import command
    from alembic.config import Config

    with tempfile.TemporaryDirectory() as tmp:
        versions = Path(tmp, "versions")
        versions.mkdir()
        Path(tmp, "env.py").write_text(ENV_PY)
        (versions / "374d2f66af06_base.py").write_text(BASE_REVISION)
        (versions / Path(MIGRATION).name).write_text(migration_source())
        cfg = Config()
        cfg.set_main_option("script_location", tmp)
        cfg.set_main_option("sqlalchemy.url", url)
        handler = _FailureLog()
        root = logging.getLogger()
        root.addHandler(handler)
        try:
            with mock.patch.object(time, "time", lambda: float(now)):
                command.upgrade(cfg, "8452d01d26d7")
        finally:
            root.removeHandler(handler)
        return list(handler.failed.values())
