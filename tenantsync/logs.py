"""Log lines a machine can read: ``--log-format json`` writes one JSON object per line, with
the tenant, the job and its id, and the TXID range being shipped on every line logged while
they are known.

What a line is about is kept in a context variable (``about``) set where a job starts
(``Fleet.sync``, the storage jobs, hydrations, archivals; a Celery task's id in workers/),
so no log call has to repeat it; each thread sees its own. Nothing secret is ever put there:
the API token and AWS keys are neither logged nor part of any context.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
from collections.abc import Iterator
from datetime import datetime, timezone

_about: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("tenantsync_log_about", default={})

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def about(**fields: object) -> Iterator[None]:
    """Every line logged inside (in this thread) carries ``fields`` (None values are left out)."""
    token = enter(**fields)
    try:
        yield
    finally:
        leave(token)


def enter(**fields: object) -> contextvars.Token:
    """``about`` for code that cannot wrap a block (a job's start and end signals): returns
    the token ``leave`` takes back."""
    return _about.set({**_about.get(), **{k: str(v) for k, v in fields.items() if v is not None}})


def leave(token: contextvars.Token) -> None:
    _about.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, the
    process's ``fields`` (which child it is), the fields of ``about`` in force, and the
    exception's traceback if there is one."""

    def __init__(self, fields: dict[str, str] | None = None):
        super().__init__()
        self.fields = fields or {}

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **self.fields,
            **_about.get(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(level: int, fmt: str, stream, fields: dict[str, str] | None = None) -> None:  # noqa: ANN001
    """The process's root handler on ``stream``: ``fmt`` is "text" or "json"; ``fields`` go
    on every JSON line (text lines name them before the logger)."""
    handler = logging.StreamHandler(stream)
    prefix = "".join(f"{v} " for v in (fields or {}).values())
    handler.setFormatter(JsonFormatter(fields) if fmt == "json" else
                         logging.Formatter(TEXT_FORMAT.replace("%(name)s", prefix + "%(name)s")))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
