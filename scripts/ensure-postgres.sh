#!/usr/bin/env bash
# Makes PostgreSQL server binaries (initdb, pg_ctl) available for the store
# tests, which start a throw-away server of their own. Idempotent and quiet;
# never fails the caller: without root or apt-get it only says why, and the
# PostgreSQL half of the tests is then skipped with that reason.
set -u
found() { ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; }
if found; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-postgres: initdb not found and not root: PostgreSQL tests will be skipped" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-postgres: initdb not found and no apt-get: PostgreSQL tests will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
{ apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql; } >/tmp/ensure-postgres.log 2>&1 \
    || echo "ensure-postgres: apt-get install postgresql failed (see /tmp/ensure-postgres.log): PostgreSQL tests will be skipped" >&2
exit 0
