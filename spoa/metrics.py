"""Prometheus metrics and the health endpoints: /metrics, /healthz, /readyz.

Owns: the observer hooks the other layers call (SPOE server, discovery, HAProxy writer), the
collector that turns the agent's plain counters into metric families at scrape time, and the small
HTTP server. Must not: cost the per-request path more than one bisect and a few increments (the
router counts decisions in plain ints; latency goes into a fixed-bucket histogram here), use
prometheus-client's locked metric objects on that path, or log (the layers that own an event log it).

Every metric is named `haproxy_swarm_*` and labelled by `service` where it applies. The list, with
what each one means, is in docs/observability.md; tests/test_metrics.py holds the two in step.
With several services in one process (`ServicesMetrics`) each service's families are merged into
one exposition under the same names: the `service` label tells them apart (the SPOP families, which
have none with one service, gain it), the per-process ones (build info, process metrics) appear once.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import time
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector

from spoa import __version__
from spoa.agent.server import AgentObserver
from spoa.config import HostPort
from spoa.haproxy.counters import DecisionCounts
from spoa.protocol import FrameType, Status
from spoa.routing import SOURCES

if TYPE_CHECKING:
    from spoa.config import Settings
    from spoa.discovery import Discovery, Outcome
    from spoa.member import Member
    from spoa.routing import Router

log = logging.getLogger("spoa.metrics")

PREFIX = "haproxy_swarm_"
DECISION_BUCKETS = (5e-6, 10e-6, 20e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 5e-3)
DNS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
REBUILD_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5)
COMMAND_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 2.0)
DNS_OUTCOMES = ("ok", "partial", "nxdomain", "failure", "timeout", "truncated-then-tcp")
#: How many member changes `haproxy_swarm_member_change_timestamp_seconds` keeps (bounded series).
RECENT_CHANGES = 16
#: Families of the process, not of a service: given once when several services are merged.
PER_PROCESS = frozenset({PREFIX + "build_info"})
# How long a scrape waits for counters read elsewhere (HAProxy's decisions) before answering.
SCRAPE_READ_TIMEOUT = 1.0

#: SPOP statuses whose protocol-error series exist from the start (see collect).
ALWAYS_EXPORTED_ERRORS = frozenset({Status.TIMEOUT, Status.INVALID})

_FRAME_LABELS = {FrameType.HAPROXY_HELLO: "haproxy-hello", FrameType.NOTIFY: "notify",
                 FrameType.HAPROXY_DISCONNECT: "haproxy-disconnect"}


class AgentState(Protocol):
    """What metrics read from the agent at scrape time (`spoa.app.Agent` is one)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def router(self) -> Router: ...
    @property
    def discovery(self) -> Discovery: ...
    def ready(self) -> tuple[bool, str]: ...


class HAProxyStep(Protocol):
    """What metrics read from one step of the HAProxy writer (`spoa.haproxy.StepReport` is one)."""

    @property
    def reachable(self) -> bool: ...
    @property
    def down(self) -> frozenset[Any]: ...
    @property
    def pending(self) -> frozenset[Any]: ...
    @property
    def draining(self) -> frozenset[Any]: ...
    @property
    def reloaded(self) -> bool: ...
    @property
    def errors(self) -> tuple[str, ...]: ...


