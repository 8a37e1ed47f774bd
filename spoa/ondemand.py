"""Services found on demand: a pattern such as `*.apps.example.com tasks.{1}:80` in SWARM_CONFIG_FILE.

Owns: answering fe_main's look-up of a Host the pattern matches and HAProxy's on-demand map does
not hold yet (ondemand.conf: one NOTIFY, answered when done): the Host's label names the service
(`shop.apps.example.com` -> `tasks.shop:80`); if DNS lists members for it and the pattern has a free
backend (one of `max=` HAProxy backends made at start), its `Agent` gets that service (its own
discovery, servers in that backend, decision table), and once it is ready - members UP, table
published - the Host is added to the map and the backend is the answer. Every later request is
decided by HAProxy alone. A service with no member UP for ONDEMAND_FORGET seconds is forgotten: its
Host leaves the map, its backend is free.

Bounded, whatever Hosts clients send: only a Host that matches a pattern, with one DNS label in the
wildcard's place, is ever looked up; at most ONDEMAND_LOOKUPS DNS look-ups per second (a token
bucket), at most MAX_IN_FLIGHT at once; a Host that did not resolve answers 404 from a bounded
cache for ONDEMAND_MISS_TTL seconds; a pattern finds `max=` services at most. So random Hosts grow
neither memory, nor HAProxy's servers, nor DNS traffic beyond those limits (tests/test_ondemand.py).
Must not: route anything itself, or answer a backend other than the one it gave this very Host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from cachetools import TTLCache
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from spoa.agent import AgentServer
from spoa.config import LABEL, Route, ServiceLine, Settings, ondemand_listen, pattern_backends
from spoa.haproxy.runtime import RuntimeAPI
from spoa.haproxy.table import write_atomically
from spoa.haproxy.template import ondemand_map
from spoa.protocol import Message, Scope, encode_set_var

if TYPE_CHECKING:
    from spoa.app import Agent

log = logging.getLogger("spoa.ondemand")

MAX_MISSES = 10_000  # Hosts remembered as not resolving (beyond: the oldest are dropped first)
MAX_IN_FLIGHT = 32  # look-ups waiting for DNS or a backend's readiness at once
READY_TIMEOUT = 4.0  # a found service's first members UP and table published (ondemand.conf: 5 s)
FORGET_INTERVAL = 1.0

NOT_FOUND = encode_set_var(Scope.TRANSACTION, "backend", "none")
OUTCOMES = ("found", "known", "missing", "cached", "limited", "full", "busy", "unready", "invalid")
PREFIX = "haproxy_swarm_"


@dataclass
class PatternBackend:
    """One of a pattern's `max` backends (be_<pattern>_<n>), free or holding one service."""

    settings: Settings  # its own: HAProxy backend, maps, SPOP port; `service` is the pattern's, with {1}
    agent: Agent | None = None
    host: str = ""  # the Host it serves, or is being found for; "" while free
    empty_since: float | None = None  # since when its service has had no members, or no member UP
    published: bool = False  # the Host is in HAProxy's on-demand map

    @property
    def free(self) -> bool:
        """Neither serving, nor being filled, nor being released (claimed synchronously, before any
        await: two look-ups at once never take one backend)."""
        return not self.host

    @property
    def name(self) -> str:
        """The HAProxy backend, be_<pattern>_<n>."""
        return self.settings.haproxy_backend


@dataclass
class Pattern:
    line: ServiceLine
    backends: list[PatternBackend]
    suffix: str = field(init=False)  # `.apps.example.com`

    def __post_init__(self) -> None:
        assert isinstance(self.line.route, Route) and self.line.route.host.startswith("*.")
        self.suffix = self.line.route.host[1:]

    def label(self, host: str) -> str | None:
        """The Host's label in the wildcard's place, if the Host is exactly one label + suffix."""
        if not host.endswith(self.suffix):
            return None
        label = host[:-len(self.suffix)]
        return label if LABEL.fullmatch(label) else None  # (not `match`: `$` passes a trailing newline)


