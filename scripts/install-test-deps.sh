#!/usr/bin/env bash
# Installs what the optional tests need, only when missing:
#   - Debian's chromium (Playwright drives it; Playwright's own browser downloads are never used)
#   - Playwright for Python, into the project's venv
#   - partysocket and ws, into tests/partysocket/node_modules
#   - haproxy (the scale-out tests put it in front of several Atlas processes)
#   - PostgreSQL 15 server binaries (tests/pg_cluster.py starts a throwaway cluster from them)
# Safe to run repeatedly. Each step says what it does, and a failed step does not stop the others.
#
# What a failure means depends on where this runs:
#   - on CI (the CI variable set, as every CI service does), a test that skips is a test that did
#     not run: any failed step makes this script exit 1, naming every step that failed;
#   - on a developer's machine it prints a warning and exits 0, so the README's test command still
#     reaches pytest and the tests that need a missing piece skip with a message saying which one.
set -u
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
failed=()

say() { echo "install-test-deps: $*"; }
fail() { say "FAILED: $1"; failed+=("$1"); }

on_ci() {
    case "${CI:-}" in "" | 0 | false | False | FALSE | no) return 1 ;; *) return 0 ;; esac
}

if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
apt_updated=""
apt_install() {  # apt_install PACKAGE...: one `apt-get update` per run, then install these
    if [ -z "$apt_updated" ]; then
        $SUDO apt-get update -qq >/dev/null || return 1
        apt_updated=1
    fi
    $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if [ ! -x /usr/bin/chromium ]; then
    say "installing chromium (Debian package)"
    apt_install chromium fonts-dejavu-core \
        || fail "chromium (Debian package), for the web tests"
fi

if ! command -v haproxy >/dev/null 2>&1; then
    say "installing haproxy (Debian package)"
    apt_install haproxy || fail "haproxy (Debian package), for the HAProxy tests"
fi

# tests/pg_cluster.py uses /usr/lib/postgresql/15/bin, or else the newest other version there.
# Only the binaries are used: a cluster the package may start on port 5432 is not the tests'.
if [ ! -x /usr/lib/postgresql/15/bin/initdb ]; then
    say "installing the PostgreSQL 15 server (Debian package postgresql-15)"
    if ! apt_install postgresql-15; then
        if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
            say "no postgresql-15 here; the tests use the PostgreSQL server already installed"
        else
            say "no postgresql-15 here; installing this system's default version (postgresql)"
            apt_install postgresql || fail "PostgreSQL server (postgresql-15 or postgresql), for the PostgreSQL tests"
        fi
    fi
fi

if ! "$PYTHON" -c "import playwright" 2>/dev/null; then
    say "installing playwright for Python (no browser download)"
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 "$PYTHON" -m pip install -q playwright \
        || fail "playwright for Python, for the web tests"
fi

if command -v npm >/dev/null 2>&1; then
    if [ ! -d tests/partysocket/node_modules/partysocket ] || [ ! -d tests/partysocket/node_modules/ws ]; then
        say "npm install in tests/partysocket"
        (cd tests/partysocket && npm install --no-audit --no-fund --loglevel=error) \
            || fail "npm install in tests/partysocket (registry unreachable?), for the partysocket test"
    fi
else
    fail "node/npm (not found), for the partysocket test"
fi

if [ ${#failed[@]} -eq 0 ]; then
    exit 0
fi
if on_ci; then
    say "ERROR: CI is set and ${#failed[@]} step(s) failed; on CI no test may skip for want of them:"
    printf '  - %s\n' "${failed[@]}"
    exit 1
fi
say "WARNING: ${#failed[@]} step(s) failed; the tests that need them will skip:"
printf '  - %s\n' "${failed[@]}"
exit 0
