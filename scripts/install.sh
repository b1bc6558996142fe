#!/usr/bin/env bash
# Builds the extension for one PostgreSQL major and installs it into that server's
# directories (scripts/pg_majors.sh knows where each is).
#   bash scripts/install.sh [MAJOR]          build, then install (default 15)
#   bash scripts/install.sh --build MAJOR    build only, into target/stage/pgMAJOR; touches no
#                                            server, so it may run while that major's servers do
#                                            (the test command builds the next majors this way
#                                            while one major's tests run)
#   bash scripts/install.sh --copy MAJOR     install what --build left there
# In the release profile (fat LTO, as packaged), or the one CHAT_BACKFILL_PROFILE names
# (the test command's `ci`: optimized, no LTO, built in a third of the time).
# Every major builds in one target directory (CARGO_TARGET_DIR, default target/), so what
# does not depend on the major (bindgen, serde, the macros) is built once.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=all
case "${1:-}" in --build) mode=build; shift ;; --copy) mode=copy; shift ;; esac
major=${1:-15}
profile=${CHAT_BACKFILL_PROFILE:-release}
pg_config=$(bash scripts/pg_majors.sh pg_config "$major")
stage=$(pwd)/target/stage/pg$major

if [ "$mode" != copy ]; then
  log=$(mktemp)
  rm -rf "$stage.tmp"
  if ! CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$(pwd)/target}" cargo pgrx package --profile "$profile" \
       --pg-config "$pg_config" --no-default-features --features "pg$major" --out-dir "$stage.tmp" >"$log" 2>&1; then
    tail -60 "$log" >&2; rm -f "$log"; exit 1
  fi
  grep -E "^(warning|error)" "$log" >&2 || true
  rm -f "$log"
  test -f "$stage.tmp$("$pg_config" --sharedir)/extension/chat_backfill.control"
  rm -rf "$stage" && mv "$stage.tmp" "$stage"
  echo "$profile" >"$stage.profile"
fi
[ "$mode" != build ] || exit 0

# What pgrx packaged: the library, the control file, the install and upgrade scripts, under
# the server's own absolute paths.
[ -d "$stage" ] || { echo "nothing built for PostgreSQL $major: run scripts/install.sh --build $major" >&2; exit 1; }
libdir=$("$pg_config" --pkglibdir) extdir=$("$pg_config" --sharedir)/extension
# A new file renamed over the old one: a running backend keeps the library it has mapped.
install -m 0755 "$stage$libdir/chat_backfill.so" "$libdir/.chat_backfill.so.new"
mv -f "$libdir/.chat_backfill.so.new" "$libdir/chat_backfill.so"
install -m 0644 "$stage$extdir/"chat_backfill* "$extdir/"
echo "installed chat_backfill ($(cat "$stage.profile")) into PostgreSQL $major ($libdir)"
