#!/usr/bin/env bash
# Builds the extension for one PostgreSQL major and installs it into that server's
# directories (scripts/pg_majors.sh knows where each is).
#   bash scripts/install.sh [MAJOR]    (default 15)
# In the release profile (fat LTO, as packaged), or the one CHAT_BACKFILL_PROFILE names
# (the test command's `ci`: optimized, no LTO, built in a third of the time).
# Each major builds in its own target/pgNN, so switching majors never rebuilds the others.
set -euo pipefail
cd "$(dirname "$0")/.."
major=${1:-15}
profile=${CHAT_BACKFILL_PROFILE:-release}
pg_config=$(bash scripts/pg_majors.sh pg_config "$major")
log=$(mktemp)
if ! CARGO_TARGET_DIR="$(pwd)/target/pg$major" cargo pgrx install --profile "$profile" --pg-config "$pg_config" \
     --no-default-features --features "pg$major" >"$log" 2>&1; then
  tail -60 "$log" >&2; rm -f "$log"; exit 1
fi
grep -E "^(warning|error)" "$log" >&2 || true
rm -f "$log"
test -f "$("$pg_config" --sharedir)/extension/chat_backfill.control"
echo "installed chat_backfill ($profile) into PostgreSQL $major ($("$pg_config" --pkglibdir))"
