"""Loads generated Open WebUI-shaped chats into a database: `chat` (and, with
--with-target, an empty `chat_message` with Open WebUI's DDL).

    python tests/client/load_sample.py "host=... port=... dbname=..." --chats 200 [--hostile] [--with-target]
"""

from __future__ import annotations

import argparse
import io

import psycopg2

import chatgen

# Open WebUI's chat_message as migration 8452d01d26d7 creates it (what its own
# create_table and create_index calls produce; the differential test uses the migration
# itself instead).
TARGET_DDL = """
CREATE TABLE chat_message (
    id text PRIMARY KEY,
    chat_id text NOT NULL REFERENCES chat(id) ON DELETE CASCADE,
    user_id text, role text NOT NULL, parent_id text, content json, output json, model_id text,
    files json, sources json, embeds json, done boolean, status_history json, error json,
    usage json, created_at bigint, updated_at bigint
);
CREATE INDEX ix_chat_message_chat_id ON chat_message (chat_id);
CREATE INDEX ix_chat_message_user_id ON chat_message (user_id);
CREATE INDEX ix_chat_message_model_id ON chat_message (model_id);
CREATE INDEX ix_chat_message_created_at ON chat_message (created_at);
CREATE INDEX chat_message_chat_parent_idx ON chat_message (chat_id, parent_id);
CREATE INDEX chat_message_model_created_idx ON chat_message (model_id, created_at);
CREATE INDEX chat_message_user_created_idx ON chat_message (user_id, created_at);
"""


def copy_chats(conn, chats) -> None:
    """COPY is the fast path for big generated sets (text format: escape backslashes)."""
    buf = io.StringIO()
    for c in chats:
        def field(v):
            if v is None:
                return r"\N"
            return v.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
        buf.write(f"{field(c.id)}\t{field(c.user_id)}\tt\t{field(c.chat)}\n")
    buf.seek(0)
    with conn.cursor() as cur:
        cur.copy_expert("COPY chat (id, user_id, title, chat) FROM STDIN", buf)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dsn")
    ap.add_argument("--chats", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--hostile", action="store_true")
    ap.add_argument("--with-target", action="store_true")
    args = ap.parse_args()
    chats = chatgen.realistic_chats(args.seed, args.chats)
    if args.hostile:
        chats += chatgen.hostile_chats()
    conn = psycopg2.connect(args.dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE chat (id text PRIMARY KEY, user_id text, title text, chat json)")
        copy_chats(conn, chats)
        if args.with_target:
            cur.execute(TARGET_DDL)
    print(f"loaded {len(chats)} chats")


if __name__ == "__main__":
    main()
