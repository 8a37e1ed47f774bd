"""The router: one decision per NOTIFY, computed from the key chain against the current ring.

The hot path (`Router.actions`) does a few dict lookups, one hash and one ring lookup, and returns
bytes that were encoded when the members last changed. Counters are plain integers, read by the
metrics collector at scrape time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import itertools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from zlib import crc32

from cachetools import TTLCache

from spoa import config
from spoa.config import KeySource, Settings
from spoa.member import Member
from spoa.protocol import Scope, encode_set_var
from spoa.ring import Ring
from spoa.ring.hashing import SLOT_SHIFT

# Where a decision came from; the index is the position in the counters and in Target.actions.
SOURCES: tuple[str, ...] = ("cookie", "header", "param", "src", "new", "none")
COOKIE, HEADER, PARAM, SRC, NEW, NONE = range(len(SOURCES))

# The NOTIFY argument carrying each kind of key (see spoe.conf).
_ARG_FOR_KIND = {"cookie": "cookie", "header": "header", "param": "param", "src": "src"}
_SOURCE_FOR_KIND = {"cookie": COOKIE, "header": HEADER, "param": PARAM, "src": SRC}

# Hostile clients may send huge keys; hashing a bounded prefix keeps the cost flat and still
# spreads keys (two keys that share their first KEY_LIMIT bytes simply go to the same member).
# haproxy.cfg hashes the same prefix (`bytes(0,1024)`, from Settings.chain_env).
KEY_LIMIT = config.KEY_LIMIT
# A cookie value we issued is exactly this many hex characters.
COOKIE_VALUE_LENGTH = 20


def cookie_value(member: Member, secret: str) -> str:
    """The sticky cookie's value for a member: opaque, stable, the same on every replica."""
    digest = hmac.new(secret.encode(), member.key, hashlib.sha256).hexdigest()
    return digest[:COOKIE_VALUE_LENGTH]


_IPV4 = ipaddress.IPv4Address
_BUFFERS = (bytes, bytearray, memoryview)
_ADDRESSES = (ipaddress.IPv4Address, ipaddress.IPv6Address)


def key_bytes(value: Any) -> bytes | None:
    """A NOTIFY argument as hashable key bytes, or None when the sample is missing or empty."""
    kind = type(value)
    if kind is _IPV4:  # src: the most common key
        packed: bytes = value.packed
        return packed
    if kind is bytes:
        return value[:KEY_LIMIT] or None
    if value is None or value is False:
        return None
    if isinstance(value, _BUFFERS):
        b = bytes(value[:KEY_LIMIT])
    elif isinstance(value, str):
        b = value[:KEY_LIMIT].encode("utf-8", "surrogateescape")
    elif isinstance(value, _ADDRESSES):
        b = value.packed
    else:
        b = str(value).encode()
    return b or None


@dataclass(frozen=True, slots=True)
class Decision:
    """What the router decided for one request (the hot path returns its encoded form instead)."""

    member: Member | None
    source: str
    set_cookie: str | None = None


class Target:
    """A member that can receive requests, with every ACK it may need pre-encoded."""

    __slots__ = ("cookie", "issue", "issue_secure", "member", "plain", "set_cookie", "set_cookie_secure")

    def __init__(self, member: Member, cookie: str, set_cookie: str) -> None:
        self.member = member
        self.cookie = cookie
        self.set_cookie = set_cookie
        self.set_cookie_secure = set_cookie + "; Secure"
        base = (encode_set_var(Scope.TRANSACTION, "server", member.server_name)
                + encode_set_var(Scope.TRANSACTION, "addr", member.address))
        tags = [encode_set_var(Scope.TRANSACTION, "source", s) for s in SOURCES]
        self.plain = tuple(base + tag for tag in tags)
        self.issue = tuple(base + tag + encode_set_var(Scope.TRANSACTION, "set_cookie", self.set_cookie)
                           for tag in tags)
        self.issue_secure = tuple(
            base + tag + encode_set_var(Scope.TRANSACTION, "set_cookie", self.set_cookie_secure) for tag in tags)


NO_DECISION = encode_set_var(Scope.TRANSACTION, "source", "none")


