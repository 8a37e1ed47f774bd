"""spoa.metrics: the collector over the agent's real parts, the HTTP endpoints, the docs and the dashboard.

Real parts only: a real `Router`, a real `Discovery` (its membership fed directly, no DNS), a real
prometheus-client registry scraped through its own text format and parser, and a real
`MetricsServer` on a loopback port picked by the kernel, read with urllib.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from spoa.config import HostPort, Settings, load_settings
from spoa.discovery import Discovery, Outcome
from spoa.haproxy.writer import StepReport
from spoa.member import Member
from spoa.metrics import DECISION_BUCKETS, RECENT_CHANGES, Metrics, MetricsServer
from spoa.protocol import FrameType, Message, Status
from spoa.routing import SOURCES, Router

REPO = Path(__file__).resolve().parent.parent
SERVICE = "tasks.backend:80"
MEMBERS = [Member.parse(f"10.0.0.{i}", 80) for i in range(1, 5)]
Samples = dict[str, list[tuple[dict[str, str], float]]]


# --------------------------------------------------------------------------- a small agent


class AgentView:
    """What `Metrics` reads, made of the agent's real parts (`spoa.app.Agent` wires the same ones)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.router = Router(settings)
        self.discovery = Discovery.from_settings(settings)
        self.socket_ok = True  # what the agent learns from the HAProxy writer's last step
        self.broken = False  # to see a collector failure served as HTTP 500

    def set_members(self, members: list[Member], up: list[Member] | None = None, now: float = 0.0) -> None:
        self.discovery.membership.answer(members, now)
        self.router.update(self.discovery.members, up)

    def ready(self) -> tuple[bool, str]:
        if self.broken:
            raise RuntimeError("a bug")
        if not self.discovery.members:
            return False, "no members yet"
        if not self.socket_ok:
            return False, "HAProxy socket does not answer"
        return True, f"{len(self.router.up)} of {len(self.discovery.members)} members up"


def make_agent(**env: str) -> AgentView:
    return AgentView(load_settings({}, {"SWARM_SERVICE": SERVICE, "DNS_NAMESERVER": "127.0.0.1:53",
                                        "COOKIE_SECRET": "s3cret"} | env))


def scrape(metrics: Metrics) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry()).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    found = [v for got, v in samples.get(name, []) if all(got.get(k) == want for k, want in labels.items())]
    assert found, f"no sample {name}{labels}; have {sorted(samples)}"
    return sum(found)


def route(router: Router, **args: Any) -> None:
    full = {"sticky": None, "cookie": None, "header": None, "param": None, "src": None, "ssl": False} | args
    router.handle([Message("route", full)])


# --------------------------------------------------------------------------- the issue's list


# Every metric issue 5 asks for: sample name → labels it must carry (service where it applies).
REQUIRED: dict[str, set[str]] = {
    "haproxy_swarm_decisions_total": {"service", "source"},
    "haproxy_swarm_sticky_cookies_issued_total": {"service"},
    "haproxy_swarm_cookies_rerouted_total": {"service"},
    "haproxy_swarm_members": {"service", "state"},
    "haproxy_swarm_members_added_total": {"service"},
    "haproxy_swarm_members_removed_total": {"service"},
    "haproxy_swarm_ring_rebuilds_total": {"service"},
    "haproxy_swarm_ring_rebuild_seconds_bucket": {"service", "le"},
    "haproxy_swarm_dns_queries_total": {"service", "outcome"},
    "haproxy_swarm_dns_query_seconds_bucket": {"service", "le"},
    "haproxy_swarm_dns_last_success_timestamp_seconds": {"service"},
    "haproxy_swarm_spop_connections": set(),
    "haproxy_swarm_spop_frames_total": {"type"},
    "haproxy_swarm_decision_seconds_bucket": {"service", "le"},
    "haproxy_swarm_runtime_api_commands_total": {"service", "verb"},
    "haproxy_swarm_runtime_api_failures_total": {"service", "verb"},
    "haproxy_swarm_build_info": {"version"},
    "haproxy_swarm_member_ring_share": {"service", "member"},
    "haproxy_swarm_ready": {"service"},
    "haproxy_swarm_runtime_api_up": {"service"},
    "haproxy_swarm_runtime_api_command_seconds_bucket": {"service", "le"},
    "haproxy_swarm_haproxy_reloads_total": {"service"},
    "haproxy_swarm_haproxy_step_errors_total": {"service"},
    "haproxy_swarm_members_last_change_timestamp_seconds": {"service"},
}


