"""scripts/install-test-deps.sh: on a user's machine a step that cannot be done is a warning and
the README's test command goes on to pytest (those tests skip); on CI it is an error."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install-test-deps.sh"


def run(ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHON"] = "/bin/false"  # a Python that cannot import or install anything
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)


def test_a_failed_step_is_a_warning_on_a_users_machine():
    done = run(None)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARNING" in done.stdout + done.stderr and "playwright" in done.stdout + done.stderr


def test_a_failed_step_fails_on_ci():
    done = run("true")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "ERROR: CI is set" in done.stdout + done.stderr
