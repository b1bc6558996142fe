#!/usr/bin/env bash
# The main job on sample data: a throwaway cluster, a generated Open WebUI `chat` table
# (realistic chats plus every hostile case), the backfill, and what it did.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
eval "$(bash scripts/cluster.sh start /tmp/chat_backfill_demo)"
echo "== cluster on port $PGPORT (stop it with: scripts/cluster.sh stop /tmp/chat_backfill_demo)"
psql -qX -c "DROP DATABASE IF EXISTS demo" -c "CREATE DATABASE demo" 2>/dev/null
.venv/bin/python tests/client/load_sample.py "host=$PGHOST port=$PGPORT user=postgres dbname=demo" --chats 400 --hostile --with-target
psql -X -d demo -v ON_ERROR_STOP=1 <<'SQL'
CREATE EXTENSION chat_backfill;
\echo == progress rows (one per batch)
SELECT * FROM backfill_chat_messages(batch_size => 1000);
\echo == what went where
SELECT (SELECT count(*) FROM chat_message) AS messages_in_chat_message,
       (SELECT count(*) FROM chat_backfill.rejected_messages WHERE message_key IS NOT NULL) AS messages_rejected,
       (SELECT count(*) FROM chat_backfill.rejected_messages WHERE message_key IS NULL) AS chats_unusable;
\echo == rejected rows
SELECT chat_id, message_key, sqlstate, error FROM chat_backfill.rejected_messages ORDER BY id;
\echo == a second run adds nothing and says so
SELECT sum(messages_inserted) AS inserted, sum(messages_existing) AS existing FROM backfill_chat_messages();
SQL
