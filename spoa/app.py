"""The agent process: the SPOE server, DNS discovery, the HAProxy writer and metrics, wired together.

Owns: the one object that holds the agent's state (no globals), its control loop and its lifecycle.
The control loop steps every `HEALTH_INTERVAL` (0.5 s; sooner when the writer asks) and polls DNS
every `DNS_REFRESH` seconds: DNS → members; members → HAProxy servers (the writer reconciles and
reports which servers are UP); UP members → the router's rings. So a member HAProxy marks DOWN
leaves the ring within half a second, whatever the DNS interval. Before the first DNS answer the
members are the servers HAProxy already holds (an agent restarted during a DNS outage).

With DECIDE=table the router's decision table is published into HAProxy (spoa.haproxy.table) twice
per step when it changed: before the writer acts (a leaving or DOWN member leaves the table before
its server is drained) and after (a member enabled in this step joins it, now that its server is
UP). No slot is published while no member is UP, so a restarted agent never replaces HAProxy's
table with an empty one; HAProxy keeps deciding from the table it holds. The server -> cookie map
(either DECIDE, when the chain names the sticky cookie) holds every member, UP or not, so it is
in HAProxy before the member's server is enabled.
With several services in SWARM_CONFIG_FILE (`Agents`) the process runs one `Agent` per service,
each with its own discovery, router, backend, maps, SPOP port and control loop, and one metrics
server for all of them; nothing on the per-request path knows there are others (each service's
SPOE engine in HAProxy talks to its own port, so no request is dispatched).
Must not: sit on the per-request path (that is `Router.handle`, called by the SPOE server).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from spoa.acme import Certificates
from spoa.agent import AgentServer
from spoa.agent.loop import install_signal_handlers
from spoa.config import Settings, service_settings
from spoa.discovery import Discovery
from spoa.haproxy import HAProxyWriter
from spoa.haproxy.counters import COUNTS_TABLE, parse_counts, split_counts
from spoa.haproxy.runtime import RuntimeAPI
from spoa.haproxy.table import DecisionTable, TablePublisher
from spoa.logs import ServiceLog
from spoa.member import Member
from spoa.metrics import Metrics, MetricsServer, ServicesMetrics
from spoa.ondemand import OnDemand
from spoa.ring import Ring
from spoa.routing import Router

log = logging.getLogger("spoa.app")

# How often HAProxy's view (server health) is read back, at most; DNS is polled every DNS_REFRESH.
HEALTH_INTERVAL = 0.5


class Agent:
    def __init__(self, settings: Settings, *, serve_metrics: bool = True) -> None:
        """`serve_metrics=False`: one of several services; `Agents` serves the metrics of all."""
        self.settings = settings
        # Its lines (the HAProxy writer's among them) and its discovery's carry the service's name.
        self.log = ServiceLog(log, str(settings.service), settings.service_name)
        self.router = Router(settings)
        self.metrics = Metrics(self)
        self.discovery = Discovery.from_settings(settings, observer=self.metrics, logger=ServiceLog(
            logging.getLogger("spoa.discovery"), str(settings.service), settings.service_name))
        self.writer = HAProxyWriter.from_settings(
            settings, cookie_value=self.router.cookie_value if settings.cookie_map_used else None,
            observer=self.metrics)
        # The decision table HAProxy decides from (DECIDE=table), and the server -> cookie map a
        # decision that issues the sticky cookie sets the cookie from (either DECIDE).
        self.api = RuntimeAPI(settings.admin_socket, observer=self.metrics)
        self.table: TablePublisher | None = None
        slot_map = settings.slot_map if settings.slots_used else None
        cookie_map = settings.server_cookie_map if settings.issues_cookie else None
        if slot_map is not None or cookie_map is not None:
            self.table = TablePublisher(self.api, slot_map, cookie_map)
        self.haproxy_reachable = False
        self._adopted = False  # HAProxy's servers were read before DNS answered (or DNS answered first)
        self._last_errors: tuple[str, ...] = ()
        self.server = AgentServer(settings.listen, self.router.handle,
                                  max_connections=settings.max_connections, observer=self.metrics)
        self.metrics_server = MetricsServer(settings.metrics_listen, self.metrics, ready=self.ready,
                                            before_scrape=self.read_haproxy_decisions) if serve_metrics else None
        # TLS_CERT and ACME's certificates kept current in HAProxy (the process's, not a service's).
        self.certificates = certificates(settings, self.metrics_server) if serve_metrics else None
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------------ state

    def ready(self) -> tuple[bool, str]:
        """/readyz: the service has members and the HAProxy socket answers."""
        if not self.discovery.members:
            return False, f"no members for {self.settings.service} yet"
        if not self.haproxy_reachable:
            return False, f"HAProxy socket {self.settings.admin_socket} does not answer"
        if self.table is not None:  # the slots HAProxy decides keys by, the cookies a first visit gets
            if not self.router.up:
                return False, f"none of {len(self.discovery.members)} members is up yet"
            table = self.router.decision_table()
            if table is None or self.table.published is None or not self.table.is_current(DecisionTable(*table)):
                return False, "the decision table is not published yet"
        return True, f"{len(self.router.up)} of {len(self.discovery.members)} members up"

    # ------------------------------------------------------------------ control loop

    async def step(self, now: float, poll_dns: bool) -> float | None:
        """One control step; returns how soon stepping again would help (a pending member), if sooner."""
        if not self._adopted and not self.discovery.ready:
            # Restarted while HAProxy kept serving: its servers are the last known members. Adopted
            # before the first DNS answer, a DNS outage (or a partial first answer) empties nothing.
            held = await self.writer.held()
            if held is None:
                if poll_dns:
                    await self.discovery.refresh(now)
                return None  # no members to write before we know what HAProxy holds
            self._adopted = True
            self.discovery.adopt(held)
        if poll_dns:
            await self.discovery.refresh(now)
        members = self.discovery.members
        self.metrics.members_changed(members)
        if members != self.router.members:
            # The router lets go of a leaving member before HAProxy is told to drain it, so no
            # decision names a server HAProxy will not use.
            await self._update_router(members, self.router.up & members)
            await self.publish_table()
        report = await self.writer.step(members, now, frozenset(self.discovery.membership.missing))
        self.metrics.haproxy_step(report)
        if report.reachable != self.haproxy_reachable:
            if report.reachable:
                self.log.info("HAProxy admin socket %s answers", self.settings.admin_socket)
            else:
                self.log.warning("HAProxy admin socket %s: %s; routing on the last known health",
                                 self.settings.admin_socket, "; ".join(report.errors))
            self.haproxy_reachable = report.reachable
        # Errors that repeat every step are logged once, when they first appear.
        if report.events or (report.errors and report.reachable and report.errors != self._last_errors):
            self.log.info("HAProxy %s: %s", self.settings.haproxy_backend, report)
        self._last_errors = report.errors
        await self._update_router(members, report.up & members)
        if report.reachable:
            if report.reloaded and self.table is not None:
                self.table.forget()  # the new worker loaded the files: make sure they hold the table
            await self.publish_table()
        return report.retry_after

    async def read_haproxy_decisions(self) -> None:
        """Add the decisions HAProxy made itself since the last scrape to the metrics (one
        `show table` on the admin socket; spoa.haproxy.counters). Raises on socket trouble."""
        answer = await self.api.command(f"show table {COUNTS_TABLE}")
        self.metrics.haproxy_decisions.update(parse_counts(answer))

    async def publish_table(self) -> None:
        """Publish the router's decision table (DECIDE=table) and the server -> cookie map into
        HAProxy if they changed."""
        if self.table is None:
            return
        table = self.router.decision_table()
        if table is None:
            return  # no members: keep what HAProxy holds
        report = await self.table.publish(DecisionTable(*table))
        if report.changed:
            self.metrics.table_published(report.ok, report.seconds)
            if not report.ok:
                self.log.warning("decision table not published: %s", report.error)
            else:
                self.log.info("decision table published in %.0f ms (%s)", report.seconds * 1000, ", ".join(report.maps))
            for error in report.file_errors:
                self.log.warning("decision table: map file not written (a reload would start from an old one): %s",
                                 error)

    async def _update_router(self, members: frozenset[Member], up: frozenset[Member]) -> None:
        router = self.router
        if members == router.members and up == router.up:
            return
        before = router.up
        # A ring build is ~20-35 ms of pure Python at 1,000 members: build in a thread so the event
        # loop keeps answering HAProxy (the GIL switches every few ms), then swap them in.
        started = time.perf_counter()
        ring = await asyncio.to_thread(Ring, members) if members != router.members else None
        fallback = await asyncio.to_thread(Ring, up) if up != members else None
        self.metrics.ring_rebuilt(router, time.perf_counter() - started)
        router.update(members, up, ring=ring, fallback=fallback)
        if router.up != before:
            self.log.info("routing to %d members up (%s)", len(router.up), _describe(before, router.up))

    async def control_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_dns = loop.time()
        while not self._stopping.is_set():
            now = loop.time()
            poll_dns = now >= next_dns
            if poll_dns:
                next_dns = now + self.settings.refresh
            retry_after: float | None = None
            try:
                retry_after = await self.step(now, poll_dns)
            except Exception:  # the loop must survive anything; the traffic path does not depend on it
                self.log.exception("control loop step failed; retrying")
            delay = min(HEALTH_INTERVAL, max(0.0, next_dns - loop.time()))
            if retry_after is not None:
                delay = min(delay, max(0.05, retry_after))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)

    # ------------------------------------------------------------------ lifecycle

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self) -> None:
        self._stopping.set()
        self.server.close()

    async def run(self) -> None:
        assert self.metrics_server is not None, "one of several services: Agents runs it"
        await self.server.start()
        await self.metrics_server.start()
        remove = install_signal_handlers(self.stop)
        control = asyncio.create_task(self.control_loop(), name="control-loop")
        baseline = asyncio.create_task(first_reading(self.read_haproxy_decisions), name="decisions baseline")
        certs = asyncio.create_task(self.certificates.run()) if self.certificates is not None else None
        try:
            await self.server.wait_closed()
        finally:
            remove()
            self._stopping.set()
            if self.certificates is not None and certs is not None:
                self.certificates.stop()
                await certs
            baseline.cancel()
            control.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await control
            await self.metrics_server.close()
            self.log.info("agent stopped")


class Agents:
    """Several services in one process: one `Agent` per service (its own SPOP port, control loop and
    HAProxy backend) and one metrics server for all of them on METRICS_LISTEN. With a pattern in
    SWARM_CONFIG_FILE, also the look-ups of its Hosts (spoa.ondemand), whose services get an `Agent`
    of their own in one of the pattern's backends while they last."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.agents = tuple(Agent(one, serve_metrics=False) for one in service_settings(settings))
        self.ondemand: OnDemand | None = None
        if any(line.on_demand for line in settings.services):
            self.ondemand = OnDemand(settings, make_agent=lambda one: Agent(one, serve_metrics=False),
                                     start=self._start, stop=self._stop)
        # The process's own reads of HAProxy (fe_main's counters): no one service's runtime commands.
        self.api = RuntimeAPI(settings.admin_socket)
        self.metrics = ServicesMetrics([agent.metrics for agent in self.agents],
                                       found=lambda: [agent.metrics for agent in self._found()],
                                       extra=[self.ondemand] if self.ondemand is not None else [])
        self.metrics_server = MetricsServer(settings.metrics_listen, self.metrics, ready=self.ready,
                                            before_scrape=self.read_haproxy_decisions)
        self.certificates = certificates(settings, self.metrics_server)
        self._controls: dict[Agent, asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()

    def _found(self) -> list[Agent]:
        return self.ondemand.agents if self.ondemand is not None else []

    def ready(self) -> tuple[bool, str]:
        """/readyz: ready when every service is; the body gives each service's reason, a line each.
        (The services a pattern finds are not waited for: each is ready before its Host is routed.)"""
        ok, lines = True, []
        for agent in self.agents:
            ready, why = agent.ready()
            ok = ok and ready
            lines.append(f"{agent.settings.service_name} ({agent.settings.service}): "
                         f"{'ready' if ready else 'NOT READY'}: {why}")
        if self.ondemand is not None:
            found = self.ondemand.agents
            lines.append(f"found on demand: {len(found)} service(s)"
                         + "".join(f", {a.settings.service} in {a.settings.haproxy_backend}" for a in found))
        return ok, "\n".join(lines)

    async def read_haproxy_decisions(self) -> None:
        """One `show table` for all services: fe_main tracks `<service name>/<source>`; each
        service's counts go to its own metrics."""
        answer = await self.api.command(f"show table {COUNTS_TABLE}")
        counts = split_counts(parse_counts(answer))
        for agent in (*self.agents, *self._found()):
            agent.metrics.haproxy_decisions.update(counts.get(agent.settings.service_name, {}))

    def stop(self) -> None:
        self._stopping.set()
        for agent in (*self.agents, *self._found()):
            agent.stop()

    async def _control(self, agent: Agent) -> None:
        """The service's control loop, restarted if it ever fails outside a step (a step's failure
        is the loop's own to log and retry): one service's bug never stops another's loop."""
        while not agent.stopping:
            try:
                await agent.control_loop()
            except Exception:
                agent.log.exception("control loop failed; restarting it")
                await asyncio.sleep(HEALTH_INTERVAL)

    async def _start(self, agent: Agent) -> None:
        """One service's SPOP server and control loop: a configured one's at start, a service a
        pattern found when it is found."""
        await agent.server.start()
        self._controls[agent] = asyncio.create_task(self._control(agent),
                                                    name=f"control-loop {agent.settings.service_name}")

    async def _stop(self, agent: Agent) -> None:
        """A service a pattern found, forgotten: its SPOP server and control loop end."""
        agent.stop()
        task = self._controls.pop(agent, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await agent.server.wait_closed()

    async def run(self) -> None:
        started: list[Agent] = []
        try:
            for agent in self.agents:
                await self._start(agent)
                started.append(agent)
            await self.metrics_server.start()
            if self.ondemand is not None:
                await self.ondemand.start()
        except BaseException:
            for agent in started:
                agent.stop()
            for task in self._controls.values():
                task.cancel()
            raise
        remove = install_signal_handlers(self.stop)
        baseline = asyncio.create_task(first_reading(self.read_haproxy_decisions), name="decisions baseline")
        certs = asyncio.create_task(self.certificates.run()) if self.certificates is not None else None
        try:
            await self._stopping.wait()
        finally:
            remove()
            baseline.cancel()
            self.stop()
            if self.certificates is not None and certs is not None:
                self.certificates.stop()
                await certs
            if self.ondemand is not None:
                await self.ondemand.close()
            for task in self._controls.values():
                task.cancel()
            for task in self._controls.values():
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await asyncio.gather(*(agent.server.wait_closed() for agent in (*self.agents, *self._found())))
            await self.metrics_server.close()
            log.info("agent stopped (%d services)", len(self.agents) + len(self._found()))


def certificates(settings: Settings, server: MetricsServer | None) -> Certificates | None:
    """The certificate task (spoa.acme) when there is a certificate to keep current, its metrics
    served with the agent's."""
    if server is None or not Certificates.wanted(settings):
        return None
    certs = Certificates(settings)
    server.registry.register(certs)
    return certs


async def first_reading(read: Callable[[], Awaitable[None]], interval: float = HEALTH_INTERVAL) -> None:
    """HAProxy's decision counts read once as soon as its socket answers: the baseline of this
    process's counters (spoa.haproxy.counters), so the decisions HAProxy makes from then on count
    even before the first scrape of /metrics."""
    while True:
        try:
            await read()
            return
        except Exception:  # HAProxy not up yet
            await asyncio.sleep(interval)


def _describe(before: frozenset[Any], after: frozenset[Any], limit: int = 8) -> str:
    parts = []
    for sign, items in (("+", sorted(after - before)), ("-", sorted(before - after))):
        shown = ", ".join(f"{sign}{m}" for m in items[:limit])
        if len(items) > limit:
            shown += f" and {len(items) - limit} more"
        if shown:
            parts.append(shown)
    return "; ".join(parts) or "no change"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# COOKIE_SECRET values that protect nothing: unset, or the example's placeholder.
_WEAK_SECRETS = ("", "change-me")


def startup_warnings(settings: Settings) -> list[str]:
    """Settings that work but weaken the deployment; logged once at start (docs/security.md), for
    all the services of SWARM_CONFIG_FILE together."""
    warnings = []
    if not _is_loopback(settings.listen.host):
        warnings.append(f"AGENT_LISTEN {settings.listen} is not a loopback address: SPOP has no "
                        "authentication, so anyone who can reach it can talk to the agent")
    if any(one.issues_cookie for one in service_settings(settings)) and settings.cookie_secret in _WEAK_SECRETS:
        what = "is not set" if not settings.cookie_secret else f"is the example's {settings.cookie_secret!r}"
        warnings.append(f"COOKIE_SECRET {what}: anyone who knows the members' addresses can compute "
                        "their sticky cookies; set the same secret on every replica")
    return warnings


def run_agent(settings: Settings) -> int:
    from spoa.agent.loop import run

    if settings.services:
        log.info("haproxy-swarm agent: %d services from %s, nameserver %s, metrics on %s",
                 len(settings.services), settings.config_file, settings.nameserver, settings.metrics_listen)
        for line, one in zip([line for line in settings.services if not line.on_demand], service_settings(settings),
                             strict=True):
            log.info("service %s: %s for %s -> backend %s, sticky key %s, SPOP on %s", one.service_name,
                     one.service, line.route or "requests no route takes", one.haproxy_backend,
                     ",".join(map(str, one.sticky_key)), one.listen)
    else:
        log.info("haproxy-swarm agent: service %s, nameserver %s, sticky key %s, SPOP on %s, metrics on %s",
                 settings.service, settings.nameserver, ",".join(map(str, settings.sticky_key)),
                 settings.listen, settings.metrics_listen)
    for warning in startup_warnings(settings):
        log.warning("%s; see docs/security.md", warning)
    try:
        run((Agents(settings) if settings.services else Agent(settings)).run())
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1
    return 0
