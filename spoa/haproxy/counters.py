"""Counting the decisions HAProxy makes without the agent, for the agent's metrics.

Owns: reading fe_main's stick table, where haproxy.cfg tracks every request the table (or the
cookie map) decided under its key source (`track-sc2 var(txn.sticky.source)`: `http_req_cnt` is
the decisions of that source, `gpc0` the sticky cookies those decisions set), and keeping totals
that only grow across HAProxy reloads (a new worker starts its table from zero).
With several services in one process the keys are `<service name>/<source>` and each service's
counts are its own (`split_counts`).
Must not: run per request. The agent reads the table once per scrape of /metrics (one
`show table` on the admin socket, a few lines); HAProxy's own cost is one stick-table update
per request (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Mapping

# The proxy whose stick table holds the counts (haproxy.cfg).
COUNTS_TABLE = "fe_main"


def parse_counts(answer: str) -> dict[str, tuple[int, int]]:
    """`show table fe_main` → {key source: (decisions, cookies set)}; lines it cannot read are skipped."""
    out: dict[str, tuple[int, int]] = {}
    for line in answer.splitlines():
        if " key=" not in line:
            continue
        fields = dict(word.split("=", 1) for word in line.split()[1:] if "=" in word)
        key = fields.get("key")
        requests = fields.get("http_req_cnt", "")
        cookies = fields.get("gpc0", "0")
        if key and requests.isdigit() and cookies.isdigit():
            out[key] = (int(requests), int(cookies))
    return out


def split_counts(counts: Mapping[str, tuple[int, int]]) -> dict[str, dict[str, tuple[int, int]]]:
    """Several services (haproxy.cfg tracks `<service name>/<source>`): {service name: {source:
    counts}}. A key without a service name is left out: it is not any one service's."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for key, value in counts.items():
        name, sep, source = key.partition("/")
        if sep and name and source:
            out.setdefault(name, {})[source] = value
    return out


class DecisionCounts:
    """Totals of HAProxy's own decisions by key source, from successive readings of its counters."""

    def __init__(self) -> None:
        self._decisions: dict[str, int] = {}
        self.cookies_issued = 0
        self._last: dict[str, tuple[int, int]] = {}
        self.readings = 0

    def update(self, counts: Mapping[str, tuple[int, int]]) -> None:
        """Add what changed since the last reading. The first reading is the baseline (this
        process's counters start at zero, as Prometheus expects of a restarted process; what
        HAProxy counted before is not this process's to report). A counter lower than last time
        (or gone) was reset by a reload: all of its new value is new."""
        if self.readings == 0:
            self._last = dict(counts)
            self.readings = 1
            return
        for key, (requests, cookies) in counts.items():
            last_requests, last_cookies = self._last.get(key, (0, 0))
            if requests < last_requests or cookies < last_cookies:
                last_requests = last_cookies = 0
            self._decisions[key] = self._decisions.get(key, 0) + requests - last_requests
            self.cookies_issued += cookies - last_cookies
        self._last = dict(counts)
        self.readings += 1

    def decisions(self, source: str) -> int:
        return self._decisions.get(source, 0)


__all__ = ["COUNTS_TABLE", "DecisionCounts", "parse_counts", "split_counts"]
