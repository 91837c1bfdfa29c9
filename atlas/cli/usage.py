"""``atlas usage [USER] [--since YYYY-MM-DD] [--json]``: what users spent, per UTC day, and what
their limits leave.

Reads the store directly (the ``usage/`` files, or the PostgreSQL database of
``--database-url``, that a running server adds to durably per request), so it works while
``atlas serve`` runs. Limits are resolved as the server does for built-in users:
the defaults (``ATLAS_LIMIT_*`` or the flags), then the user's own (``atlas user limit``); limits
that an external auth API sends exist only in the server. ``--json`` prints the contract's usage
object for one user, a list of them for all users.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from atlas.store import Limits, StoreError, is_valid_user_id, store_for
from atlas.store.usage import REPORT_DAYS, days_before, parse_day, report, resolve_limits, utc_day

LIMIT_LABELS = (
    ("tokensPerDay", "tokens/day", "tokensToday", "left today"),
    ("tokensPerMonth", "tokens/month", "tokensThisMonth", "left this month"),
    ("requestsPerMinute", "requests/minute", None, None),
    ("concurrentRequests", "requests at once", None, None),
)


def main(args: argparse.Namespace) -> int:
    settings = args.settings
    if args.user_id is not None and not is_valid_user_id(args.user_id):
        print(f"atlas: invalid user id {args.user_id!r}: use 1-128 of A-Z a-z 0-9 . _ @ -", file=sys.stderr)
        return 2
    today = utc_day(time.time())
    try:
        since = parse_day(args.since) if args.since else days_before(today, REPORT_DAYS - 1)
    except ValueError as exc:
        print(f"atlas: invalid --since: {exc}", file=sys.stderr)
        return 2
    defaults = Limits(**{k: v for k, v in settings.default_limits().items() if v is not None})
    store = store_for(settings)
    try:
        user_ids = [args.user_id] if args.user_id else sorted(set(store.usage_user_ids()) | set(store.user_ids()))
        reports = []
        for user_id in user_ids:
            user = store.load_user(user_id)
            limits = resolve_limits(defaults, user.limits if user else None)
            reports.append(report(user_id, store.load_usage(user_id), limits, today=today, since=since))
    except StoreError as exc:
        print(f"atlas: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    if args.json:
        print(json.dumps(reports[0] if args.user_id else reports, indent=2))
        return 0
    print(render(reports, since))
    return 0


def render(reports: list[dict[str, Any]], since: str) -> str:
    if not reports:
        return "No users and no usage recorded yet."
    header = ("USER", "DATE", "REQUESTS", "PROMPT", "COMPLETION", "TOTAL")
    rows: list[tuple[str, ...]] = []
    notes: list[tuple[int, str]] = []  # (row index after which the note goes, text)
    for entry in reports:
        days = entry["days"]
        for day in days:
            rows.append((entry["userId"], day["date"], *(f"{day[k]:,}" for k in
                         ("requests", "promptTokens", "completionTokens", "totalTokens"))))
        if len(days) > 1:
            totals = [sum(d[k] for d in days) for k in ("requests", "promptTokens", "completionTokens", "totalTokens")]
            rows.append((entry["userId"], "total", *(f"{t:,}" for t in totals)))
        if not days:
            rows.append((entry["userId"], f"(nothing since {since})", "", "", "", ""))
        notes.append((len(rows), describe_limits(entry)))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(widths[i + 2]) for i, cell in enumerate(row[2:])]
        return "  ".join(cells).rstrip()

    out = [line(header)]
    for index, row in enumerate(rows, start=1):
        out.append(line(row))
        out += [" " * (widths[0] + 2) + text for after, text in notes if after == index]
    return "\n".join(out)


def describe_limits(entry: dict[str, Any]) -> str:
    limits, remaining = entry["limits"], entry["remaining"]
    parts = []
    for name, label, left_key, left_label in LIMIT_LABELS:
        if name in limits:
            text = f"{limits[name]:,} {label}"
            if left_key is not None and left_key in remaining:
                text += f" ({remaining[left_key]:,} {left_label})"
            parts.append(text)
    return "limits: " + ("; ".join(parts) if parts else "none (unlimited)")