class OnDemand:
    """The look-ups of every pattern of SWARM_CONFIG_FILE, and the backends they fill."""

    def __init__(self, settings: Settings, *, make_agent: Callable[[Settings], Agent],
                 start: Callable[[Agent], Awaitable[None]], stop: Callable[[Agent], Awaitable[None]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`make_agent(settings)`: an Agent for a backend given its service; `start`/`stop`: run its SPOP
        server and control loop (`spoa.app.Agents`), or stop them."""
        self.settings = settings
        self.patterns = [Pattern(line, [PatternBackend(one) for one in backends])
                         for line, backends in pattern_backends(settings)]
        self.make_agent = make_agent
        self.start_agent = start
        self.stop_agent = stop
        self.clock = clock
        self.map_path = ondemand_map(settings)
        self.api = RuntimeAPI(settings.admin_socket)
        self.hosts: dict[str, PatternBackend] = {}
        self.misses: TTLCache[str, bool] = TTLCache(MAX_MISSES, settings.ondemand_miss_ttl, timer=clock)
        self.outcomes: Counter[str] = Counter()
        self._rate = settings.ondemand_lookups
        self._tokens = max(1.0, self._rate)
        self._refilled = clock()
        self._in_flight: dict[str, asyncio.Task[str | None]] = {}
        self.server = AgentServer(ondemand_listen(settings), _no_sync_answer, deferred=self.answer,
                                  max_connections=settings.max_connections)
        self._forgetting: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ the look-up (fe_main)

    async def answer(self, messages: list[Message]) -> bytes:
        host = next((m.args.get("host") for m in messages if m.name == "lookup"), None)
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        backend = await self.lookup(host) if isinstance(host, str) else None
        return encode_set_var(Scope.TRANSACTION, "backend", backend) if backend else NOT_FOUND

    async def lookup(self, host: str) -> str | None:
        """The name of the backend serving `host`, finding its service first if need be; None: 404."""
        host = host.lower().rstrip(".")
        backend = self.hosts.get(host)
        if backend is not None and backend.host == host and backend.agent is not None and host not in self._in_flight:
            ready = backend.agent.ready()[0]
            self.outcomes["known" if ready else "unready"] += 1
            if ready and not backend.published:  # found, but not ready within READY_TIMEOUT back then
                await self._publish(host, backend)
            return backend.name if ready else None
        if host in self.misses:
            self.outcomes["cached"] += 1
            return None
        task = self._in_flight.get(host)
        if task is None:
            found = self._match(host)
            if found is None:
                self.outcomes["invalid"] += 1
                return None
            if len(self._in_flight) >= MAX_IN_FLIGHT:
                self.outcomes["busy"] += 1
                return None
            if not self._take_token():
                self.outcomes["limited"] += 1
                return None
            task = asyncio.get_running_loop().create_task(self._find(host, *found))
            self._in_flight[host] = task
            task.add_done_callback(lambda _: self._in_flight.pop(host, None))
        return await asyncio.shield(task)

    def _match(self, host: str) -> tuple[Pattern, str] | None:
        for pattern in self.patterns:
            label = pattern.label(host)
            if label is not None:
                return pattern, label
        return None

    def _take_token(self) -> bool:
        now = self.clock()
        self._tokens = min(max(1.0, self._rate), self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    async def _find(self, host: str, pattern: Pattern, label: str) -> str | None:
        backend = next((s for s in pattern.backends if s.free), None)
        if backend is None:
            self.outcomes["full"] += 1
            log.warning("%s: pattern %s has found %d services, its max=; %s gets a 404 (raise max= to serve it)",
                        host, pattern.line.route, len(pattern.backends), host)
            return None
        backend.host, backend.empty_since, backend.published = host, None, False  # claimed before the first await
        service = pattern.line.service_for(label)
        agent = self.make_agent(replace(backend.settings, service=service))
        try:
            await agent.discovery.refresh(asyncio.get_running_loop().time())
            if not agent.discovery.members:
                self.outcomes["missing"] += 1
                self.misses[host] = True
                log.info("%s: %s has no members (%s); answering 404 for %gs", host, service,
                         agent.discovery.last_error or "no records", self.settings.ondemand_miss_ttl)
                backend.host = ""
                return None
            backend.agent = agent
            self.hosts[host] = backend
            log.info("%s: found %s with %d members; serving it from %s", host, service,
                     len(agent.discovery.members), backend.name)
            await self.start_agent(agent)
        except BaseException:
            self.hosts.pop(host, None)
            backend.agent, backend.host = None, ""
            with contextlib.suppress(Exception):
                await self.stop_agent(agent)
            raise
        deadline = self.clock() + READY_TIMEOUT
        while not agent.ready()[0]:
            if self.clock() > deadline:
                self.outcomes["unready"] += 1
                log.warning("%s: %s not ready within %gs (%s); asked again on the next request",
                            host, backend.name, READY_TIMEOUT, agent.ready()[1])
                return None
            await asyncio.sleep(0.05)
        await self._publish(host, backend)
        self.outcomes["found"] += 1
        return backend.name

    # ------------------------------------------------------------------ the on-demand map

    async def _publish(self, host: str, backend: PatternBackend) -> None:
        """Add `host -> backend` to HAProxy's on-demand map, and write the file (a reload keeps it)."""
        backend.published = True  # before the await: another request for the Host does not add it twice
        try:
            await self.api.command(f"add map {self.map_path} {host} {backend.name}")
        except BaseException:
            backend.published = False
            raise
        self._write_map()

    def _write_map(self) -> None:
        lines = "".join(f"{host} {backend.name}\n" for host, backend in sorted(self.hosts.items())
                        if backend.host == host and backend.published)
        write_atomically(self.map_path, lines.encode())

    async def adopt(self) -> None:
        """At start: the services found before (the map file HAProxy loaded) keep their backends; a line
        that names no backend of a pattern now (max= lowered, the pattern gone) leaves the map."""
        try:
            text = Path(self.map_path).read_text(encoding="utf-8")
        except OSError:
            return
        by_name = {backend.name: (pattern, backend) for pattern in self.patterns for backend in pattern.backends}
        stale = []
        for line in text.splitlines():
            host, _, name = line.partition(" ")
            found = by_name.get(name.strip())
            label = found[0].label(host) if found else None
            if found is None or label is None or not found[1].free or host in self.hosts:
                stale.append(host)
                continue
            pattern, backend = found
            backend.agent = self.make_agent(replace(backend.settings, service=pattern.line.service_for(label)))
            backend.host, backend.published = host, True  # HAProxy loaded it from the file
            self.hosts[host] = backend
            await self.start_agent(backend.agent)
            log.info("%s: %s again (found before the restart), in %s", host, backend.agent.settings.service,
                     backend.name)
        if stale:
            self._write_map()
            for host in stale:
                with contextlib.suppress(Exception):
                    await self.api.command(f"del map {self.map_path} {host}", check=False)
            log.info("on-demand map: %d line(s) no pattern's backend takes now, removed", len(stale))

    # ------------------------------------------------------------------ forgetting

    async def forget_idle(self) -> None:
        """Forget the services that have had no member UP for ONDEMAND_FORGET seconds (none in DNS,
        or none that passes its health checks: a name that resolves but serves nothing on the
        pattern's port must not hold a backend for ever); such a Host is then a miss for a while."""
        now = self.clock()
        for host, backend in list(self.hosts.items()):
            agent = backend.agent
            if agent is None or backend.host != host or host in self._in_flight:
                continue
            if agent.discovery.members and agent.router.up:
                backend.empty_since = None
                continue
            if backend.empty_since is None:
                backend.empty_since = now
            elif now - backend.empty_since >= self.settings.ondemand_forget:
                self.misses[host] = True
                await self.release(host)

    async def release(self, host: str) -> None:
        """Take the service out of its backend; the backend stays claimed until all of it is undone."""
        backend = self.hosts.pop(host)
        agent = backend.agent
        backend.published = False
        self._write_map()
        with contextlib.suppress(Exception):  # HAProxy away: the file no longer holds it either
            await self.api.command(f"del map {self.map_path} {host}", check=False)
        if agent is not None:
            await self.stop_agent(agent)
            for member in await agent.writer.held() or ():
                for command in (f"disable server {backend.name}/{member.server_name}",
                                f"shutdown sessions server {backend.name}/{member.server_name}",
                                f"del server {backend.name}/{member.server_name}"):
                    with contextlib.suppress(Exception):
                        await self.api.command(command, check=False)
        for path in (backend.settings.slot_map, backend.settings.cookie_map, backend.settings.server_cookie_map):
            with contextlib.suppress(Exception):
                await self.api.command(f"clear map {path}", check=False)
            with contextlib.suppress(OSError):
                Path(path).write_text("")
        backend.agent, backend.host, backend.empty_since = None, "", None  # free again, now
        log.info("%s: forgotten after %gs without a member UP; %s is free", host, self.settings.ondemand_forget,
                 backend.name)

    async def _forget_loop(self) -> None:
        while True:
            await asyncio.sleep(FORGET_INTERVAL)
            try:
                await self.forget_idle()
            except Exception:
                log.exception("forgetting idle services failed; retrying")

    # ------------------------------------------------------------------ lifecycle

    @property
    def agents(self) -> list[Agent]:
        return [backend.agent for pattern in self.patterns for backend in pattern.backends if backend.agent is not None]

    async def start(self) -> None:
        await self.server.start()
        await self.adopt()
        self._forgetting = asyncio.get_running_loop().create_task(self._forget_loop(), name="on-demand forget")

    async def close(self) -> None:
        self.server.close()
        if self._forgetting is not None:
            self._forgetting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._forgetting
        for task in list(self._in_flight.values()):
            task.cancel()

    # ------------------------------------------------------------------ metrics

    def collect(self) -> Iterator[Metric]:
        lookups = CounterMetricFamily(PREFIX + "ondemand_lookups", "Look-ups of Hosts a pattern matches that "
                                      "HAProxy's on-demand map did not hold, by outcome: found (a service, now in a "
                                      "backend), known, missing (no members in DNS), cached (missing a moment ago), "
                                      "limited (ONDEMAND_LOOKUPS), full (the pattern's max=), busy, unready, invalid "
                                      "(no pattern's shape).", labels=["outcome"])
        for outcome in OUTCOMES:
            lookups.add_metric([outcome], self.outcomes.get(outcome, 0))
        yield lookups
        services = GaugeMetricFamily(PREFIX + "ondemand_services", "Services found on demand now, and the "
                                     "pattern's max=.", labels=["pattern", "state"])
        for pattern in self.patterns:
            route = str(pattern.line.route)
            services.add_metric([route, "found"], sum(1 for s in pattern.backends if s.host and s.agent is not None))
            services.add_metric([route, "max"], len(pattern.backends))
        yield services
        misses = GaugeMetricFamily(PREFIX + "ondemand_misses", "Hosts remembered as not resolving (bounded).")
        misses.add_metric([], len(self.misses))
        yield misses


def _no_sync_answer(messages: list[Message]) -> bytes:
    raise AssertionError("the on-demand server answers through its deferred handler")


__all__ = ["OnDemand", "Pattern", "PatternBackend"]