def busy_metrics() -> tuple[AgentView, Metrics]:
    """An agent where every hook has fired at least once, so every labelled series exists."""
    agent = make_agent()
    metrics = Metrics(agent)
    agent.set_members(MEMBERS)
    metrics.members_changed(agent.discovery.members)
    metrics.ring_rebuilt(agent.router, 0.002)
    metrics.command_done("add server", ok=True, seconds=0.0004)
    metrics.command_done("del server", ok=False, seconds=0.0002)
    metrics.haproxy_step(StepReport(reachable=True, up=frozenset(MEMBERS)))
    metrics.protocol_error(Status.INVALID, "bad frame", "127.0.0.1:5000")
    metrics.dns_lookup(Outcome.OK, 0.004, truncated=False)
    metrics.decision(12e-6)
    route(agent.router, src=ipaddress.ip_address("192.0.2.1"))
    return agent, metrics


def test_every_metric_the_issue_lists_is_exported_with_its_labels() -> None:
    _, metrics = busy_metrics()
    samples = scrape(metrics)
    for name, labels in REQUIRED.items():
        assert name in samples, f"{name} is not exported"
        for got, _ in samples[name]:
            assert labels <= set(got), f"{name} has labels {sorted(got)}, wants {sorted(labels)}"
            if "service" in labels:
                assert got["service"] == SERVICE
    assert {labels["source"] for labels, _ in samples["haproxy_swarm_decisions_total"]} >= {
        "cookie", "header", "param", "src", "new"}
    assert {labels["outcome"] for labels, _ in samples["haproxy_swarm_dns_queries_total"]} >= {
        "ok", "failure", "timeout", "truncated-then-tcp"}
    assert all(name.startswith("haproxy_swarm_") for name in samples), sorted(samples)
    assert value(samples, "haproxy_swarm_process_resident_memory_bytes") > 0


def test_every_exported_family_is_documented() -> None:
    _, metrics = busy_metrics()
    doc = (REPO / "docs" / "observability.md").read_text()
    families = {f.name for f in text_string_to_metric_families(generate_latest(metrics.registry()).decode())}
    missing = sorted(f for f in families if f not in doc and not f.startswith("haproxy_swarm_process_"))
    assert not missing, f"docs/observability.md does not describe {missing}"
    assert "haproxy_swarm_process_" in doc


# --------------------------------------------------------------------------- counters follow the agent


def test_decisions_are_counted_by_source_and_cookies_by_fate() -> None:
    agent = make_agent(STICKY_KEY="cookie:SWARMID,header:X-User,src", MEMBER_GRACE="1")
    metrics = Metrics(agent)
    agent.set_members(MEMBERS)
    for _ in range(7):
        route(agent.router)  # nothing in the chain: a new session, a cookie issued
    for i in range(5):
        route(agent.router, header=f"user-{i}".encode())
    for i in range(3):
        route(agent.router, src=ipaddress.ip_address(f"192.0.2.{i + 1}"))
    cookie = agent.router.cookie_value(MEMBERS[0])
    route(agent.router, sticky=cookie.encode())
    agent.set_members(MEMBERS[1:], now=1.0)
    agent.set_members(MEMBERS[1:], now=2.0)  # missing for the 1 s grace: MEMBERS[0] is gone
    assert MEMBERS[0] not in agent.discovery.members
    route(agent.router, sticky=cookie.encode())  # its member left: re-routed
    route(agent.router, sticky=b"0123456789abcdef0123")  # never issued
    samples = scrape(metrics)
    assert value(samples, "haproxy_swarm_decisions_total", source="new") == 7 + 2  # 2 cookies fell through
    assert value(samples, "haproxy_swarm_decisions_total", source="header") == 5
    assert value(samples, "haproxy_swarm_decisions_total", source="src") == 3
    assert value(samples, "haproxy_swarm_decisions_total", source="cookie") == 1
    assert value(samples, "haproxy_swarm_decisions_total") == 7 + 5 + 3 + 1 + 2
    assert value(samples, "haproxy_swarm_cookies_rerouted_total") == 1
    assert value(samples, "haproxy_swarm_cookies_invalid_total") == 1
    # Every decision without a valid cookie issued one: 7 new + 5 header + 3 src + 2 fallen through.
    assert value(samples, "haproxy_swarm_sticky_cookies_issued_total") == 7 + 5 + 3 + 2
    assert [labels["source"] for labels, _ in samples["haproxy_swarm_decisions_total"]] == list(SOURCES)


