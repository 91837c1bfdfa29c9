"""Logging set-up for the Atlas processes.

Nothing in Atlas logs a token or a key on purpose. As a second line of defence, every record
passes a filter that masks anything shaped like a bearer credential or a ``token=`` parameter,
so that a library's message (an exception text quoting a URL, say) cannot leak one either.

Two formats (``ATLAS_LOG_FORMAT``): ``text`` for people, one line per record; ``json`` for
machines, one JSON object per line with ``time``, ``level``, ``logger``, ``message``, the
structured fields a record carries in ``extra={"fields": {...}}`` (the request log's user, path,
outcome, tokens, duration), and ``error`` with the traceback when there is one.
"""

from __future__ import annotations

import logging
import re
import sys
import time

import msgspec

_SECRET_PATTERNS = (
    (re.compile(r"(?i)(bearer\s+)[^\s'\",]+"), r"\1***"),
    (re.compile(r"(?i)([?&]token=)[^&\s'\"]+"), r"\1***"),
    (re.compile(r"(?i)(x-provider-api-key['\"]?\s*[:=]\s*['\"]?)[^\s'\",]+"), r"\1***"),
    (re.compile(r"(?i)(postgres(?:ql)?://[^:/@\s]*:)[^@\s]+@"), r"\1***@"),
    (re.compile(r"(?i)(password=)[^&\s'\"]+"), r"\1***"),
)


def redact(text: str) -> str:
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update({k: v for k, v in fields.items() if k not in entry})
        if record.exc_info:
            entry["error"] = redact(self.formatException(record.exc_info))
        return msgspec.json.encode(entry).decode()


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request line at INFO; keep it to warnings.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # psycopg's pool logs every connection it lends at INFO.
    logging.getLogger("psycopg.pool").setLevel(logging.WARNING)
