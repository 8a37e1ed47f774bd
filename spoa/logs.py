"""Logging set-up: one line per event that matters, as text or JSON (LOG_FORMAT=json).

Owns: the formatters, `setup_logging`, and `ServiceLog`, the adapter through which a service's
discovery and HAProxy writer log. Must not: be called on the per-request path; nothing there logs.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, plus any `extra=` fields."""

    _RESERVED = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._RESERVED and not key.startswith("_"):
                doc[key] = value if isinstance(value, str | int | float | bool | type(None)) else str(value)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, separators=(",", ":"))


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class ServiceLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A service's log lines: prefixed with its name when one process has several (`shop: DNS ...`),
    and, as structured fields (LOG_FORMAT=json), `service` (the target, as the metrics' `service`
    label: `tasks.shop:8080`) and, with several services, `service_name`."""

    def __init__(self, logger: logging.Logger, service: str, name: str = "") -> None:
        fields = {"service": service} | ({"service_name": name} if name else {})
        super().__init__(logger, fields)
        self.prefix = f"{name}: " if name else ""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return f"{self.prefix}{msg}", kwargs