def test_no_member_up_counts_as_none() -> None:
    agent = make_agent()
    metrics = Metrics(agent)
    route(agent.router, src=ipaddress.ip_address("192.0.2.1"))
    samples = scrape(metrics)
    assert value(samples, "haproxy_swarm_decisions_total", source="none") == 1
    assert value(samples, "haproxy_swarm_ready") == 0


def test_spop_dns_and_runtime_hooks() -> None:
    agent = make_agent()
    metrics = Metrics(agent)
    metrics.connection_opened("127.0.0.1:1")
    metrics.connection_opened("127.0.0.1:2")
    metrics.connection_closed("127.0.0.1:1")
    metrics.frames_received(FrameType.HAPROXY_HELLO, 1)
    metrics.frames_received(FrameType.NOTIFY, 20)
    metrics.frames_received(FrameType.NOTIFY, 3)
    metrics.protocol_error(Status.INVALID, "bad", "127.0.0.1:2")
    metrics.protocol_error(Status.INVALID, "bad", "127.0.0.1:2")
    metrics.protocol_error(Status.TIMEOUT, "slow", "127.0.0.1:3")
    metrics.handler_error(RuntimeError("boom"))
    metrics.dns_lookup(Outcome.TIMEOUT, 1.0, truncated=False)
    metrics.dns_lookup(Outcome.FAILURE, 0.02, truncated=False)
    assert metrics.dns_last_success == 0.0
    metrics.dns_lookup(Outcome.OK, 0.003, truncated=True)
    metrics.command_done("add server", ok=True, seconds=0.001)
    metrics.command_done("add server", ok=False, seconds=0.003)
    metrics.runtime_command("enable server", ok=True)
    samples = scrape(metrics)
    assert value(samples, "haproxy_swarm_spop_connections") == 1
    assert value(samples, "haproxy_swarm_spop_frames_total", type="notify") == 23
    assert value(samples, "haproxy_swarm_spop_frames_total", type="haproxy-hello") == 1
    assert value(samples, "haproxy_swarm_spop_frames_total", type="haproxy-disconnect") == 0
    assert value(samples, "haproxy_swarm_spop_protocol_errors_total", status="4", reason="invalid") == 2
    assert value(samples, "haproxy_swarm_spop_protocol_errors_total", status="2", reason="timeout") == 1
    assert value(samples, "haproxy_swarm_handler_errors_total") == 1
    for outcome, count in (("ok", 1), ("timeout", 1), ("failure", 1), ("nxdomain", 0), ("truncated-then-tcp", 1)):
        assert value(samples, "haproxy_swarm_dns_queries_total", outcome=outcome) == count, outcome
    assert value(samples, "haproxy_swarm_dns_query_seconds_count") == 3
    assert value(samples, "haproxy_swarm_dns_query_seconds_sum") == pytest.approx(1.023)
    assert value(samples, "haproxy_swarm_dns_last_success_timestamp_seconds") > 1.6e9
    assert value(samples, "haproxy_swarm_runtime_api_commands_total", verb="add server") == 2
    assert value(samples, "haproxy_swarm_runtime_api_failures_total", verb="add server") == 1
    assert value(samples, "haproxy_swarm_runtime_api_failures_total", verb="enable server") == 0
    assert value(samples, "haproxy_swarm_runtime_api_command_seconds_count") == 2
    assert value(samples, "haproxy_swarm_runtime_api_command_seconds_sum") == pytest.approx(0.004)


