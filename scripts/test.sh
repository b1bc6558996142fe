#!/usr/bin/env bash
# The test command: core unit/property tests once, then for each supported PostgreSQL major
# the #[pg_test]s, the pg_regress golden files and the client-side suite against a real
# cluster, and last the Debian package install test on 15. It prints each step's time and
# the total, and fails unless every supported major ran tests.
#   bash scripts/test.sh                    every supported major, tiered (below)
#   FULL=1 bash scripts/test.sh             the whole client suite on every major
#   PG_MAJORS="15" bash scripts/test.sh     only those (and exits 3: not a full run)
# Tiers: the whole client suite runs on 15 and 18; on the other majors, the files whose
# code or PostgreSQL's behaviour differs by major (tests/client/conftest.py EVERY_MAJOR;
# the README lists which majors run each file). Everything here builds in the `ci` profile
# (optimized, no fat LTO); the packages ship release builds.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
export CHAT_BACKFILL_PROFILE=${CHAT_BACKFILL_PROFILE:-ci}
if [ -n "${FULL:-}" ]; then export CHAT_BACKFILL_TIER=full; else unset CHAT_BACKFILL_TIER; fi
bash scripts/setup.sh
unset RUST_BACKTRACE
# Each major's client suite starts its own cluster: never one the environment points to.
unset PGHOST PGPORT PGUSER PGDATABASE
read -r -a supported <<<"$(bash scripts/pg_majors.sh list)"
read -r -a majors <<<"${PG_MAJORS:-${supported[*]}}"
profile=$CHAT_BACKFILL_PROFILE

elapsed() { printf '%dm%02ds' $(((SECONDS - $1) / 60)) $(((SECONDS - $1) % 60)); }
# Runs a step quietly and prints its summary line and time; on failure shows its last lines.
# The summary is kept in $summary for the majors check.
step() {
  local log t0=$SECONDS; log=$(mktemp)
  if "$@" >"$log" 2>&1; then
    summary=$(grep -E "^test result|passed|failed" "$log" | tail -3)
    echo "$summary" | sed 's/^/   /'; echo "   ($(elapsed $t0))"; rm -f "$log"
  else tail -60 "$log"; rm -f "$log"; return 1; fi
}
# "N passed" from a summary, 0 if none.
passed() { grep -oE '[0-9]+ passed' <<<"$1" | awk '{n += $1} END {print n + 0}'; }

echo "== core: cargo test --lib (plain and property tests; the #[pg_test]s run next)"
step env CARGO_TARGET_DIR="$(pwd)/target/pg15" cargo test --lib --profile "$profile" -- --skip tests::pg_

for major in "${majors[@]}"; do
  bash scripts/pg_majors.sh pg_config "$major" >/dev/null  # refuses what is not supported
done
ran=()
for major in "${majors[@]}"; do
  t0=$SECONDS
  echo "== PostgreSQL $major: $("$(bash scripts/pg_majors.sh pg_config "$major")" --version)"
  echo "-- #[pg_test]s"
  # `cargo pgrx test` installs its build (with test functions): put the tested build back
  # whether or not the tests pass. Every step of a major builds in target/pgNN.
  trap 'bash scripts/install.sh '"$major"' >/dev/null' EXIT
  rm -rf "/tmp/chat_backfill_pgtest$major"
  step env CARGO_TARGET_DIR="$(pwd)/target/pg$major" cargo pgrx test "pg$major" --profile "$profile" --runas postgres \
    --pgdata "/tmp/chat_backfill_pgtest$major"
  pg_tests=$(passed "$summary")
  echo "-- build ($profile) and install"
  t1=$SECONDS; bash scripts/install.sh "$major"; echo "   ($(elapsed $t1))"
  trap - EXIT
  echo "-- pg_regress golden files"
  step env PG_MAJOR="$major" bash tests/pg_regress/run.sh
  echo "-- client-side suite against a real PostgreSQL $major cluster"
  t1=$SECONDS; log=$(mktemp)
  (cd tests/client && PG_MAJOR=$major ../../.venv/bin/python -m pytest -q -p no:cacheprovider -rs --durations=15) \
    | tee "$log" | grep -vE '^[.sxFE]+ *(\[ *[0-9]+%\])?$' || { rm -f "$log"; exit 1; }
  client_tests=$(passed "$(tail -1 "$log")"); rm -f "$log"
  echo "   ($(elapsed $t1))"
  ran+=("$major:$pg_tests:$client_tests:$(elapsed $t0)")
done

if [[ " ${majors[*]} " == *" 15 "* ]]; then
  echo "== Debian package for PostgreSQL 15: build, dpkg -i, backfill, dpkg -r"
  t1=$SECONDS
  bash scripts/package.sh 15
  bash tests/package/run.sh "dist/postgresql-15-chat-backfill_$(awk -F'"' '/^version = /{print $2; exit}' Cargo.toml)_amd64.deb"
  echo "   ($(elapsed $t1))"
fi

# Every supported major must have run tests: a major skipped or silently empty fails here.
echo "== majors: supported ${supported[*]}"
status=0
for major in "${supported[@]}"; do
  entry=$(printf '%s\n' "${ran[@]:-}" | grep "^$major:" || true)
  if [ -z "$entry" ]; then echo "   $major: NOT RUN"; status=3; continue; fi
  IFS=: read -r _ pg_tests client_tests took <<<"$entry"
  echo "   $major: $pg_tests #[pg_test]s, $client_tests client tests passed ($took)"
  if [ "$pg_tests" -eq 0 ] || [ "$client_tests" -eq 0 ]; then echo "   $major ran no test"; status=1; fi
done
if [ "$status" -eq 0 ]; then
  echo "== all tests passed on PostgreSQL ${majors[*]}; total $(elapsed $started)"
else
  echo "== NOT a passing full run (status $status); total $(elapsed $started)"
fi
exit "$status"
