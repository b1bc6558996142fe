#!/usr/bin/env bash
# The whole test suite: core unit/property tests, #[pg_test]s, pg_regress golden files,
# and the client-side suite (differential test against Open WebUI's real migration).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
unset RUST_BACKTRACE

# Runs a step quietly; on failure shows its last lines.
step() {
  local log; log=$(mktemp)
  if "$@" >"$log" 2>&1; then grep -E "^test result|passed|failed" "$log" | tail -3; rm -f "$log"
  else tail -60 "$log"; rm -f "$log"; return 1; fi
}

echo "== core: cargo test --lib (plain and property tests; the #[pg_test]s run next)"
step cargo test --lib -- --skip tests::pg_

echo "== #[pg_test]s"
rm -rf /tmp/chat_backfill_pgtest
# `cargo pgrx test` installs its debug build (with test functions): put the release build
# back whether or not the tests pass.
restore_release() { cargo pgrx install --release --pg-config /usr/lib/postgresql/15/bin/pg_config >/dev/null 2>&1; }
trap restore_release EXIT
step cargo pgrx test pg15 --runas postgres --pgdata /tmp/chat_backfill_pgtest
restore_release
trap - EXIT

echo "== pg_regress golden files"
bash tests/pg_regress/run.sh

echo "== client-side suite against a real cluster"
(cd tests/client && ../../.venv/bin/python -m pytest -q -p no:cacheprovider)
echo "== all tests passed"