def test_haproxy_writer_steps() -> None:
    agent = make_agent()
    metrics = Metrics(agent)
    samples = scrape(metrics)
    assert value(samples, "haproxy_swarm_runtime_api_up") == 0  # no step yet
    metrics.haproxy_step(StepReport(reachable=True, up=frozenset(MEMBERS[:1]), pending=frozenset(MEMBERS[1:3]),
                                    down=frozenset(MEMBERS[3:]), draining=frozenset({"10.0.0.9_80"})))
    samples = scrape(metrics)
    assert value(samples, "haproxy_swarm_runtime_api_up") == 1
    for state, count in (("pending", 2), ("down", 1), ("draining", 1)):
        assert value(samples, "haproxy_swarm_members", state=state) == count, state
    assert value(samples, "haproxy_swarm_haproxy_steps_total") == 1
    assert value(samples, "haproxy_swarm_haproxy_step_errors_total") == 0
    # HAProxy restarting: the socket is gone, the last known states stay.
    metrics.haproxy_step(StepReport(reachable=False, up=frozenset(), errors=("socket unavailable: refused",)))
    samples = scrape(metrics)
    assert value(samples, "haproxy_swarm_runtime_api_up") == 0
    assert value(samples, "haproxy_swarm_members", state="pending") == 2
    assert value(samples, "haproxy_swarm_haproxy_step_errors_total") == 1
    # Back after a restart: the agent wrote its servers back.
    metrics.haproxy_step(StepReport(reachable=True, up=frozenset(MEMBERS), reloaded=True,
                                    events=("HAProxy reloaded or restarted (new pid 42)",)))
    samples = scrape(metrics)
    assert value(samples, "haproxy_swarm_runtime_api_up") == 1
    assert value(samples, "haproxy_swarm_haproxy_reloads_total") == 1
    assert value(samples, "haproxy_swarm_members", state="pending") == 0
    assert value(samples, "haproxy_swarm_haproxy_steps_total") == 3


def test_decision_latency_histogram_buckets_are_cumulative() -> None:
    metrics = Metrics(make_agent())
    observed = [3e-6, 5e-6, 7e-6, 40e-6, 40e-6, 2e-3, 1.0]
    for seconds in observed:
        metrics.decision(seconds)
    samples = scrape(metrics)
    buckets = {labels["le"]: v for labels, v in samples["haproxy_swarm_decision_seconds_bucket"]}
    for bound in DECISION_BUCKETS:
        assert buckets[repr(bound)] == sum(1 for s in observed if s <= bound), bound
    assert buckets["+Inf"] == len(observed)
    assert value(samples, "haproxy_swarm_decision_seconds_count") == len(observed)
    assert value(samples, "haproxy_swarm_decision_seconds_sum") == pytest.approx(sum(observed))


def test_a_read_of_notifies_is_one_batch_in_the_bucket_of_its_mean() -> None:
    """The server reads the clock once per read: `decision_batch(total, n)` counts n decisions in the
    bucket of total / n and adds total to the sum, like n calls of `decision(total / n)`."""
    batched, single = Metrics(make_agent()), Metrics(make_agent())
    for total, n in ((60e-6, 10), (4e-6, 1), (3e-3, 2)):
        batched.decision_batch(total, n)
        for _ in range(n):
            single.decision(total / n)
    assert batched.decision_latency.counts == single.decision_latency.counts
    assert batched.decision_latency.count == 13
    assert batched.decision_latency.sum == pytest.approx(single.decision_latency.sum)


