"""When to log about a DNS outage: once when it starts, rarely while it lasts, once when it ends.

Owns: the back-off schedule of "still failing" lines (the first repeat after `first_repeat` seconds,
then twice as long each time up to `max_interval`) and the counts that go into the lines. Must not:
format or write log lines, read clocks (every method takes `now`), or know what failed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OutageNote:
    """What to say about an outage at this step."""

    kind: str  # "started", "ongoing" or "ended"
    failures: int  # failed lookups in this outage so far
    duration: float  # seconds since the first failed lookup of this outage


class OutageLog:
    """Decides which failed or recovered lookups deserve a log line."""

    def __init__(self, first_repeat: float = 30.0, max_interval: float = 600.0) -> None:
        if not 0 < first_repeat <= max_interval:
            raise ValueError(f"need 0 < first_repeat <= max_interval, got {first_repeat!r}, {max_interval!r}")
        self.first_repeat = first_repeat
        self.max_interval = max_interval
        self._since: float | None = None
        self._failures = 0
        self._next_note = 0.0
        self._interval = first_repeat

    @property
    def in_outage(self) -> bool:
        return self._since is not None

    def failed(self, now: float) -> OutageNote | None:
        """A lookup failed at `now`: a note when the outage starts or a repeat is due, else None."""
        self._failures += 1
        if self._since is None:
            self._since = now
            self._interval = self.first_repeat
            self._next_note = now + self._interval
            return OutageNote("started", self._failures, 0.0)
        if now >= self._next_note:
            self._interval = min(self._interval * 2, self.max_interval)
            self._next_note = now + self._interval
            return OutageNote("ongoing", self._failures, now - self._since)
        return None

    def succeeded(self, now: float) -> OutageNote | None:
        """A lookup succeeded at `now`: a note if that ends an outage, else None."""
        if self._since is None:
            return None
        note = OutageNote("ended", self._failures, now - self._since)
        self._since = None
        self._failures = 0
        return note
