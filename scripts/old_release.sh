#!/usr/bin/env bash
# Packages an earlier release from its git commit for one PostgreSQL major, for the upgrade
# test, and prints the directory holding its files: the files sit under it at the paths that
# major's pg_config gives (e.g. usr/lib/postgresql/15/lib, usr/share/postgresql/15/extension).
# Cached in ~/.cache/chat_backfill, so only the first run per release and major builds (a
# debug build: about 3 min).
#   scripts/old_release.sh 0.1.0 5c98822 [MAJOR]     (MAJOR defaults to 15)
set -euo pipefail
version=${1:?version}; commit=${2:?commit}; major=${3:-15}
root=$(cd "$(dirname "$0")/.." && pwd)
pg_config=$(bash "$root/scripts/pg_majors.sh" pg_config "$major")
cache=${XDG_CACHE_HOME:-$HOME/.cache}/chat_backfill/release-$version
# 15's packages predate the per-major layout; keep their place so caches stay valid.
out=$cache/package; [ "$major" = 15 ] || out=$cache/package-pg$major
if [ ! -f "$out$("$pg_config" --sharedir)/extension/chat_backfill--$version.sql" ]; then
  mkdir -p "$cache"
  if [ ! -d "$cache/src/.git" ] || ! git -C "$cache/src" cat-file -e "$commit^{commit}" 2>/dev/null; then
    rm -rf "$cache/src"
    git clone -q "$root" "$cache/src"
  fi
  git -C "$cache/src" checkout -q "$commit"
  # cargo-pgrx builds only the pgrx of its own version: the release's, installed beside the
  # caches once if it is not the one installed (a few minutes).
  want=$(awk '/^name = "pgrx"$/{getline; gsub(/"/,"",$3); print $3; exit}' "$cache/src/Cargo.lock")
  tool=$(command -v cargo-pgrx)
  if [ "$("$tool" pgrx --version | awk '{print $2}')" != "$want" ]; then
    tool=$(dirname "$cache")/cargo-pgrx-$want/bin/cargo-pgrx
    [ -x "$tool" ] || cargo install cargo-pgrx --version "$want" --locked --quiet --root "$(dirname "$(dirname "$tool")")"
  fi
  (cd "$cache/src" && CARGO_TARGET_DIR=$cache/target-pg$major "$tool" pgrx package --debug \
     --pg-config "$pg_config" --no-default-features --features "pg$major" --out-dir "$out" \
     >"$cache/build-pg$major.log" 2>&1) ||
    { tail -30 "$cache/build-pg$major.log" >&2; exit 1; }
fi
echo "$out"
