#!/usr/bin/env bash
# Runs the golden-file tests with PostgreSQL's own pg_regress in a temporary instance of
# major PG_MAJOR (default 15; scripts/pg_majors.sh knows where each server is).
# (`cargo pgrx regress` refuses to run as root in pgrx 0.18.) The tests run as postgres
# on a copy of this folder, since a checkout under /root is not readable by postgres.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
pg_config=$(bash "$here/../../scripts/pg_majors.sh" pg_config "${PG_MAJOR:-15}")
pg_regress="$(dirname "$("$pg_config" --pgxs)")/../test/regress/pg_regress"
work=$(mktemp -d /tmp/chat_backfill_regress.XXXXXX)
cp -r "$here/sql" "$here/expected" "$work/"
chown -R postgres: "$work"
tests=$(cd "$here/sql" && ls *.sql | sed 's/\.sql$//' | sort)
status=0
runuser -u postgres -- env -u RUST_BACKTRACE "$pg_regress" \
  --temp-instance="$work/instance" --bindir="$("$pg_config" --bindir)" \
  --inputdir="$work" --outputdir="$work" --encoding=UTF8 --no-locale $tests || status=$?
if [ $status -ne 0 ]; then
  cat "$work/regression.diffs" 2>/dev/null || true
  [ "${REGRESS_ACCEPT:-}" = 1 ] && cp "$work"/results/*.out "$here/expected/" && echo "accepted new expected output"
fi
rm -rf "$work"
exit $status
