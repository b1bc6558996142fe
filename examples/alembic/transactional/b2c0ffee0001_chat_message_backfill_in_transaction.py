"""Create chat_message as Open WebUI does and backfill it inside the migration's
transaction.

Simplest: all or nothing, one transaction. On a large installation that is one long
transaction (WAL that cannot be recycled, and a managed database may kill it); prefer the
committing style there.

Revision ID: b2c0ffee0001
"""

import sys
from pathlib import Path

from alembic import op

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chat_backfill_edition import choose, schema  # noqa: E402

revision = "b2c0ffee0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The extension where it can be created, the portable SQL edition otherwise.
    edition = choose(op.get_bind())
    op.execute(
        """
        CREATE TABLE chat_message (
            id text PRIMARY KEY, chat_id text NOT NULL REFERENCES chat(id) ON DELETE CASCADE,
            user_id text, role text NOT NULL, parent_id text, content json, output json,
            model_id text, files json, sources json, embeds json, done boolean DEFAULT true,
            status_history json, error json, usage json, created_at bigint, updated_at bigint)
        """
    )
    for name, columns in [
        ("ix_chat_message_chat_id", "chat_id"),
        ("ix_chat_message_user_id", "user_id"),
        ("ix_chat_message_model_id", "model_id"),
        ("ix_chat_message_created_at", "created_at"),
        ("chat_message_chat_parent_idx", "chat_id, parent_id"),
        ("chat_message_model_created_idx", "model_id, created_at"),
        ("chat_message_user_created_idx", "user_id, created_at"),
    ]:
        op.execute(f"CREATE INDEX {name} ON chat_message ({columns})")
    op.execute(f"SELECT * FROM {schema(edition)}backfill_chat_messages()")


def downgrade() -> None:
    op.execute("DROP TABLE chat_message")
