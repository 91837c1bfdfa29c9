#!/usr/bin/env bash
# Installs what the browser and Node tests need, only when missing:
#   - Debian's chromium (Playwright drives it; Playwright's own browser downloads are never used)
#   - Playwright for Python, into the project's venv
#   - partysocket and ws, into tests/partysocket/node_modules
# Safe to run repeatedly. Each step says what it does and does not stop the others on failure;
# the tests that need a missing piece skip with a message saying which one.
set -u
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
status=0

if [ ! -x /usr/bin/chromium ]; then
    echo "install-test-deps: installing chromium (Debian package)"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq >/dev/null \
        && $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null \
        || { echo "install-test-deps: could not install chromium; web tests will skip"; status=1; }
fi

if ! "$PYTHON" -c "import playwright" 2>/dev/null; then
    echo "install-test-deps: installing playwright for Python (no browser download)"
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 "$PYTHON" -m pip install -q playwright \
        || { echo "install-test-deps: could not install playwright; web tests will skip"; status=1; }
fi

if command -v npm >/dev/null 2>&1; then
    if [ ! -d tests/partysocket/node_modules/partysocket ] || [ ! -d tests/partysocket/node_modules/ws ]; then
        echo "install-test-deps: npm install in tests/partysocket"
        (cd tests/partysocket && npm install --no-audit --no-fund --loglevel=error) \
            || { echo "install-test-deps: npm install failed (registry unreachable?); partysocket test will skip"; status=1; }
    fi
else
    echo "install-test-deps: node/npm not found; the partysocket test will skip"
fi

exit $status
