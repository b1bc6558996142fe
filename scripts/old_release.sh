#!/usr/bin/env bash
# Packages an earlier release from its git commit, for the upgrade test, and prints the
# directory holding its files (usr/lib/postgresql/15/lib, usr/share/postgresql/15/extension).
# Cached in ~/.cache/chat_backfill, so only the first run builds (a debug build: about 3 min).
#   scripts/old_release.sh 0.1.0 5c98822
set -euo pipefail
version=${1:?version}; commit=${2:?commit}
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/chat_backfill/release-$version
out=$cache/package
if [ ! -f "$out/usr/share/postgresql/15/extension/chat_backfill--$version.sql" ]; then
  rm -rf "$cache/src"
  mkdir -p "$cache"
  git -C "$root" worktree prune
  git clone -q "$root" "$cache/src"
  git -C "$cache/src" checkout -q "$commit"
  (cd "$cache/src" && CARGO_TARGET_DIR=$cache/target cargo pgrx package --debug \
     --pg-config /usr/lib/postgresql/15/bin/pg_config --out-dir "$out" >"$cache/build.log" 2>&1) ||
    { tail -30 "$cache/build.log" >&2; exit 1; }
fi
echo "$out"
