"""Membership from DNS: which tasks the service has right now, damped against a flaky DNS.

Layers: `resolver` (I/O: one lookup → members or an outcome error), `membership` (sans-I/O rules over
time: grace before removal, failures keep members), `outage` (sans-I/O: when to log an outage) and
`poller` (`Discovery`: the poll loop that ties them together and reports changes to a callback).
Must not: build the ring or talk to HAProxy; the agent wires `Discovery.run(on_change)` to those.
"""

from spoa.discovery.membership import Change, Membership
from spoa.discovery.outage import OutageLog, OutageNote
from spoa.discovery.poller import Discovery, DiscoveryObserver, OnChange
from spoa.discovery.resolver import (
    Answer,
    NXDomain,
    Outcome,
    QueryFailed,
    QueryTimeout,
    ResolveError,
    Resolver,
)

__all__ = [
    "Answer",
    "Change",
    "Discovery",
    "DiscoveryObserver",
    "Membership",
    "NXDomain",
    "OnChange",
    "OutageLog",
    "OutageNote",
    "Outcome",
    "QueryFailed",
    "QueryTimeout",
    "ResolveError",
    "Resolver",
]