class Router:
    """Decides the target of each request from the key chain, over the members that are UP.

    `update(members)` swaps in a new ring when membership or health changes; the agent calls it from
    its control loop. The event loop is single-threaded, so a swap is atomic for the hot path.
    """

    def __init__(self, settings: Settings, members: Iterable[Member] = ()) -> None:
        self.chain: tuple[KeySource, ...] = settings.sticky_key
        self.cookie_name = settings.sticky_cookie
        self.secret = settings.cookie_secret
        self.issues_cookie = settings.issues_cookie
        self.cookie_first = settings.cookie_first
        self.cookie_map_used = settings.cookie_map_used
        self._cookie_attrs = settings.cookie_attributes
        # The chain as (argument name, source index, issues the cookie), the sticky cookie where it
        # stands. A key before the sticky cookie decides whether or not a cookie is present, so a
        # decision of it issues none (the cookie would pin the client where that key may not).
        sticky_at = next((i for i, s in enumerate(self.chain)
                          if s.kind == "cookie" and s.name == self.cookie_name), len(self.chain))
        self._steps: tuple[tuple[str, int, bool], ...] = tuple(
            ("sticky", COOKIE, False) if i == sticky_at
            else (_ARG_FOR_KIND[s.kind], _SOURCE_FOR_KIND[s.kind], i > sticky_at)
            for i, s in enumerate(self.chain)
        )
        # Counters, indexed by source; read by metrics at scrape time.
        self.decisions = [0] * len(SOURCES)
        self.cookies_issued = 0
        self.cookies_rerouted = 0  # a cookie whose member left the service
        self.cookies_invalid = 0  # a cookie we never issued (or from another secret)
        # Cookie values of members that left recently: a returning user is "re-routed", not "invalid".
        self._gone: TTLCache[str, Member] = TTLCache(maxsize=65536, ttl=7 * 86400)
        self._round_robin = itertools.count()
        self.members: frozenset[Member] = frozenset()
        self.up: frozenset[Member] = frozenset()
        self.ring = Ring(())
        self.fallback = self.ring
        self._targets: dict[Member, Target] = {}
        self._by_cookie: dict[str, Member] = {}
        self._cookie_of: dict[Member, str] = {}
        self._target_list: Sequence[Target] = ()
        self._slots: tuple[Target, ...] = ()
        self._table: tuple[tuple[str, ...], dict[str, str]] | None = None
        self.update(members)

    # ------------------------------------------------------------------ control path

    def cookie_value(self, member: Member) -> str:
        return self._cookie_of.get(member) or cookie_value(member, self.secret)

    def update(self, members: Iterable[Member], up: Iterable[Member] | None = None,
               ring: Ring | None = None, fallback: Ring | None = None) -> None:
        """Set the service's members, and which of them HAProxy reports UP (default: all).

        Two rings: `ring` over every member, and while some member is not UP, `fallback` over the
        members that are. A key whose member is UP keeps it, so a health flap moves no other key;
        a key whose member is not UP goes where it will go if that member is removed for good, so a
        scale-down moves each of its sessions once. Pass the rings when they were built elsewhere
        (off the event loop); they are built here otherwise.
        """
        members = frozenset(members)
        up_set = members if up is None else frozenset(up) & members
        if members != self.members:
            for gone in self.members - members:
                self._gone[self._cookie_of[gone]] = gone
            self._cookie_of = {m: self._cookie_of.get(m) or cookie_value(m, self.secret) for m in members}
            # Cookie values of every member, UP or not: a cookie naming a DOWN member is served
            # elsewhere meanwhile but not re-issued, so its user returns to it once it is UP again.
            self._by_cookie = {value: m for m, value in self._cookie_of.items()}
            for value in self._by_cookie:
                self._gone.pop(value, None)
            self.ring = ring if ring is not None and frozenset(ring.members) == members else Ring(members)
        if up_set != self.up or members != self.members:
            self._targets = {m: self._targets.get(m) or self._make_target(m) for m in up_set}
            self._target_list = sorted(self._targets.values(), key=lambda t: t.member)
            if up_set == members:
                self.fallback = self.ring
            elif fallback is not None and frozenset(fallback.members) == up_set:
                self.fallback = fallback
            else:
                self.fallback = Ring(up_set)
            self._slots = self._slot_targets()
            self._table = None
        self.members = members
        self.up = up_set

    def decision_table(self) -> tuple[tuple[str, ...], dict[str, str]] | None:
        """The decision function written out for HAProxy: (the server name of every table slot, the
        sticky cookie value of every member's server). The slots are () while no member is UP:
        nothing to name; None when there are no members at all. A key's decision is
        `slots[slot_of(key)]`, exactly what `actions` answers for it; built once per membership or
        health change (~3 ms), then the same objects until the next."""
        if not self.members:
            return None
        if self._table is None:
            names = {id(t): t.member.server_name for t in self._targets.values()}
            slots = tuple(map(names.__getitem__, map(id, self._slots)))
            self._table = (slots, {m.server_name: value for m, value in self._cookie_of.items()})
        return self._table

    def _slot_targets(self) -> tuple[Target, ...]:
        """The target of every table slot: the ring's member if it is UP, else the fallback ring's.
        The hot path then indexes one tuple by the key's hash. A few ms per membership or health
        change; the table entries are the rings' own member objects, so they are looked up by id."""
        targets = self._targets
        if not targets:
            return ()
        ring, fallback = self.ring, self.fallback
        on_ring = {id(m): targets.get(m) for m in ring.members}
        if fallback is ring:
            return tuple(map(on_ring.__getitem__, map(id, ring.table)))  # type: ignore[arg-type]
        on_fallback = {id(m): targets[m] for m in fallback.members}
        return tuple([on_ring[id(m)] or on_fallback[id(f)] for m, f in zip(ring.table, fallback.table, strict=True)])

    def _make_target(self, member: Member) -> Target:
        value = self._cookie_of[member]
        return Target(member, value, f"{self.cookie_name}={value}{self._cookie_attrs}")

    def shares(self) -> dict[Member, float]:
        """Each member's share of the keys: 0 when it is not UP (its keys go the fallback ring's way).
        Counted over the per-slot targets by identity, at C speed: ~5 ms for 2^16 slots where hashing
        each slot's Member took 26-31 ms, on the event loop, at the first scrape after every change."""
        slots = self._slots
        if not slots:
            return dict.fromkeys(self.members, 0.0)
        counts = Counter(map(id, slots))
        targets = self._targets
        size = len(slots)
        return {m: counts[id(targets[m])] / size if m in targets else 0.0 for m in self.members}

    def cookie_map(self) -> dict[str, str]:
        """Cookie value → server name for the members that are UP: the map HAProxy routes with (empty
        unless HAProxy uses it: `Settings.cookie_map_used`)."""
        if not self.cookie_map_used:
            return {}
        return {t.cookie: t.member.server_name for t in self._targets.values()}

    # ------------------------------------------------------------------ hot path

    def actions(self, args: Mapping[str, Any]) -> bytes:
        """The ACK actions for one `route` message's arguments."""
        target, source, issue = self._decide(args)
        if target is None:
            self.decisions[NONE] += 1
            return NO_DECISION
        self.decisions[source] += 1
        if issue:
            self.cookies_issued += 1
            return (target.issue_secure if args.get("ssl") else target.issue)[source]
        return target.plain[source]

    def decide(self, args: Mapping[str, Any]) -> Decision:
        """The same decision as `actions`, as an object (for tests, `status` and debugging)."""
        target, source, issue = self._decide(args)
        if target is None:
            return Decision(None, SOURCES[NONE])
        set_cookie = None
        if issue:
            set_cookie = target.set_cookie_secure if args.get("ssl") else target.set_cookie
        return Decision(target.member, SOURCES[source], set_cookie)

    def _decide(self, args: Mapping[str, Any]) -> tuple[Target | None, int, bool]:
        targets = self._targets
        if not targets:
            return None, NONE, False
        issue = self.issues_cookie
        for arg, source, issues in self._steps:
            value = args.get(arg)
            if value is None:
                continue
            if arg == "sticky":
                if not isinstance(value, bytes | str) or len(value) != COOKIE_VALUE_LENGTH:
                    # Not one we issued; nothing more to read.
                    if value:
                        self.cookies_invalid += 1
                    continue
                text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
                known = self._by_cookie.get(text)
                if known is not None:
                    target = targets.get(known)
                    if target is not None:
                        return target, COOKIE, False
                    # Its member is not UP: serve elsewhere, keep the cookie for when it is back.
                    issue = False
                elif text in self._gone:
                    self.cookies_rerouted += 1
                else:
                    self.cookies_invalid += 1
                continue
            key = key_bytes(value)
            if key is None:
                continue
            # The ring's member if it is UP; if not, where the key goes once that member leaves.
            return self._slots[crc32(key) >> SLOT_SHIFT], source, issue and issues
        # Nothing in the chain: spread new sessions over every UP member.
        target = self._target_list[next(self._round_robin) % len(self._target_list)]
        return target, NEW, issue

    def handle(self, messages: Sequence[Any]) -> bytes:
        """The agent's handler: the actions for the `route` message of a NOTIFY."""
        for message in messages:
            if message.name == "route":
                return self.actions(message.args)
        self.decisions[NONE] += 1
        return NO_DECISION