def test_members_gauge_changes_and_recent_events() -> None:
    agent = make_agent(MEMBER_GRACE="10")
    metrics = Metrics(agent)
    agent.set_members(MEMBERS[:3], up=MEMBERS[:2], now=0.0)
    metrics.members_changed(agent.discovery.members)
    metrics.members_changed(agent.discovery.members)  # called every step: no change, nothing counted
    samples = scrape(metrics)
    assert value(samples, "haproxy_swarm_members", state="known") == 3
    assert value(samples, "haproxy_swarm_members", state="up") == 2
    assert value(samples, "haproxy_swarm_members_added_total") == 3
    assert value(samples, "haproxy_swarm_members_removed_total") == 0
    first_change = value(samples, "haproxy_swarm_members_last_change_timestamp_seconds")
    assert first_change > 1.6e9

    agent.set_members([*MEMBERS[1:3], MEMBERS[3]], now=1.0)  # MEMBERS[0] missing, within the grace
    metrics.members_changed(agent.discovery.members)
    samples = scrape(metrics)
    assert value(samples, "haproxy_swarm_members", state="known") == 4
    assert value(samples, "haproxy_swarm_members", state="missing") == 1
    assert value(samples, "haproxy_swarm_members_added_total") == 4

    agent.set_members(MEMBERS[1:], now=20.0)  # the grace has passed: removed
    metrics.members_changed(agent.discovery.members)
    samples = scrape(metrics)
    assert value(samples, "haproxy_swarm_members", state="known") == 3
    assert value(samples, "haproxy_swarm_members", state="missing") == 0
    assert value(samples, "haproxy_swarm_members_removed_total") == 1
    events = {(labels["member"], labels["change"]) for labels, _ in
              samples["haproxy_swarm_member_change_timestamp_seconds"]}
    assert events == {(str(m), "added") for m in MEMBERS} | {(str(MEMBERS[0]), "removed")}
    assert value(samples, "haproxy_swarm_members_last_change_timestamp_seconds") >= first_change


def test_recent_member_changes_stay_bounded() -> None:
    metrics = Metrics(make_agent())
    many = frozenset(Member.parse(f"10.1.{i // 250}.{i % 250 + 1}", 80) for i in range(1000))
    metrics.members_changed(many)
    metrics.members_changed(frozenset())
    samples = scrape(metrics)
    assert value(samples, "haproxy_swarm_members_added_total") == 1000
    assert value(samples, "haproxy_swarm_members_removed_total") == 1000
    recent = samples["haproxy_swarm_member_change_timestamp_seconds"]
    assert len(recent) == RECENT_CHANGES
    assert {labels["change"] for labels, _ in recent} == {"removed"}


def test_ring_share_per_member_follows_the_ring() -> None:
    agent = make_agent()
    metrics = Metrics(agent)
    agent.set_members(MEMBERS, up=MEMBERS[:3])
    samples = scrape(metrics)
    shares = {labels["member"]: v for labels, v in samples["haproxy_swarm_member_ring_share"]}
    assert set(shares) == {str(m) for m in MEMBERS}
    assert shares[str(MEMBERS[3])] == 0  # known, not UP: not on the ring
    assert sum(shares.values()) == pytest.approx(1.0)
    assert all(0.2 < shares[str(m)] < 0.5 for m in MEMBERS[:3]), shares
    agent.router.update(agent.discovery.members)  # MEMBERS[3] is UP now: a new ring, new shares
    shares = {labels["member"]: v for labels, v in scrape(metrics)["haproxy_swarm_member_ring_share"]}
    assert all(0.15 < v < 0.35 for v in shares.values()), shares
    assert sum(shares.values()) == pytest.approx(1.0)


def test_the_ring_shares_are_computed_once_per_ring() -> None:
    agent = make_agent()
    metrics = Metrics(agent)
    agent.set_members(MEMBERS)
    first = metrics.ring_shares()
    assert metrics.ring_shares() is first
    agent.router.update(MEMBERS[:2])
    second = metrics.ring_shares()
    assert second is not first and set(second) == set(MEMBERS[:2])


def test_ring_rebuild_histogram_counts_rebuilds() -> None:
    agent = make_agent()
    metrics = Metrics(agent)
    metrics.ring_rebuilt(agent.router, 0.0005)
    metrics.ring_rebuilt(agent.router, 0.02)
    metrics.ring_rebuilt(agent.router)
    samples = scrape(metrics)
    assert value(samples, "haproxy_swarm_ring_rebuilds_total") == 3
    assert value(samples, "haproxy_swarm_ring_rebuild_seconds_count") == 2
    assert value(samples, "haproxy_swarm_ring_rebuild_seconds_bucket", le="0.001") == 1


