#!/usr/bin/env bash
# The PostgreSQL 15 Debian package, installed as an operator would: the source build's files
# are taken out of PostgreSQL 15's directories, the package is installed with dpkg, the
# extension is created in a fresh cluster and backfills the sample data (upgrade path from
# 0.1.0 included), the package is removed with dpkg, and the source build is put back.
#   bash tests/package/run.sh dist/postgresql-15-chat-backfill_<version>_amd64.deb
set -euo pipefail
cd "$(dirname "$0")/../.."
deb=$(realpath "${1:?the .deb to test}")
package=postgresql-15-chat-backfill
version=$(dpkg-deb -f "$deb" Version)
lib=/usr/lib/postgresql/15/lib
ext=/usr/share/postgresql/15/extension
cluster=/tmp/chat_backfill_pkgtest
saved=$(mktemp -d /tmp/chat_backfill_source_build.XXXXXX)

fail() { echo "package test: $*" >&2; exit 1; }
source_build_files() { ls "$lib"/chat_backfill.so "$ext"/chat_backfill.control "$ext"/chat_backfill--*.sql 2>/dev/null || true; }

# A package left by an interrupted earlier run goes first.
dpkg -s "$package" >/dev/null 2>&1 && dpkg -r "$package" >/dev/null

# Take the source build out, and put it back however this ends. Every step of the restore
# runs even if one fails; if the saved files cannot be put back, the release build is
# installed again (scripts/install.sh) and the saved copy is kept.
mkdir -p "$saved/lib" "$saved/ext"
restore() {
  set +e
  PG_MAJOR=15 bash scripts/cluster.sh stop "$cluster"
  if dpkg -s "$package" >/dev/null 2>&1; then dpkg -r "$package" >/dev/null || echo "package test: dpkg -r failed" >&2; fi
  local ok=1
  for f in "$saved"/lib/* "$saved"/ext/*; do [ -e "$f" ] || continue; case "$f" in
    "$saved"/lib/*) cp -p "$f" "$lib/" || ok=0 ;; *) cp -p "$f" "$ext/" || ok=0 ;; esac
  done
  if [ $ok = 1 ] && [ -f "$lib/chat_backfill.so" ]; then rm -rf "$saved"
  else echo "package test: source build not restored (copy kept in $saved); reinstalling it" >&2
       bash scripts/install.sh 15 >&2; fi
}
trap restore EXIT
for f in $(source_build_files); do
  case "$f" in "$lib"/*) mv "$f" "$saved/lib/" ;; *) mv "$f" "$saved/ext/" ;; esac
done
[ -z "$(source_build_files)" ] || fail "source build files left in place"

echo "-- dpkg -i $(basename "$deb")"
dpkg -i "$deb" >/dev/null
[ "$(dpkg-query -W -f '${Status}' "$package")" = "install ok installed" ] || fail "not installed"
# Exactly the library, the control file and every SQL script of sql/ and the release.
want=$(printf '%s\n' "$lib/chat_backfill.so" "$ext/chat_backfill.control" "$ext/chat_backfill--$version.sql" \
         $(for s in sql/chat_backfill--*--*.sql; do echo "$ext/$(basename "$s")"; done) | sort)
got=$(dpkg -L "$package" | grep -v "^/usr/share/doc/" | while read -r f; do [ -f "$f" ] && echo "$f"; done | sort)
dpkg --verify "$package" || fail "dpkg --verify: installed files differ from the package"
[ "$got" = "$want" ] || fail "package files differ: $(diff <(echo "$want") <(echo "$got"))"

echo "-- CREATE EXTENSION and a backfill of the sample data in a fresh cluster"
eval "$(PG_MAJOR=15 bash scripts/cluster.sh start "$cluster")"
psql -qX -c "CREATE DATABASE pkg"
.venv/bin/python tests/client/load_sample.py "host=$PGHOST port=$PGPORT user=postgres dbname=pkg" \
  --chats 300 --hostile --with-target >/dev/null
# Every message the functions expand is either in chat_message or recorded as rejected,
# the installed version is the package's, and the upgrade script is reachable.
psql -X -d pkg -v ON_ERROR_STOP=1 -At <<SQL
CREATE EXTENSION chat_backfill;
CREATE TEMP TABLE result AS SELECT * FROM backfill_chat_messages(batch_size => 500);
DO \$\$
DECLARE
  inserted bigint := (SELECT sum(messages_inserted) FROM result);
  rejected bigint := (SELECT sum(messages_rejected) FROM result);
  stored bigint := (SELECT count(*) FROM chat_message);
  recorded bigint := (SELECT count(*) FROM chat_backfill.rejected_messages WHERE message_key IS NOT NULL);
  expanded bigint := (SELECT count(*) FROM chat c, chat_messages(c.id, c.user_id, c.chat) m
                      WHERE c.user_id NOT LIKE 'shared-%');
BEGIN
  IF (SELECT extversion FROM pg_extension WHERE extname = 'chat_backfill') <> '$version' THEN
    RAISE 'installed version is not $version';
  END IF;
  IF NOT EXISTS (SELECT FROM pg_extension_update_paths('chat_backfill')
                 WHERE source = '0.1.0' AND target = '$version' AND path IS NOT NULL) THEN
    RAISE 'no update path from 0.1.0 to $version';
  END IF;
  IF stored = 0 OR inserted <> stored OR rejected <> recorded OR rejected = 0 THEN
    RAISE 'counts: inserted % stored % rejected % recorded %', inserted, stored, rejected, recorded;
  END IF;
  IF expanded > stored + recorded THEN
    RAISE 'lost messages: % expanded, % stored, % rejected', expanded, stored, recorded;
  END IF;
  RAISE NOTICE 'package backfill: % messages stored, % rejected and recorded', stored, recorded;
END \$\$;
SQL
PG_MAJOR=15 bash scripts/cluster.sh stop "$cluster"

echo "-- dpkg -r $package"
dpkg -r "$package" >/dev/null
[ "$(dpkg-query -W -f '${Status}' "$package" 2>/dev/null || true)" != "install ok installed" ] || fail "still installed"
[ -z "$(source_build_files)" ] || fail "files left after dpkg -r: $(source_build_files)"
echo "package test passed: $(basename "$deb")"
