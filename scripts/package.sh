#!/usr/bin/env bash
# Debian packages of this release, one per supported PostgreSQL major, named and laid out
# as the PostgreSQL community's (apt.postgresql.org) packages are:
#
#   dist/postgresql-NN-chat-backfill_<version>_amd64.deb
#     /usr/lib/postgresql/NN/lib/chat_backfill.so
#     /usr/share/postgresql/NN/extension/chat_backfill.control
#     /usr/share/postgresql/NN/extension/chat_backfill--*.sql   (install and upgrade scripts)
#
#   bash scripts/package.sh            every supported major (scripts/pg_majors.sh list)
#   bash scripts/package.sh 15 18      those majors
# Release builds (fat LTO); CHAT_BACKFILL_PROFILE=ci packages the test command's build.
#
# Each is built by `cargo pgrx package` against that major's server headers (for 16 and 18
# the PyPI servers from scripts/pg_majors.sh, whose own paths are under ~/.cache; the files
# are moved to the Debian paths here). Run scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
version=$(awk -F'"' '/^version = /{print $2; exit}' Cargo.toml)
profile=${CHAT_BACKFILL_PROFILE:-release}
majors=("$@")
[ ${#majors[@]} -gt 0 ] || read -r -a majors < <(bash scripts/pg_majors.sh list)
mkdir -p dist
arch=$(dpkg --print-architecture)

# The shared libraries the .so needs, as Debian package relations (libc6, libgcc-s1).
shlib_depends() {
  local so=$1 work out; work=$(mktemp -d)
  mkdir "$work/debian"
  printf 'Source: chat-backfill\n\nPackage: chat-backfill\nArchitecture: any\n' >"$work/debian/control"
  out=$(cd "$work" && dpkg-shlibdeps -O "$so" 2>"$work/err") || { cat "$work/err" >&2; rm -rf "$work"; return 1; }
  rm -rf "$work"
  out=$(sed -n 's/^shlibs:Depends=//p' <<<"$out")
  [ -n "$out" ] || { echo "dpkg-shlibdeps found no dependencies for $so" >&2; return 1; }
  echo "$out"
}

for major in "${majors[@]}"; do
  pg_config=$(bash scripts/pg_majors.sh pg_config "$major")
  stage=$(mktemp -d /tmp/chat_backfill_package.XXXXXX)
  trap 'rm -rf "$stage"' EXIT
  echo "== PostgreSQL $major: cargo pgrx package ($("$pg_config" --version))"
  CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}" cargo pgrx package --profile "$profile" --pg-config "$pg_config" \
    --no-default-features --features "pg$major" --out-dir "$stage/raw" >"$stage/build.log" 2>&1 ||
    { tail -40 "$stage/build.log" >&2; exit 1; }

  deb=$stage/deb
  lib=$deb/usr/lib/postgresql/$major/lib
  ext=$deb/usr/share/postgresql/$major/extension
  mkdir -p "$lib" "$ext" "$deb/DEBIAN"
  install -m 0644 "$stage/raw$("$pg_config" --pkglibdir)/chat_backfill.so" "$lib/"
  install -m 0644 "$stage/raw$("$pg_config" --sharedir)/extension/"chat_backfill* "$ext/"
  # Every upgrade script in sql/ must be in the package (pgrx copies them; make sure).
  for script in sql/chat_backfill--*--*.sql; do
    cmp -s "$script" "$ext/$(basename "$script")" || { echo "missing from the package: $script" >&2; exit 1; }
  done
  test -f "$ext/chat_backfill--$version.sql"

  # Stripped of debug symbols, as distribution packages are.
  strip --strip-unneeded "$lib/chat_backfill.so"
  depends="postgresql-$major, $(shlib_depends "$lib/chat_backfill.so")"
  mkdir -p "$deb/usr/share/doc/postgresql-$major-chat-backfill"
  printf 'Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: chat_backfill\n\nFiles: *\nCopyright: the chat_backfill developers\nLicense: %s\n' \
    "$(awk -F'"' '/^license = /{print $2; exit}' Cargo.toml)" >"$deb/usr/share/doc/postgresql-$major-chat-backfill/copyright"
  chmod 0644 "$deb/usr/share/doc/postgresql-$major-chat-backfill/copyright"
  size=$(du -sk "$deb/usr" | cut -f1)
  cat >"$deb/DEBIAN/control" <<EOF
Package: postgresql-$major-chat-backfill
Version: $version
Architecture: $arch
Maintainer: chat_backfill developers <chat-backfill@localhost>
Depends: $depends
Section: database
Priority: optional
Installed-Size: $size
Description: expand chat JSON documents into chat_message rows inside PostgreSQL $major
 chat_backfill moves conversations that applications stored as JSON documents (Open WebUI's
 chat.chat) into rows of a chat_message table inside the database: set-returning
 functions and a committing, resumable procedure that write in bounded batches and
 record the rows they cannot store instead of aborting.
EOF
  (cd "$deb" && find usr -type f -exec md5sum {} + >DEBIAN/md5sums)
  out=dist/postgresql-$major-chat-backfill_${version}_${arch}.deb
  dpkg-deb --root-owner-group -Zxz --build "$deb" "$out" >/dev/null
  echo "$out: $(dpkg-deb -f "$out" Depends)"
  rm -rf "$stage"
  trap - EXIT
done