# --------------------------------------------------------------------------- the HTTP endpoints


@pytest.fixture
async def served() -> AsyncIterator[tuple[AgentView, MetricsServer]]:
    agent = make_agent(STICKY_KEY="cookie:SWARMID,src")
    server = MetricsServer(HostPort("127.0.0.1", 0), Metrics(agent), ready=agent.ready)
    await server.start()
    try:
        yield agent, server
    finally:
        await server.close()


def _get(port: int, path: str, method: str = "GET") -> tuple[int, str, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


async def get(port: int, path: str, method: str = "GET") -> tuple[int, str, str]:
    return await asyncio.to_thread(_get, port, path, method)


async def test_metrics_endpoint_serves_the_text_format(served: tuple[AgentView, MetricsServer]) -> None:
    agent, server = served
    agent.set_members(MEMBERS)
    route(agent.router, src=ipaddress.ip_address("192.0.2.9"))
    status, ctype, body = await get(server.port, "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain") and "version=" in ctype
    families = {f.name: f for f in text_string_to_metric_families(body)}
    decisions = families["haproxy_swarm_decisions"]
    assert sum(s.value for s in decisions.samples if s.labels.get("source") == "src") == 1
    status, _, body = await get(server.port, "/metrics?name[]=x")  # a query string is ignored
    assert status == 200 and "haproxy_swarm_build_info" in body


async def test_healthz_and_readyz(served: tuple[AgentView, MetricsServer]) -> None:
    agent, server = served
    assert await get(server.port, "/healthz") == (200, "text/plain; charset=utf-8", "ok\n")
    status, _, body = await get(server.port, "/readyz")
    assert (status, body) == (503, "no members yet\n")
    agent.set_members(MEMBERS)
    status, _, body = await get(server.port, "/readyz")
    assert (status, body) == (200, "4 of 4 members up\n")
    agent.socket_ok = False
    status, _, body = await get(server.port, "/readyz")
    assert (status, body) == (503, "HAProxy socket does not answer\n")


async def test_unknown_paths_head_and_garbage(served: tuple[AgentView, MetricsServer]) -> None:
    _, server = served
    status, _, body = await get(server.port, "/")
    assert status == 404 and "/metrics" in body
    status, _, body = await get(server.port, "/healthz", method="HEAD")
    assert (status, body) == (200, "")

    def raw(data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    assert await asyncio.to_thread(raw, b"\x00\x01garbage") == b""  # no request head: closed, no answer
    assert (await asyncio.to_thread(raw, b"BREW\r\n\r\n")).startswith(b"HTTP/1.0 404")
    status, _, _ = await get(server.port, "/healthz")  # still serving
    assert status == 200


async def test_a_failing_collector_answers_500_and_the_server_survives(
        served: tuple[AgentView, MetricsServer]) -> None:
    agent, server = served
    agent.broken = True
    status, _, _ = await get(server.port, "/metrics")
    assert status == 500
    agent.broken = False
    status, _, body = await get(server.port, "/metrics")
    assert status == 200 and "haproxy_swarm_ready" in body


# --------------------------------------------------------------------------- the Grafana dashboard

# PromQL words that are not metric names.
_PROMQL_WORDS = (
    "sum avg min max count stddev stdvar topk bottomk quantile count_values group by without on ignoring "
    "group_left group_right bool and or unless offset rate irate increase delta idelta deriv changes resets "
    "histogram_quantile time vector scalar abs ceil floor round clamp clamp_min clamp_max label_replace "
    "label_join sort sort_desc absent absent_over_time avg_over_time max_over_time min_over_time "
    "sum_over_time count_over_time last_over_time predict_linear timestamp label_values inf nan")
PROMQL_WORDS = frozenset(_PROMQL_WORDS.split())
# Labels Prometheus adds to every series at scrape time.
TARGET_LABELS = frozenset({"instance", "job"})
# Labels of HAProxy's exporter the dashboard groups by (`proxy` also joins haproxy_swarm_service_info's backend).
HAPROXY_LABELS = frozenset({"proxy", "code", "server", "state"})


def dashboard_queries() -> list[str]:
    doc = json.loads((REPO / "monitoring" / "grafana-dashboard.json").read_text())
    queries: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, item in node.items():
                if key in ("expr", "definition") and isinstance(item, str):
                    queries.append(item)
                elif key == "query" and isinstance(item, dict) and isinstance(item.get("query"), str):
                    queries.append(item["query"])
                else:
                    walk(item)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(doc)
    return queries


def promql_names(expr: str) -> tuple[set[str], set[str], dict[str, set[str]]]:
    """(metric names, grouping labels, labels matched per metric) of one PromQL query."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings ("$service", ".*") hold no names
    text = re.sub(r"\$\{?\w+\}?", "", text)  # Grafana variables ($__rate_interval, $service)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    matched: dict[str, set[str]] = {}
    for metric, body in re.findall(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}", text):
        matched.setdefault(metric, set()).update(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", body))
    grouping: set[str] = set()
    for labels in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", text):
        grouping.update(label.strip() for label in labels.split(",") if label.strip())
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", text)
    text = re.sub(r"label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*\w+\s*\)", r"\1", text)
    words = set(re.findall(r"(?<![\w.])[a-zA-Z_:][\w:]*", text))
    return {w for w in words if w not in PROMQL_WORDS} | set(matched), grouping, matched


def test_promql_name_extraction_sees_metrics_and_labels() -> None:
    names, grouping, matched = promql_names(
        'histogram_quantile(0.9, sum by (le) (rate(haproxy_swarm_decision_seconds_bucket'
        '{service=~"$service", instance=~"$instance"}[$__rate_interval]))) / on (job) up')
    assert names == {"haproxy_swarm_decision_seconds_bucket", "up"}
    assert grouping == {"le", "job"}
    assert matched == {"haproxy_swarm_decision_seconds_bucket": {"service", "instance"}}
    assert promql_names("label_values(haproxy_swarm_service_info, service)")[0] == {"haproxy_swarm_service_info"}


def test_every_dashboard_query_names_only_metrics_the_agent_exports() -> None:
    _, metrics = busy_metrics()
    samples = scrape(metrics)
    exported_labels = {name: {label for labels, _ in rows for label in labels} for name, rows in samples.items()}
    queries = dashboard_queries()
    assert len(queries) >= 20, "the dashboard lost its queries"
    used: set[str] = set()
    for expr in queries:
        names, grouping, matched = promql_names(expr)
        assert names, f"no metric in {expr!r}"
        # HAProxy's own exporter (its row): tests/test_prometheus.py evaluates those against a real one.
        haproxy = {n for n in names if n.startswith("haproxy_") and not n.startswith("haproxy_swarm_")}
        unknown = names - set(samples) - haproxy
        assert not unknown, f"{expr!r} names {sorted(unknown)}, which the agent does not export"
        for metric, labels in matched.items():
            if metric not in haproxy:
                assert labels <= exported_labels[metric] | TARGET_LABELS, (expr, metric, labels)
        available = set().union(*(exported_labels[n] for n in names - haproxy)) | TARGET_LABELS
        if haproxy:
            available |= HAPROXY_LABELS
        assert grouping <= available, (expr, grouping - available)
        used |= names
    # The panels the issue asks for are there.
    for name in ("haproxy_swarm_decisions_total", "haproxy_swarm_members", "haproxy_swarm_members_added_total",
                 "haproxy_swarm_cookies_rerouted_total", "haproxy_swarm_dns_queries_total",
                 "haproxy_swarm_dns_last_success_timestamp_seconds", "haproxy_swarm_decision_seconds_bucket"):
        assert name in used, f"the dashboard has no panel on {name}"


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    doc = json.loads((REPO / "monitoring" / "grafana-dashboard.json").read_text())
    assert doc["uid"] and doc["title"] and isinstance(doc["schemaVersion"], int)
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in doc["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
    variables = {v["name"] for v in doc["templating"]["list"]}
    assert {"datasource", "service", "instance"} <= variables
