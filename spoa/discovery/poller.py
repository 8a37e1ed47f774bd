"""Discovery of one service: polls DNS, applies the membership rules, reports member changes.

Owns: the poll loop (every `refresh` seconds, TTLs ignored), turning each lookup's outcome into a
membership step, delivering member changes to one callback (again at the next poll if the callback
raised), logging (changes when they happen; DNS outages, and an address family that fails while
the other answers, once when they start, rarely while they last, once when they end) and reporting
each lookup to an optional observer for metrics.

Must not: raise out of the loop because of DNS or the callback, build the ring or talk to HAProxy
(the callback does), or hold state for more than one service.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from spoa.config import Settings
from spoa.discovery.membership import Change, Membership
from spoa.discovery.outage import OutageLog, OutageNote
from spoa.discovery.resolver import Answer, Outcome, ResolveError, Resolver
from spoa.member import Member

#: on_change(members, added, removed); may be a plain function or a coroutine function.
OnChange = Callable[[frozenset[Member], frozenset[Member], frozenset[Member]], Awaitable[None] | None]

_log = logging.getLogger("spoa.discovery")


class DiscoveryObserver(Protocol):
    """Receives every lookup (for metrics). Called in the event loop; must not block."""

    def dns_lookup(self, outcome: Outcome, seconds: float, truncated: bool) -> None: ...


class Discovery:
    """Owns the resolver and the membership of one service."""

    def __init__(
        self,
        resolver: Resolver,
        membership: Membership,
        *,
        interval: float,
        observer: DiscoveryObserver | None = None,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
        outage_log: OutageLog | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
        self.resolver = resolver
        self.membership = membership
        self.interval = interval
        self.observer = observer
        self.log = logger or _log
        self.outage = outage_log or OutageLog()
        #: a family failing while another answers (partial answers): its own log schedule
        self.family_outage = OutageLog(self.outage.first_repeat, self.outage.max_interval)
        #: "A"/"AAAA" → why its question failed at the last lookup that got an answer
        self.failing_families: dict[str, str] = {}
        self.name = str(resolver.service)
        self.last_outcome: Outcome | None = None
        self.last_error: str | None = None
        self.lookups = 0
        self._delivered: frozenset[Member] = frozenset()

    @classmethod
    def from_settings(cls, settings: Settings, *, observer: DiscoveryObserver | None = None,
                      logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None) -> Discovery:
        return cls(Resolver.from_settings(settings), Membership(settings.member_grace),
                   interval=settings.refresh, observer=observer, logger=logger)

    @property
    def members(self) -> frozenset[Member]:
        return self.membership.members

    @property
    def ready(self) -> bool:
        """True once a lookup has answered (even with no members)."""
        return self.membership.last_answer is not None

    def adopt(self, members: frozenset[Member]) -> Change:
        """Adopt members known before DNS has answered (see `Membership.adopt`), and say so."""
        change = self.membership.adopt(members)
        if change:
            self.log.info("DNS %s: no answer yet; kept the %d members HAProxy already routes to (%s)",
                          self.name, len(change.members), change.describe())
        return change

    async def refresh(self, now: float) -> Change:
        """One poll at `now` (seconds, monotonic): look up, apply the rules, log. Never raises on DNS."""
        started = time.perf_counter() if self.observer is not None else 0.0
        truncated = False
        result: Answer | ResolveError
        try:
            result = await self.resolver.resolve()
            truncated = result.truncated
        except ResolveError as e:
            result = e
            truncated = e.truncated
        except Exception as e:  # a library surprise must not stop discovery; log it with its trace
            result = ResolveError(f"unexpected {type(e).__name__}: {e}")
            if not self.outage.in_outage:
                self.log.exception("DNS %s: unexpected error", self.name)
        self.lookups += 1
        self.last_outcome = result.outcome
        if self.observer is not None:
            self.observer.dns_lookup(result.outcome, time.perf_counter() - started, truncated)

        if isinstance(result, Answer):
            change = self.membership.answer(result.members, now, unanswered_ipv4=result.unanswered_ipv4,
                                            unanswered_ipv6=result.unanswered_ipv6)
            self._families(now, result)
            if result.members or not change.members:
                self.last_error = None
                self._outage_ended(now)
            else:  # an empty answer while members are kept: a problem until the grace ends
                self._failed(now, "answered with no records")
            if result.ignored:
                self.log.debug("DNS %s: ignored %d records that are not member addresses",
                               self.name, result.ignored)
        else:
            if result.outcome is Outcome.NXDOMAIN:
                change = self.membership.nxdomain(now)
            else:
                change = self.membership.failure(now)
            self._failed(now, f"{result.outcome}: {result.message}")
        if change:
            self.log.info("DNS %s: %d members (%s)", self.name, len(change.members), change.describe())
        return change

    async def run(self, on_change: OnChange | None = None) -> None:
        """Poll every `interval` seconds until cancelled, calling `on_change` when the members differ
        from what it was last given successfully (so a callback that raised is called again)."""
        loop = asyncio.get_running_loop()
        next_poll = loop.time()
        while True:
            await self.refresh(loop.time())
            if on_change is not None:
                await self.deliver(on_change)
            next_poll = max(next_poll + self.interval, loop.time())
            await asyncio.sleep(next_poll - loop.time())

    async def deliver(self, on_change: OnChange) -> bool:
        """Give `on_change` the members if they differ from the last delivery; False if it raised."""
        members = self.membership.members
        if members == self._delivered:
            return True
        added, removed = members - self._delivered, self._delivered - members
        try:
            result = on_change(members, added, removed)
            if inspect.isawaitable(result):
                await result
        except Exception:
            self.log.exception("DNS %s: member change callback failed; will retry at the next poll",
                               self.name)
            return False
        self._delivered = members
        return True

    # ------------------------------------------------------------------ logging

    def _families(self, now: float, answer: Answer) -> None:
        """Log a family that fails while another answers: once, then with back-off, then its end."""
        self.failing_families = dict(answer.failed)
        if answer.failed:
            note = self.family_outage.failed(now)
            if note is None:
                return
            families = " and ".join(family for family, _ in answer.failed)
            kinds = " and ".join({"A": "IPv4", "AAAA": "IPv6"}.get(f, f) for f, _ in answer.failed)
            why = "; ".join(message for _, message in answer.failed)
            kept = sum(1 for m in self.membership.members
                       if (answer.unanswered_ipv6 if m.is_ipv6 else answer.unanswered_ipv4))
            if note.kind == "started":
                self.log.warning("DNS %s: %s lookup failed (%s); using the other family's answer, keeping "
                                 "the %d %s members", self.name, families, why, kept, kinds)
            else:
                self.log.warning("DNS %s: %s still failing after %.0f s and %d lookups (last: %s); keeping "
                                 "the %d %s members", self.name, families, note.duration, note.failures, why,
                                 kept, kinds)
        else:
            note = self.family_outage.succeeded(now)
            if note is not None:
                self.log.info("DNS %s: every address family answers again after %.0f s and %d partial "
                              "answers", self.name, note.duration, note.failures)

    def _failed(self, now: float, message: str) -> None:
        self.last_error = message
        note = self.outage.failed(now)
        if note is not None:
            self._log_note(note, message)

    def _outage_ended(self, now: float) -> None:
        note = self.outage.succeeded(now)
        if note is not None:
            self._log_note(note, "")

    def _log_note(self, note: OutageNote, message: str) -> None:
        kept = len(self.membership.members)
        if note.kind == "started":
            self.log.warning("DNS %s: lookup failed: %s; keeping %d members", self.name, message, kept)
        elif note.kind == "ongoing":
            self.log.warning("DNS %s: still failing after %.0f s and %d lookups (last: %s); keeping %d members",
                             self.name, note.duration, note.failures, message, kept)
        else:
            self.log.info("DNS %s: answering again after %.0f s and %d failed lookups; %d members",
                          self.name, note.duration, note.failures, kept)
