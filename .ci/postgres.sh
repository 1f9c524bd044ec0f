#!/usr/bin/env bash
# A private, throwaway PostgreSQL server for the tests (used by .ci/run and by tests/conftest.py's postgres_url).
#
#   eval "$(.ci/postgres.sh start)"   creates a cluster in a new temp folder, listening only on 127.0.0.1 on a free
#                                     port (trust authentication: reachable from this machine only, and it holds
#                                     nothing but test rows), creates the database digitkit_test and prints
#                                     export DIGITKIT_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:PORT/digitkit_test
#                                     export DIGITKIT_PG_DIR=/tmp/digitkit-pg.XXXXXX
#   .ci/postgres.sh stop DIR          stops that server and deletes its folder.
#
# Needs the PostgreSQL server binaries (Debian: apt-get install postgresql); exits 3 with a reason if they are
# missing. As root the server runs as the `postgres` system user, since initdb and postgres refuse to run as root.
set -euo pipefail

die() { echo "postgres.sh: $*" >&2; exit "${2:-1}"; }

find_bindir() {
    local d
    # Debian keeps each major version in /usr/lib/postgresql/<version>/bin; take the newest.
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
    done
    d="$(command -v initdb 2>/dev/null || true)"
    if [ -n "$d" ]; then
        d="$(dirname "$(readlink -f "$d")")"
        [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
    fi
    return 1
}

as_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

start() {
    local bin dir port attempt
    bin="$(find_bindir)" || die "PostgreSQL server binaries (initdb, pg_ctl) not found; install them (Debian: apt-get install postgresql)" 3
    if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
        die "running as root but there is no 'postgres' user to run the server as; install the Debian package postgresql" 3
    fi
    dir="$(mktemp -d "${TMPDIR:-/tmp}/digitkit-pg.XXXXXX")"
    [ "$(id -u)" -eq 0 ] && chown postgres "$dir"
    if ! as_owner "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --locale=C --no-sync \
        >"$dir/initdb.log" 2>&1; then
        cat "$dir/initdb.log" >&2
        rm -rf "$dir"
        die "initdb failed (log above)"
    fi
    # A free port: pick one at random and let the server tell us if it is taken (then try another).
    for attempt in 1 2 3 4 5 6 7 8; do
        port=$(( 20000 + RANDOM % 40000 ))
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then continue; fi
        if as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
            -o "-h 127.0.0.1 -p $port -k $dir" start >/dev/null 2>&1; then
            if as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres digitkit_test; then
                echo "export DIGITKIT_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:$port/digitkit_test"
                echo "export DIGITKIT_PG_DIR=$dir"
                return 0
            fi
            as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
            break
        fi
    done
    cat "$dir/server.log" >&2 2>/dev/null || true
    rm -rf "$dir"
    die "could not start a PostgreSQL server on 127.0.0.1 (server log above)"
}

stop() {
    local dir="${1:?usage: postgres.sh stop DIR}" bin
    # Only ever delete a folder this script made.
    case "$(basename "$dir")" in digitkit-pg.*) ;; *) die "$dir: not a folder made by postgres.sh start" ;; esac
    [ -d "$dir" ] || return 0
    if [ -f "$dir/data/postmaster.pid" ] && bin="$(find_bindir)"; then
        as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
}

case "${1:-}" in
    start) start ;;
    stop) stop "${2:-}" ;;
    *) die "usage: $0 start | stop DIR" 2 ;;
esac
