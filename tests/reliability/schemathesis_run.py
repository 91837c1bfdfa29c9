"""Schemathesis against a running server, from its own ``/openapi.json`` (issue 14).

``fuzz`` loads the document the server serves, and for every operation draws cases from it with
hypothesis (valid ones, then invalid ones), sends each to the server with ``requests`` (blocking:
the tests call it in a worker thread while trio serves) and runs schemathesis's checks on each
response. Failures are collected, not raised at the first, so that one run reports them all.

``run_cli`` runs schemathesis's own runner (``st run``) in a subprocess, every check: its
coverage phase (boundary values, each kind of wrong value, every undeclared method), then its
fuzzing and stateful phases.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import trio
import hypothesis.errors
import requests
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import ServerError
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

# What the documents promise for any request: never a 5xx, only documented statuses, content
# types and headers, bodies and events that match their schemas.
CONFORMANCE = [
    not_a_server_error, status_code_conformance, content_type_conformance,
    response_headers_conformance, response_schema_conformance,
]
# Valid requests are served; invalid ones are refused with a 4xx.
CHECKS = {
    GenerationMode.POSITIVE: [*CONFORMANCE, positive_data_acceptance],
    GenerationMode.NEGATIVE: [*CONFORMANCE, negative_data_rejection],
}
TIMEOUT = 10.0


def not_an_internal_error(ctx: Any, response: Any, case: Any) -> None:
    """``not_a_server_error`` for a server behind a failing provider, whose 502 and 504 are its
    contract's answers, and whose own 500 ``/v1`` passes on: only a 500 of the server's own
    (``internal``, or not JSON at all) is a failure."""
    if response.status_code != 500:
        return
    try:
        code = response.json()["error"]["code"]
    except (ValueError, TypeError, KeyError):
        code = None
    if code in (None, "internal"):
        raise ServerError(operation=case.operation.label, status_code=500)


def _with(checks: list[Any], faults: bool) -> list[Any]:
    """The checks, for a healthy provider or a failing one. A failing one may refuse a valid
    request (its 400, which /v1 passes on): valid data is then not always served."""
    if not faults:
        return checks
    kept = [check for check in checks if check is not positive_data_acceptance]
    return [not_an_internal_error if check is not_a_server_error else check for check in kept]


@dataclass
class Figures:
    examples: int = 0
    statuses: Counter = field(default_factory=Counter)
    by_operation: Counter = field(default_factory=Counter)  # (label, mode, status)
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "statuses": dict(sorted(self.statuses.items())),
                "failures": len(self.failures)}


def fuzz(
    document_url: str,
    base_url: str,
    *,
    max_examples: int,
    derandomize: bool,
    headers: Mapping[str, str] | None = None,
    fixed: Callable[[Any, GenerationMode], dict[str, Any]] = lambda operation, mode: {},
    modes: tuple[GenerationMode, ...] = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE),
    provider_faults: bool = False,
) -> Figures:
    """Fuzz every operation of the document at ``document_url`` against ``base_url``.
    ``headers``: sent with every request (credentials the document cannot know).
    ``fixed(operation, mode)``: keyword arguments for ``as_strategy`` that pin some parameters (a
    real agent id, say), so that the examples reach past the first refusal.
    ``provider_faults``: the provider fails on purpose, so 502 and 504 are expected answers."""
    schema = schemathesis.openapi.from_url(document_url)
    figures = Figures()
    session = requests.Session()
    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in modes:
                _fuzz_operation(operation, mode, base_url, session, dict(headers or {}), fixed(operation, mode),
                                max_examples, derandomize, figures, _with(CHECKS[mode], provider_faults))
    finally:
        session.close()
    return figures


def _fuzz_operation(
    operation: Any, mode: GenerationMode, base_url: str, session: requests.Session,
    headers: dict[str, str], pinned: dict[str, Any], max_examples: int, derandomize: bool,
    figures: Figures, checks: list[Any],
) -> None:

    @hypothesis.given(operation.as_strategy(generation_mode=mode, **pinned))
    @hypothesis.settings(
        max_examples=max_examples, derandomize=derandomize, database=None, deadline=None,
        suppress_health_check=list(hypothesis.HealthCheck), print_blob=True,
        # The first failure of each operation is enough: shrinking it costs more than it tells.
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    def run(case: Any) -> None:
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=TIMEOUT)
        figures.examples += 1
        figures.statuses[response.status_code] += 1
        figures.by_operation[(operation.label, mode.value, response.status_code)] += 1
        case.validate_response(response, checks=checks)

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        assert mode is GenerationMode.NEGATIVE  # nothing to get wrong in a request without inputs
    except (Exception, BaseExceptionGroup) as exc:  # one operation's failures; the others still run
        figures.failures.append(f"{operation.label} ({mode.value}): {exc}")


@dataclass
class CliRun:
    returncode: int
    output: str

    @property
    def cases(self) -> int:
        found = re.search(r"(\d+) generated", self.output)
        return int(found.group(1)) if found else 0


async def run_cli(
    document_url: str, config: str, *, headers: Mapping[str, str], phases: str, max_examples: int,
    exclude_checks: tuple[str, ...] = (), directory: Any,
) -> CliRun:
    """``st run DOCUMENT --checks all`` with ``config`` (TOML: pinned parameters) as its config
    file, random."""
    config_file = directory / "schemathesis.toml"
    config_file.write_text(config)
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config_file), "run", document_url,
        "--checks", "all", "--phases", phases, "--max-examples", str(max_examples), "--no-color",
        *(["--exclude-checks", ",".join(exclude_checks)] if exclude_checks else []),
        *[arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")],
    ]
    result = await trio.run_process(command, capture_stdout=True, stderr=subprocess.STDOUT, check=False,
                                    cwd=str(directory))
    return CliRun(result.returncode, result.stdout.decode(errors="replace"))
