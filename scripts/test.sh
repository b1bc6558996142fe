#!/usr/bin/env bash
# The whole test suite: core unit/property tests, #[pg_test]s, pg_regress golden files,
# and the client-side suite (differential test against Open WebUI's real migration).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
unset RUST_BACKTRACE

echo "== core: cargo test --lib"
cargo test --lib --quiet 2>&1 | grep -E "test result|FAILED|panicked" ; test "${PIPESTATUS[0]}" -eq 0

echo "== #[pg_test]s"
rm -rf /tmp/chat_backfill_pgtest
cargo pgrx test pg15 --runas postgres --pgdata /tmp/chat_backfill_pgtest 2>&1 | grep -E "^test |test result|FAILED|panicked|error" ; test "${PIPESTATUS[0]}" -eq 0
# `cargo pgrx test` installs its debug build; put the release build back.
cargo pgrx install --release --pg-config /usr/lib/postgresql/15/bin/pg_config >/dev/null 2>&1

echo "== pg_regress golden files"
bash tests/pg_regress/run.sh

echo "== client-side suite against a real cluster"
(cd tests/client && ../../.venv/bin/python -m pytest -q -p no:cacheprovider)
echo "== all tests passed"
