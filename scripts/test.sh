#!/usr/bin/env bash
# The whole test suite, on every supported PostgreSQL major: core unit/property tests once,
# then for each major the #[pg_test]s, the pg_regress golden files and the client-side
# suite (differential test against Open WebUI's real migration, security, fuzz, hardening,
# resumable runs, upgrade), and last the Debian package install test on 15.
#   bash scripts/test.sh                  15, 16 and 18
#   PG_MAJORS="15" bash scripts/test.sh   only those
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
bash scripts/setup.sh
unset RUST_BACKTRACE
# Each major's client suite starts its own cluster: never one the environment points to.
unset PGHOST PGPORT PGUSER PGDATABASE
read -r -a majors <<<"${PG_MAJORS:-$(bash scripts/pg_majors.sh list)}"

# Runs a step quietly; on failure shows its last lines.
step() {
  local log; log=$(mktemp)
  if "$@" >"$log" 2>&1; then grep -E "^test result|passed|failed" "$log" | tail -3; rm -f "$log"
  else tail -60 "$log"; rm -f "$log"; return 1; fi
}
elapsed() { printf '%dm%02ds' $(((SECONDS - $1) / 60)) $(((SECONDS - $1) % 60)); }

echo "== core: cargo test --lib (plain and property tests; the #[pg_test]s run next)"
step cargo test --lib -- --skip tests::pg_

for major in "${majors[@]}"; do
  bash scripts/pg_majors.sh pg_config "$major" >/dev/null  # refuses what is not supported
done
ran=()
for major in "${majors[@]}"; do
  t0=$SECONDS
  echo "== PostgreSQL $major: $("$(bash scripts/pg_majors.sh pg_config "$major")" --version)"
  echo "-- #[pg_test]s"
  # `cargo pgrx test` installs its debug build (with test functions): put the release
  # build back whether or not the tests pass. 15 shares the default target directory with
  # the core tests; the others build in target/pgNN.
  target=target; [ "$major" = 15 ] || target=target/pg$major
  trap 'bash scripts/install.sh '"$major"' >/dev/null' EXIT
  rm -rf "/tmp/chat_backfill_pgtest$major"
  step env CARGO_TARGET_DIR="$(pwd)/$target" cargo pgrx test "pg$major" --runas postgres \
    --pgdata "/tmp/chat_backfill_pgtest$major"
  echo "-- release build"
  bash scripts/install.sh "$major"
  trap - EXIT
  echo "-- pg_regress golden files"
  PG_MAJOR=$major bash tests/pg_regress/run.sh
  echo "-- client-side suite against a real PostgreSQL $major cluster"
  (cd tests/client && PG_MAJOR=$major ../../.venv/bin/python -m pytest -q -p no:cacheprovider -rs)
  ran+=("$major ($(elapsed $t0))")
done

if [[ " ${majors[*]} " == *" 15 "* ]]; then
  echo "== Debian package for PostgreSQL 15: build, dpkg -i, backfill, dpkg -r"
  bash scripts/package.sh 15
  bash tests/package/run.sh "dist/postgresql-15-chat-backfill_$(awk -F'"' '/^version = /{print $2; exit}' Cargo.toml)_amd64.deb"
fi
echo "== all tests passed on PostgreSQL ${ran[*]}; total $(elapsed $started)"
