#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for demos and client-side tests.
#   scripts/cluster.sh start [DIR] [extra postgresql.conf lines...]  -> prints "export PGHOST=... PGPORT=..."
#   scripts/cluster.sh stop [DIR]
#   scripts/cluster.sh standby PRIMARY_DIR DIR  -> a streaming standby of the running cluster
#                                                 in PRIMARY_DIR (pg_basebackup -R); prints its env
# PG_MAJOR (15, 16 or 18; default 15) picks the server: scripts/pg_majors.sh knows where each is.
# PostgreSQL refuses to run as root, so the cluster belongs to the postgres user.
set -euo pipefail
PG_MAJOR=${PG_MAJOR:-15}
bin_of() { "$(bash "$(dirname "$0")/pg_majors.sh" pg_config "$1")" --bindir; }
cmd=${1:?start|stop}; dir=${2:-/tmp/chat_backfill_pg}; shift 2 2>/dev/null || shift $#
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

free_port() {
  python3 - <<'PY'
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()
PY
}

case "$cmd" in
start)
  BIN=$(bin_of "$PG_MAJOR")
  # A running cluster of another major in the same directory is stopped and replaced.
  if [ -f "$dir/postmaster.pid" ] && [ "$(cat "$dir/PG_VERSION" 2>/dev/null)" != "$PG_MAJOR" ]; then
    bash "$0" stop "$dir"
  fi
  if [ -f "$dir/postmaster.pid" ] && as_pg "$BIN/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
    port=$(sed -n 4p "$dir/postmaster.pid")
  else
    rm -rf "$dir"; mkdir -p "$dir"; chown postgres: "$dir" 2>/dev/null || true
    as_pg "$BIN/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$dir.initdb.log" 2>&1
    port=$(free_port)
    {
      echo "listen_addresses = '127.0.0.1'"
      echo "port = $port"
      echo "unix_socket_directories = '$dir'"
      echo "fsync = off"
      echo "max_wal_size = '4GB'"
      # Every log line names its SQLSTATE: the client suite's last test reads them.
      echo "log_line_prefix = '%m [%p] %e '"
      for line in "$@"; do echo "$line"; done
    } >>"$dir/postgresql.conf"
    as_pg "$BIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w start >/dev/null
  fi
  echo "export PGHOST=$dir PGPORT=$port PGUSER=postgres PGDATABASE=postgres"
  ;;
standby)
  BIN=$(bin_of "$PG_MAJOR")
  # Here $dir is the primary's directory; the standby's comes next.
  primary=$dir; dir=${1:?standby DIR}
  pport=$(sed -n 4p "$primary/postmaster.pid")
  [ -f "$dir/postmaster.pid" ] && bash "$0" stop "$dir"
  rm -rf "$dir"; mkdir -p "$dir"; chown postgres: "$dir" 2>/dev/null || true
  as_pg "$BIN/pg_basebackup" -h "$primary" -p "$pport" -U postgres -D "$dir" -R -X stream -c fast 2>"$dir.basebackup.log" ||
    { cat "$dir.basebackup.log" >&2; exit 1; }
  chmod 700 "$dir"
  : >"$dir/server.log"  # the primary's log came with the copy
  port=$(free_port)
  # The copied postgresql.conf names the primary's port and socket: later lines win.
  { echo "port = $port"; echo "unix_socket_directories = '$dir'"; echo "hot_standby = on"; } >>"$dir/postgresql.conf"
  as_pg "$BIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w start >/dev/null
  echo "export PGHOST=$dir PGPORT=$port PGUSER=postgres PGDATABASE=postgres"
  ;;
stop)
  # Stopped with the server's own major, whatever PG_MAJOR says.
  [ -d "$dir" ] || exit 0
  major=$(cat "$dir/PG_VERSION" 2>/dev/null || echo "$PG_MAJOR")
  BIN=$(bin_of "$major")
  if [ -f "$dir/postmaster.pid" ] && as_pg "$BIN/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
    as_pg "$BIN/pg_ctl" -D "$dir" -m fast -w stop >/dev/null
  fi
  ;;
*) echo "usage: $0 start|stop [DIR] | standby PRIMARY_DIR DIR" >&2; exit 2 ;;
esac
