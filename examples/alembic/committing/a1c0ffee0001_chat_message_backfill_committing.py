"""Create chat_message and backfill it in committed batches (bulk-load order).

The table is created with its primary key only; the backfill runs as a CALL that COMMITs
after every batch, inside Alembic's autocommit block (a CALL inside the migration's
transaction could not commit); then the secondary indexes are built and the foreign key
is added NOT VALID and validated, the order PostgreSQL's documentation recommends for
bulk loads. If the migration is interrupted, running it again resumes the backfill
where it stopped.

Revision ID: a1c0ffee0001
"""

import sys
from pathlib import Path

from alembic import op

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chat_backfill_edition import choose, last_state, schema  # noqa: E402

revision = "a1c0ffee0001"
down_revision = None
branch_labels = None
depends_on = None

INDEXES = [
    ("ix_chat_message_chat_id", "chat_id"),
    ("ix_chat_message_user_id", "user_id"),
    ("ix_chat_message_model_id", "model_id"),
    ("ix_chat_message_created_at", "created_at"),
    ("chat_message_chat_parent_idx", "chat_id, parent_id"),
    ("chat_message_model_created_idx", "model_id, created_at"),
    ("chat_message_user_created_idx", "user_id, created_at"),
]


def upgrade() -> None:
    # The extension where it can be created, the portable SQL edition otherwise.
    edition = choose(op.get_bind())
    op.execute(
        """
        CREATE TABLE IF NOT EXISTS chat_message (
            id text PRIMARY KEY, chat_id text NOT NULL, user_id text, role text NOT NULL,
            parent_id text, content json, output json, model_id text, files json, sources json,
            embeds json, done boolean DEFAULT true, status_history json, error json, usage json,
            created_at bigint, updated_at bigint)
        """
    )
    with op.get_context().autocommit_block():
        # 'wait': if a pg_cron job or another session is running this backfill, wait for
        # it instead of returning at once with nothing done.
        op.execute(f"CALL {schema(edition)}backfill_chat_messages_resumable(if_busy => 'wait')")
    # Never build indexes and the foreign key over a half-filled table and record the
    # migration as done: the CALL must have finished the backfill.
    # By oid, not by name: only a role that can read chat and write chat_message can add
    # runs of these two tables.
    state = last_state(op.get_bind(), edition)
    if state not in (None, "finished"):
        raise RuntimeError(
            f"chat_message backfill is {state}, not finished: see the edition's status view and "
            "run the migration again to resume it"
        )
    for name, columns in INDEXES:
        op.execute(f"CREATE INDEX IF NOT EXISTS {name} ON chat_message ({columns})")
    # Messages of chats deleted while the backfill ran would fail validation.
    op.execute("DELETE FROM chat_message m WHERE NOT EXISTS (SELECT 1 FROM chat c WHERE c.id = m.chat_id)")
    op.execute(
        "ALTER TABLE chat_message ADD CONSTRAINT chat_message_chat_id_fkey FOREIGN KEY (chat_id) "
        "REFERENCES chat(id) ON DELETE CASCADE NOT VALID"
    )
    op.execute("ALTER TABLE chat_message VALIDATE CONSTRAINT chat_message_chat_id_fkey")


def downgrade() -> None:
    op.execute("DROP TABLE chat_message")