class FastHistogram:
    """A histogram with fixed buckets and no lock: the event loop is its only writer."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def family(self, name: str, doc: str, labels: dict[str, str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=list(labels))
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        family.add_metric(list(labels.values()), buckets, self.sum)
        return family


class Metrics(AgentObserver):
    """All the agent's observer hooks, and the Prometheus collector over the agent's state."""

    def __init__(self, agent: AgentState) -> None:
        self.agent = agent
        self.service = str(agent.settings.service)
        self.backend = agent.settings.haproxy_backend
        self.name = agent.settings.service_name  # "" for the one service of the seed's set-up
        # SPOE server
        self.connections = 0
        self.frames: Counter[FrameType] = Counter()
        self.protocol_errors: Counter[Status] = Counter()
        self.handler_errors = 0
        self.decision_latency = FastHistogram(DECISION_BUCKETS)
        # discovery
        self.dns_queries: Counter[str] = Counter()
        self.dns_latency = FastHistogram(DNS_BUCKETS)
        self.dns_last_success = 0.0
        self.members_added = 0
        self.members_removed = 0
        self.members_last_change = 0.0
        self.recent_changes: deque[tuple[float, str, str]] = deque(maxlen=RECENT_CHANGES)
        self._known: frozenset[Any] = frozenset()
        # ring
        self.ring_rebuilds = 0
        self.ring_rebuild_seconds = FastHistogram(REBUILD_BUCKETS)
        self._shares_of: tuple[object, object] | None = None
        self._shares: Mapping[Member, float] = {}
        # HAProxy runtime API
        self.runtime_commands: Counter[str] = Counter()
        self.runtime_failures: Counter[str] = Counter()
        self.runtime_latency = FastHistogram(COMMAND_BUCKETS)
        self.haproxy_reachable = False  # until a writer step reached the admin socket
        self.haproxy_steps = 0
        self.haproxy_step_errors = 0
        self.haproxy_reloads = 0
        self.haproxy_states: dict[str, int] = {"pending": 0, "down": 0, "draining": 0}
        # HAProxy's own decisions (spoa.haproxy.counters), read at each scrape of /metrics
        self.haproxy_decisions = DecisionCounts()
        # the decision table (DECIDE=table)
        self.table_publications = 0
        self.table_publish_failures = 0
        self.table_publish_seconds = FastHistogram(REBUILD_BUCKETS)

    # ------------------------------------------------------------------ AgentObserver

    def connection_opened(self, peer: str) -> None:
        self.connections += 1

    def connection_closed(self, peer: str) -> None:
        self.connections -= 1

    def frames_received(self, frame_type: FrameType, count: int) -> None:
        self.frames[frame_type] += count

    def protocol_error(self, status: Status, message: str, peer: str) -> None:
        self.protocol_errors[status] += 1

    def decision(self, seconds: float) -> None:
        # One bisect and two increments, inlined (no second call).
        h = self.decision_latency
        h.counts[bisect_left(h.bounds, seconds)] += 1
        h.sum += seconds

    def decision_batch(self, seconds: float, count: int) -> None:
        # The per-read hook: the NOTIFYs of one read land in the bucket of their mean, at once.
        h = self.decision_latency
        h.counts[bisect_left(h.bounds, seconds / count)] += count
        h.sum += seconds

    def handler_error(self, error: Exception) -> None:
        self.handler_errors += 1

    # ------------------------------------------------------------------ discovery observer

    def dns_lookup(self, outcome: Outcome, seconds: float, truncated: bool) -> None:
        self.dns_queries[str(outcome)] += 1
        if truncated:
            self.dns_queries["truncated-then-tcp"] += 1
        self.dns_latency.observe(seconds)
        if str(outcome) in ("ok", "partial"):  # partial: one address family answered
            self.dns_last_success = time.time()

    def members_changed(self, members: frozenset[Any]) -> None:
        """The service's members now (called every control step; only a difference counts)."""
        if members == self._known:
            return
        added, removed = members - self._known, self._known - members
        now = time.time()
        self.members_added += len(added)
        self.members_removed += len(removed)
        self.members_last_change = now
        # The newest RECENT_CHANGES changes; a huge first answer must not cost more than that.
        for change, items in (("removed", removed), ("added", added)):
            for member in sorted(items)[-RECENT_CHANGES:]:
                self.recent_changes.append((now, str(member), change))
        self._known = members

    # ------------------------------------------------------------------ ring and runtime API

    def ring_rebuilt(self, router: Router, seconds: float | None = None) -> None:
        self.ring_rebuilds += 1
        if seconds is not None:
            self.ring_rebuild_seconds.observe(seconds)

    def runtime_command(self, verb: str, ok: bool) -> None:
        self.runtime_commands[verb] += 1
        if not ok:
            self.runtime_failures[verb] += 1

    def command_done(self, verb: str, ok: bool, seconds: float) -> None:
        """`spoa.haproxy.runtime.CommandObserver`: one admin-socket command, its verb and duration."""
        self.runtime_command(verb, ok)
        self.runtime_latency.observe(seconds)

    def table_published(self, ok: bool, seconds: float) -> None:
        """One publication of the decision table (a changed table replaced in HAProxy, or a failure)."""
        if ok:
            self.table_publications += 1
            self.table_publish_seconds.observe(seconds)
        else:
            self.table_publish_failures += 1

    def haproxy_step(self, report: HAProxyStep) -> None:
        """One step of the HAProxy writer: socket reachable, servers by state, reloads it repaired."""
        self.haproxy_steps += 1
        self.haproxy_reachable = report.reachable
        if report.errors:
            self.haproxy_step_errors += 1
        if report.reloaded:
            self.haproxy_reloads += 1
        if report.reachable:
            self.haproxy_states = {"pending": len(report.pending), "down": len(report.down),
                                   "draining": len(report.draining)}

    # ------------------------------------------------------------------ collector

    def ring_shares(self) -> Mapping[Member, float]:
        """Each member's share of the keys, computed once per (ring, UP set): neither is mutated."""
        router = self.agent.router
        key = (router.ring, router.up)
        if self._shares_of is None or key[0] is not self._shares_of[0] or key[1] is not self._shares_of[1]:
            self._shares = router.shares()
            self._shares_of = key
        return self._shares

    def collect(self) -> Iterator[Metric]:
        agent = self.agent
        router = agent.router
        discovery = agent.discovery
        svc = {"service": self.service}
        s = [self.service]

        info = GaugeMetricFamily(PREFIX + "build_info", "Version of the agent and its runtime.",
                                 labels=["version", "python", "loop"])
        info.add_metric([__version__, platform.python_version(), _loop_name()], 1.0)
        yield info
        service_info = GaugeMetricFamily(PREFIX + "service_info", "The service this agent routes to, and "
                                         "the HAProxy backend that holds its members as servers (and its "
                                         "name, with several services).",
                                         labels=["service", "backend", "name"] if self.name else ["service", "backend"])
        service_info.add_metric([self.service, self.backend, self.name] if self.name else [self.service, self.backend],
                                1.0)
        yield service_info
        ok, _ = agent.ready()
        ready = GaugeMetricFamily(PREFIX + "ready", "1 when /readyz answers 200: the service has members and "
                                  "the HAProxy socket answers.", labels=["service"])
        ready.add_metric(s, 1.0 if ok else 0.0)
        yield ready

        # ---- decisions (per request, counted by the router in plain ints)
        decisions = CounterMetricFamily(PREFIX + "decisions", "Routing decisions by the key source that decided "
                                        "(new: no key, a new session; none: no member UP).",
                                        labels=["service", "source"])
        haproxy = self.haproxy_decisions  # decided by HAProxy itself (table, cookie map), read per scrape
        for source, count in zip(SOURCES, router.decisions, strict=True):
            decisions.add_metric([self.service, source], count + haproxy.decisions(source))
        yield decisions
        yield self.decision_latency.family(PREFIX + "decision_seconds", "Time from a decoded NOTIFY to its ACK.",
                                           svc)
        yield from _service_counters(s, (
            ("sticky_cookies_issued", "Sticky cookies issued: asked by the agent, or set by HAProxy from "
             "the decision table.", router.cookies_issued + haproxy.cookies_issued),
            ("cookies_rerouted", "Requests whose sticky cookie named a member that is gone (re-routed, "
             "and a new cookie issued).", router.cookies_rerouted),
            ("cookies_invalid", "Requests whose sticky cookie was not one the agent issued.", router.cookies_invalid),
            ("members_added", "Members that joined the service.", self.members_added),
            ("members_removed", "Members that left the service.", self.members_removed),
            ("ring_rebuilds", "Ring rebuilds (membership or health changes).", self.ring_rebuilds),
        ))

        # ---- members and the ring
        members = GaugeMetricFamily(PREFIX + "members", "Members of the service: known (from DNS), up (UP in "
                                    "HAProxy, on the ring), missing (kept although DNS lacks them, within the "
                                    "grace), pending (added, waiting for a first passed check), down (failing "
                                    "checks), draining (servers of removed members not deleted yet).",
                                    labels=["service", "state"])
        members.add_metric([self.service, "known"], len(discovery.members))
        members.add_metric([self.service, "up"], len(router.up))
        members.add_metric([self.service, "missing"], len(discovery.membership.missing))
        for state, count in self.haproxy_states.items():
            members.add_metric([self.service, state], count)
        yield members
        shares = self.ring_shares()
        share = GaugeMetricFamily(PREFIX + "member_ring_share", "Each member's share of the ring (0..1; 0 when it "
                                  "is not UP).", labels=["service", "member"])
        for member in sorted(discovery.members | router.up):
            share.add_metric([self.service, str(member)], shares.get(member, 0.0))
        yield share
        missing = GaugeMetricFamily(PREFIX + "member_missing_seconds", "Members kept only by the DNS grace "
                                    "(MEMBER_GRACE): seconds since DNS last listed them. A member absent here "
                                    "is listed by DNS.", labels=["service", "member"])
        now = time.monotonic()  # the clock the control loop gives discovery (the event loop's)
        for member, since in sorted(discovery.membership.missing.items()):
            missing.add_metric([self.service, str(member)], max(0.0, now - since))
        yield missing
        last_change = GaugeMetricFamily(PREFIX + "members_last_change_timestamp_seconds",
                                        "Unix time of the last change of members (0: none yet).", labels=["service"])
        last_change.add_metric(s, self.members_last_change)
        yield last_change
        recent = GaugeMetricFamily(PREFIX + "member_change_timestamp_seconds",
                                   f"The last {RECENT_CHANGES} member changes: Unix time each member was added "
                                   "or removed.", labels=["service", "member", "change"])
        latest = {(name, change): when for when, name, change in self.recent_changes}
        for (name, change), when in sorted(latest.items(), key=lambda kv: kv[1]):
            recent.add_metric([self.service, name, change], when)
        yield recent
        yield self.ring_rebuild_seconds.family(PREFIX + "ring_rebuild_seconds", "Time to rebuild the ring.", svc)
        yield from _service_counters(s, (
            ("table_publications", "Decision tables published into HAProxy (DECIDE=table; a change of "
             "members or health replaces the maps that changed).", self.table_publications),
            ("table_publish_failures", "Publications of the decision table that failed (retried next step).",
             self.table_publish_failures),
        ))
        yield self.table_publish_seconds.family(PREFIX + "table_publish_seconds",
                                                "Time to publish a changed decision table into HAProxy.", svc)

        # ---- DNS
        dns = CounterMetricFamily(PREFIX + "dns_queries", "DNS lookups by outcome (truncated-then-tcp counts "
                                  "answers that needed TCP).", labels=["service", "outcome"])
        for outcome in DNS_OUTCOMES:
            dns.add_metric([self.service, outcome], self.dns_queries.get(outcome, 0))
        for outcome, count in sorted(self.dns_queries.items()):
            if outcome not in DNS_OUTCOMES:
                dns.add_metric([self.service, outcome], count)
        yield dns
        yield self.dns_latency.family(PREFIX + "dns_query_seconds", "DNS lookup latency.", svc)
        last = GaugeMetricFamily(PREFIX + "dns_last_success_timestamp_seconds",
                                 "Unix time of the last successful DNS lookup (0: none yet).", labels=["service"])
        last.add_metric(s, self.dns_last_success)
        yield last
        failing = GaugeMetricFamily(PREFIX + "dns_family_failing", "1 when this address family's question "
                                    "failed at the last lookup while the other family answered (its members "
                                    "are kept as they were).", labels=["service", "family"])
        for family in ("A", "AAAA"):
            failing.add_metric([self.service, family], 1.0 if family in discovery.failing_families else 0.0)
        yield failing

        # ---- SPOP
        conns = GaugeMetricFamily(PREFIX + "spop_connections", "Open SPOP connections from HAProxy.")
        conns.add_metric([], self.connections)
        yield conns
        frames = CounterMetricFamily(PREFIX + "spop_frames", "SPOP frames received by type.", labels=["type"])
        for kind, label in _FRAME_LABELS.items():
            frames.add_metric([label], self.frames.get(kind, 0))
        yield frames
        errors = CounterMetricFamily(PREFIX + "spop_protocol_errors", "SPOP connections closed for bad input, "
                                     "by the SPOP status code sent in AGENT-DISCONNECT.", labels=["status", "reason"])
        # The two causes an operator sees (bad input, a peer that never finished a frame) always have
        # a series, at 0 until they happen: a dashboard's rate() of them shows 0, not "no data".
        for status in sorted(set(self.protocol_errors) | ALWAYS_EXPORTED_ERRORS):
            errors.add_metric([str(int(status)), _status_name(status)], self.protocol_errors.get(status, 0))
        yield errors
        herr = CounterMetricFamily(PREFIX + "handler_errors", "NOTIFYs answered without a decision because "
                                   "the router failed.")
        herr.add_metric([], self.handler_errors)
        yield herr

        # ---- HAProxy runtime API
        socket_up = GaugeMetricFamily(PREFIX + "runtime_api_up", "1 when HAProxy's admin socket answered at "
                                      "the last reconciliation step.", labels=["service"])
        socket_up.add_metric(s, 1.0 if self.haproxy_reachable else 0.0)
        yield socket_up
        yield from _service_counters(s, (
            ("haproxy_steps", "Reconciliations of HAProxy's servers with the members (one per control step).",
             self.haproxy_steps),
            ("haproxy_step_errors", "Reconciliation steps that met an error (socket unavailable, a refused "
             "command); the next step retries.", self.haproxy_step_errors),
            ("haproxy_reloads", "HAProxy reloads or restarts the agent noticed (it writes the servers back).",
             self.haproxy_reloads),
        ))
        cmds = CounterMetricFamily(PREFIX + "runtime_api_commands", "HAProxy runtime API commands by verb.",
                                   labels=["service", "verb"])
        fails = CounterMetricFamily(PREFIX + "runtime_api_failures", "HAProxy runtime API commands that failed.",
                                    labels=["service", "verb"])
        for verb in sorted(self.runtime_commands):
            cmds.add_metric([self.service, verb], self.runtime_commands[verb])
            fails.add_metric([self.service, verb], self.runtime_failures.get(verb, 0))
        yield cmds
        yield fails
        yield self.runtime_latency.family(PREFIX + "runtime_api_command_seconds",
                                          "Time of one HAProxy runtime API command, answer included.", svc)

    def registry(self) -> CollectorRegistry:
        """A registry with this collector and the process's own metrics (`haproxy_swarm_process_*`)."""
        return _registry(self)


