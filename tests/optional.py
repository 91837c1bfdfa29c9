"""Tests that need something outside the venv (a PostgreSQL server, HAProxy, a browser).

``scripts/install-test-deps.sh`` installs these. Where one is still missing, a developer's machine
skips the tests that need it; on CI (the ``CI`` variable set, as every CI service does) a skipped
test is a test that did not run, so the same call fails them instead.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest

INSTALL_HINT = "run scripts/install-test-deps.sh"


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(message: str) -> NoReturn:
    """Skip the calling test, fixture or test module, or fail it on CI."""
    if on_ci():
        pytest.fail(f"{message} (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(f"{message}; {INSTALL_HINT}", allow_module_level=True)


def require_module(name: str) -> ModuleType:
    """``pytest.importorskip`` that fails on CI."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        unavailable(f"the Python module {name!r} is not installed ({exc})")
