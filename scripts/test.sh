#!/usr/bin/env bash
# The test command. On 15 (Debian's server, which CI and the .deb use): the pg_regress golden
# files and the whole client-side suite against a real cluster; on every other supported
# major the pg_regress files and the client files whose code or PostgreSQL's behaviour
# differs by major; the unit and property tests and the #[pg_test]s on the newest major of
# the run; last the Debian package test on 15. It prints each step's time and the total,
# and fails unless every supported major ran tests.
#   bash scripts/test.sh                    every supported major, tiered (below)
#   FULL=1 bash scripts/test.sh             everything on every major
#   PG_MAJORS="15" bash scripts/test.sh     only those (and exits 3: not a full run)
# Tiers: tests/client/conftest.py (EVERY_MAJOR, PRIMARY_MAJORS, the one_major marker) picks
# the client tests; docs/testing.md lists which majors run each file. Builds for the client
# suites are in the `ci` profile (optimized, no fat LTO), the unit tests and #[pg_test]s in
# `citest` (unoptimized); the packages ship release builds.
# While 15's tests run, the other majors are built (and the #[pg_test]s run) in the
# background, at the lowest CPU priority and in their own target directory (cargo builds one
# thing at a time per directory): their time hides in the time tests spend waiting on
# servers. The foreground takes a major only once its background work is done, so nothing
# installs into a server while its tests run.
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
# The unit tests and #[pg_test]s run the same Rust code on every major (the client files
# run what differs): on the newest major of the run, or on every one with FULL.
pg_test_majors=" ${majors[-1]} "; [ -z "${FULL:-}" ] || pg_test_majors=" ${majors[*]} "
export PG_TEST_MAJORS=$pg_test_majors
pg_tested() { [[ "$pg_test_majors" == *" $1 "* ]]; }

elapsed() { printf '%dm%02ds' $(((SECONDS - $1) / 60)) $(((SECONDS - $1) % 60)); }
# Runs a step quietly and prints its summary line and time; on failure shows its last lines.
# The summary is kept in $summary for the majors check.
step() {
  local log t0=$SECONDS; log=$(mktemp)
  if "$@" >"$log" 2>&1; then
    summary=$(grep -E "^test result|passed|failed" "$log" | tail -3)
    [ -n "$summary" ] || summary=$(tail -1 "$log")
    echo "$summary" | sed 's/^/   /'; echo "   ($(elapsed $t0))"; rm -f "$log"
  else tail -60 "$log"; rm -f "$log"; return 1; fi
}
# "N passed" from a summary, 0 if none.
passed() { grep -oE '[0-9]+ passed' <<<"$1" | awk '{n += $1} END {print n + 0}'; }

for major in "${majors[@]}"; do
  bash scripts/pg_majors.sh pg_config "$major" >/dev/null  # refuses what is not supported
done

# What needs no PostgreSQL first: the import graph, and the rules crate's unit and property
# tests (it does not depend on pgrx: no server headers, no server).
echo "== the house and the rules (no PostgreSQL)"
echo "-- import graph: no circle, each layer imports only from the ones below it"
step python3 scripts/check_imports.py
echo "-- the rules: unit and property tests"
step cargo test -p chat_backfill_rules --profile citest
rules_tests=$(passed "$summary")
[ "$rules_tests" -gt 0 ] || { echo "   the rules ran no test"; exit 1; }
echo "-- the TOAST decompressors (pglz, lz4): unit, property and PostgreSQL-fixture tests"
step cargo test -p chat_backfill_toast_stream --profile citest
toast_tests=$(passed "$summary")
[ "$toast_tests" -gt 0 ] || { echo "   the decompressors ran no test"; exit 1; }

# 15 first (the other majors build meanwhile), then the others in order.
ordered=()
for major in "${majors[@]}"; do [ "$major" != 15 ] || ordered+=(15); done
for major in "${majors[@]}"; do [ "$major" = 15 ] || ordered+=("$major"); done
majors=("${ordered[@]}")

