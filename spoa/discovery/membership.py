"""The members of the service over time: the rules that damp a flaky DNS (sans-I/O, time injected).

Owns: the current member set, when each absent member was first found missing, and the changes
(added / removed) each observation causes. The rules:

- a failed or timed-out lookup changes nothing (the last known members stay);
- a member in an answer is a member at once (new members join at once; a member that was missing
  and comes back before its grace ends simply stays);
- a member missing from an answer is removed only once it has been missing for `grace` seconds,
  counted from the first answer that lacked it; failed lookups in between do not reset that clock;
- NXDOMAIN and an empty answer are answers that lack every member: like a failure until the grace
  ends, then the members go;
- a partial answer (one address family answered, the other failed) speaks only for the family that
  answered: the other family's members are kept as on a failed lookup (not removed, no grace clock
  started, a clock already running keeps running);
- members are a set: the order of records never matters;
- before the first answer, members known from elsewhere (the servers a previous agent wrote into
  HAProxy) can be adopted: they are then members like those of an answer, so a DNS outage at start
  keeps them, and a first answer that lacks some starts their grace instead of removing them.

Must not: do I/O, read clocks (every method takes `now`, seconds on any monotonic scale), log, or
know about DNS record types.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from spoa.member import Member

_EMPTY: frozenset[Member] = frozenset()


def _numeric(member: Member) -> tuple[int, int, int]:
    """Sort key: IPv4 before IPv6, then numeric address order, then port (10.0.0.2 < 10.0.0.10)."""
    addr = ipaddress.ip_address(member.ip)
    return (addr.version, int(addr), member.port)


@dataclass(frozen=True, slots=True)
class Change:
    """The members after one observation, and what that observation added and removed."""

    members: frozenset[Member]
    added: frozenset[Member] = _EMPTY
    removed: frozenset[Member] = _EMPTY

    def __bool__(self) -> bool:
        """True when the observation changed the member set."""
        return bool(self.added or self.removed)

    def describe(self, limit: int = 8) -> str:
        """`added 10.0.0.5:80; removed 10.0.0.3:80`, at most `limit` addresses per list."""
        parts = []
        for verb, members in (("added", self.added), ("removed", self.removed)):
            if members:
                shown = ", ".join(str(m) for m in sorted(members, key=_numeric)[:limit])
                more = f" and {len(members) - limit} more" if len(members) > limit else ""
                parts.append(f"{verb} {shown}{more}")
        return "; ".join(parts) or "no change"


class Membership:
    """Tracks one service's members from successive lookups."""

    def __init__(self, grace: float, members: Iterable[Member] = ()) -> None:
        """`grace`: seconds a member may be missing from answers before it is removed (>= 0)."""
        if grace < 0:
            raise ValueError(f"grace must be >= 0 seconds, got {grace!r}")
        self.grace = grace
        self._members: frozenset[Member] = frozenset(members)
        self._missing_since: dict[Member, float] = {}
        self.last_answer: float | None = None  # `now` of the last answer (ok, empty or NXDOMAIN)

    @property
    def members(self) -> frozenset[Member]:
        return self._members

    @property
    def missing(self) -> Mapping[Member, float]:
        """Members still kept although the last answers lacked them → when first found missing."""
        return MappingProxyType(self._missing_since)

    def removal_due(self) -> float | None:
        """The earliest `now` at which an answer that still lacks a missing member removes it."""
        if not self._missing_since:
            return None
        return min(self._missing_since.values()) + self.grace

    def answer(self, members: Iterable[Member], now: float, *,
               unanswered_ipv4: bool = False, unanswered_ipv6: bool = False) -> Change:
        """A successful lookup named exactly `members` (an empty set for NOERROR without records).

        `unanswered_ipv4`/`unanswered_ipv6`: that family's question failed, so the answer says nothing
        about its members: they stay as on a failed lookup (members it did name still count)."""
        seen = frozenset(members)
        self.last_answer = now
        added = seen - self._members
        for member in seen:
            self._missing_since.pop(member, None)
        removed: set[Member] = set()
        for member in self._members - seen:
            if (unanswered_ipv6 if member.is_ipv6 else unanswered_ipv4):
                continue
            since = self._missing_since.setdefault(member, now)
            if now - since >= self.grace:
                removed.add(member)
                del self._missing_since[member]
        if added or removed:
            self._members = (self._members | added) - removed
        return Change(self._members, added, frozenset(removed))

    def adopt(self, members: Iterable[Member]) -> Change:
        """Members known before any answer (what HAProxy still routes to after an agent restart).
        Ignored once an answer came: from then on only answers say who is a member."""
        if self.last_answer is not None:
            return Change(self._members)
        added = frozenset(members) - self._members
        self._members |= added
        return Change(self._members, added)

    def nxdomain(self, now: float) -> Change:
        """The name does not exist: an answer that lacks every member."""
        return self.answer(_EMPTY, now)

    def failure(self, now: float) -> Change:
        """A failed or timed-out lookup: the last known members stay, pending removals wait."""
        del now  # nothing depends on when a lookup failed; kept for a uniform signature
        return Change(self._members)