class Collector(Protocol):
    def collect(self) -> Iterator[Metric]: ...


class ServicesMetrics:
    """The collector of several services in one process: each family once, with every service's
    samples (prometheus-client refuses two collectors that give the same family names)."""

    def __init__(self, services: Sequence[Metrics], *, found: Callable[[], Sequence[Metrics]] = tuple,
                 extra: Sequence[Collector] = ()) -> None:
        """`found`: the services found on demand now (spoa.ondemand); `extra`: collectors whose
        families no service has."""
        self.services = tuple(services)
        self.found = found
        self.extra = tuple(extra)

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for metrics in (*self.services, *self.found()):
            for family in metrics.collect():
                if family.name in PER_PROCESS:
                    merged.setdefault(family.name, family)  # the first service's: the same in all
                    continue
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                for sample in family.samples:
                    if "service" not in sample.labels:  # the SPOP families: one SPOP server per service
                        sample = sample._replace(labels={"service": metrics.service, **sample.labels})
                    out.samples.append(sample)
        yield from merged.values()
        for collector in self.extra:
            yield from collector.collect()

    def registry(self) -> CollectorRegistry:
        """A registry with the merged collector and the process's own metrics, once."""
        return _registry(self)


def _registry(collector: Metrics | ServicesMetrics) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(namespace=PREFIX.rstrip("_"), registry=registry)
    return registry