# The background builds, in their own process group: each major's outcome lands in
# target/stage/pgNN.rc (and its output in .log).
mkdir -p target/stage
later=("${majors[@]:1}"); [ "${majors[0]}" = 15 ] || later=("${majors[@]}")
for major in "${later[@]}"; do rm -f "target/stage/pg$major.rc"; done
builder="" restore=""
cleanup() {
  [ -z "$builder" ] || kill -- "-$builder" 2>/dev/null || true
  [ -z "$restore" ] || bash scripts/install.sh --copy "$restore" >/dev/null || true
}
trap cleanup EXIT
# Unit tests and #[pg_test]s for one major; `cargo pgrx test` installs its own build (with
# the test functions) into that major's server: the caller puts the tested build back.
pg_test() {
  rm -rf "/tmp/chat_backfill_pgtest$1"
  cargo pgrx test "pg$1" --profile citest --runas postgres --pgdata "/tmp/chat_backfill_pgtest$1"
}
export -f pg_test
if [ ${#later[@]} -gt 0 ]; then
  # shellcheck disable=SC2016
  setsid bash -c 'for major in "$@"; do
      rc=0
      export CARGO_TARGET_DIR="$(pwd)/target/majors"
      nice -n 19 bash scripts/install.sh --build "$major" >"target/stage/pg$major.log" 2>&1 || rc=$?
      if [ "$rc" = 0 ] && [[ "$PG_TEST_MAJORS" == *" $major "* ]]; then
        nice -n 19 bash -c "pg_test $major" >"target/stage/pg$major.pgtest.log" 2>&1 || rc=$?
        bash scripts/install.sh --copy "$major" >/dev/null || rc=1  # the tested build back
      fi
      echo "$rc" >"target/stage/pg$major.rc"
    done' builder "${later[@]}" &
  builder=$!
fi

ran=()
for major in "${majors[@]}"; do
  t0=$SECONDS
  echo "== PostgreSQL $major: $("$(bash scripts/pg_majors.sh pg_config "$major")" --version)"
  pg_tests=0
  if [[ " ${later[*]:-} " == *" $major "* ]]; then
    echo "-- its build (started in the background)"
    while [ ! -f "target/stage/pg$major.rc" ]; do sleep 2; done
    if [ "$(cat "target/stage/pg$major.rc")" != 0 ]; then
      tail -60 "target/stage/pg$major.pgtest.log" 2>/dev/null || tail -60 "target/stage/pg$major.log"; exit 1
    fi
    bash scripts/install.sh --copy "$major"
    echo "   (waited $(elapsed $t0))"
    if pg_tested "$major"; then
      echo "-- unit and property tests, and the #[pg_test]s (ran in the background)"
      summary=$(grep -E "^test result" "target/stage/pg$major.pgtest.log")
      echo "$summary" | sed 's/^/   /'
      pg_tests=$(passed "$summary")
    fi
  elif pg_tested "$major"; then
    echo "-- unit and property tests, and the #[pg_test]s"
    restore=$major
    step pg_test "$major"
    pg_tests=$(passed "$summary")
    bash scripts/install.sh --copy "$major"; restore=""
  fi
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
echo "== majors: supported ${supported[*]} (and $rules_tests unit and property tests of the rules and $toast_tests of the decompressors, which need no server)"
status=0
for major in "${supported[@]}"; do
  entry=$(printf '%s\n' "${ran[@]:-}" | grep "^$major:" || true)
  if [ -z "$entry" ]; then echo "   $major: NOT RUN"; status=3; continue; fi
  IFS=: read -r _ pg_tests client_tests took <<<"$entry"
  if pg_tested "$major"; then
    echo "   $major: $pg_tests unit tests and #[pg_test]s, $client_tests client tests passed ($took)"
  else
    echo "   $major: $client_tests client tests passed ($took)"
  fi
  if [ "$client_tests" -eq 0 ] || { pg_tested "$major" && [ "$pg_tests" -eq 0 ]; }; then
    echo "   $major ran no test"; status=1
  fi
done
if [ "$status" -eq 0 ]; then
  echo "== all tests passed on PostgreSQL ${majors[*]}; total $(elapsed $started)"
else
  echo "== NOT a passing full run (status $status); total $(elapsed $started)"
fi
exit "$status"