class Exposed(Protocol):
    """What the metrics server serves: `Metrics` (one service) or `ServicesMetrics` (several)."""

    def registry(self) -> CollectorRegistry: ...


def _service_counters(service: list[str], rows: tuple[tuple[str, str, float], ...]) -> Iterator[Metric]:
    """One counter family per (name, help, value) row, labelled with the service."""
    for name, doc, value in rows:
        c = CounterMetricFamily(PREFIX + name, doc, labels=["service"])
        c.add_metric(service, value)
        yield c


def _status_name(status: Status | int) -> str:
    try:
        return Status(status).name.lower().replace("_", "-")
    except ValueError:
        return "unknown"


def _loop_name() -> str:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "none"
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


class MetricsServer:
    """A minimal HTTP/1.0 server for /metrics, /healthz and /readyz on the event loop."""

    def __init__(self, listen: HostPort, metrics: Exposed, ready: Callable[[], tuple[bool, str]],
                 before_scrape: Callable[[], Awaitable[None]] | None = None) -> None:
        """`before_scrape`: awaited (at most SCRAPE_READ_TIMEOUT) before each /metrics answer, to
        read counters kept elsewhere (HAProxy's decisions); its failure leaves the last values."""
        self.listen = listen
        self.registry = metrics.registry()
        self.ready = ready
        self.before_scrape = before_scrape
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.listen.host, self.listen.port,
                                                  reuse_address=True)
        log.info("metrics on http://%s:%d/metrics", self.listen.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5.0)
            parts = request.split(b" ", 2)
            path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
            if path == b"/metrics" and self.before_scrape is not None:
                try:
                    await asyncio.wait_for(self.before_scrape(), SCRAPE_READ_TIMEOUT)
                except Exception as e:  # the scrape still answers, with the last counts
                    log.debug("before scrape: %s", e)
            try:
                status, ctype, body = self._answer(path)
            except Exception:  # a collector bug must not kill the endpoint silently
                log.exception("metrics endpoint failed on %r", path)
                status, ctype, body = "500 Internal Server Error", "text/plain; charset=utf-8", b"internal error\n"
            body_out = b"" if parts[0] == b"HEAD" else body
            writer.write(b"HTTP/1.0 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % (status.encode(), ctype.encode(), len(body)) + body_out)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    def _answer(self, path: bytes) -> tuple[str, str, bytes]:
        if path == b"/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == b"/healthz":
            return "200 OK", "text/plain; charset=utf-8", b"ok\n"
        if path == b"/readyz":
            ok, why = self.ready()
            return ("200 OK" if ok else "503 Service Unavailable"), "text/plain; charset=utf-8", why.encode() + b"\n"
        return "404 Not Found", "text/plain; charset=utf-8", b"try /metrics, /healthz or /readyz\n"


__all__ = ["AgentState", "Exposed", "FastHistogram", "HAProxyStep", "Metrics", "MetricsServer", "ServicesMetrics"]
