"""Discovery (resolver + membership + logging + callback) against the in-process DNS server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from dnsresponder import DNSResponder
from polling import poll

from spoa.config import ServiceSpec, Settings
from spoa.discovery import Discovery, Membership, OutageLog, Outcome, Resolver
from spoa.member import Member

SERVICE = ServiceSpec("tasks.backend", 80)


def members(*ips: str) -> frozenset[Member]:
    return frozenset(Member.parse(ip, 80) for ip in ips)


class Recorder:
    """A DiscoveryObserver that keeps what it was told."""

    def __init__(self) -> None:
        self.lookups: list[tuple[Outcome, float, bool]] = []

    def dns_lookup(self, outcome: Outcome, seconds: float, truncated: bool) -> None:
        self.lookups.append((outcome, seconds, truncated))


@pytest.fixture
async def server() -> AsyncIterator[DNSResponder]:
    async with DNSResponder() as responder:
        responder.set("tasks.backend", "A", ["10.0.0.1", "10.0.0.2"])
        yield responder


def discovery(server: DNSResponder, *, grace: float = 10.0, timeout: float = 0.3, interval: float = 2.0,
              observer: Recorder | None = None, outage_log: OutageLog | None = None) -> Discovery:
    return Discovery(Resolver(server.address, SERVICE, timeout), Membership(grace), interval=interval,
                     observer=observer, outage_log=outage_log)


async def test_from_settings_wires_the_settings(server: DNSResponder) -> None:
    settings = Settings(service=SERVICE, nameserver=server.address, refresh=0.5, dns_timeout=0.25,
                        member_grace=7)
    d = Discovery.from_settings(settings)
    assert (d.interval, d.resolver.timeout, d.membership.grace) == (0.5, 0.25, 7)
    assert d.resolver.nameserver == server.address
    assert not d.ready
    assert (await d.refresh(0)).added == members("10.0.0.1", "10.0.0.2")
    assert d.ready


async def test_refresh_applies_the_rules_through_failures(server: DNSResponder,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="spoa.discovery")
    recorder = Recorder()
    d = discovery(server, observer=recorder)

    change = await d.refresh(now=0)
    assert change.added == members("10.0.0.1", "10.0.0.2") and d.last_outcome is Outcome.OK
    assert "2 members (added 10.0.0.1:80, 10.0.0.2:80)" in caplog.text

    server.mode = "drop"  # DNS hangs: members stay
    change = await d.refresh(now=2)
    assert not change and d.members == members("10.0.0.1", "10.0.0.2")
    assert d.last_outcome is Outcome.TIMEOUT and "no answer" in (d.last_error or "")

    server.mode = "servfail"
    assert not await d.refresh(now=4)
    assert d.last_outcome is Outcome.FAILURE

    server.mode = "answer"
    server.set("tasks.backend", "A", ["10.0.0.2", "10.0.0.3"])  # .1 left, .3 came
    change = await d.refresh(now=6)
    assert change.added == members("10.0.0.3") and not change.removed
    assert d.members == members("10.0.0.1", "10.0.0.2", "10.0.0.3")
    assert d.last_error is None
    change = await d.refresh(now=16)  # .1 missing since 6: grace over
    assert change.removed == members("10.0.0.1")

    assert [o for o, _, _ in recorder.lookups] == [Outcome.OK, Outcome.TIMEOUT, Outcome.FAILURE,
                                                   Outcome.OK, Outcome.OK]
    assert all(0 < s < 1 for _, s, _ in recorder.lookups)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "timeout" in warnings[0] and "keeping 2 members" in warnings[0]
    assert "answering again after 4 s and 2 failed lookups" in caplog.text


async def test_nxdomain_keeps_members_for_the_grace_then_removes_them(server: DNSResponder) -> None:
    d = discovery(server, grace=10)
    await d.refresh(now=0)
    server.delete("tasks.backend")
    server.set("tasks.other", "A", ["10.9.9.9"])
    for t in (1, 5, 10.5):
        assert not await d.refresh(now=t)
        assert d.last_outcome is Outcome.NXDOMAIN
    assert (await d.refresh(now=11)).removed == members("10.0.0.1", "10.0.0.2")
    assert d.members == frozenset()


async def test_observer_hears_of_truncation(server: DNSResponder) -> None:
    recorder = Recorder()
    server.set("tasks.backend", "A", [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(200)])
    d = discovery(server, observer=recorder, timeout=2.0)  # 200 records over TCP: time for a loaded machine
    assert len((await d.refresh(0)).added) == 200
    assert recorder.lookups[0][0] is Outcome.OK and recorder.lookups[0][2] is True


async def test_outage_logs_once_then_rarely(server: DNSResponder, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="spoa.discovery")
    d = discovery(server, outage_log=OutageLog(first_repeat=30, max_interval=120))
    await d.refresh(0)
    server.mode = "refused"  # fails fast, so 300 polls take little time
    for t in range(2, 602, 2):
        await d.refresh(t)
    server.mode = "answer"
    await d.refresh(602)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 7  # at 2, 32, 92, 212, 332, 452 and 572: not 300 lines
    assert "REFUSED" in warnings[0] and "still failing after 30 s" in warnings[1]
    assert caplog.records[-1].getMessage().endswith("answering again after 600 s and 300 failed lookups; "
                                                    "2 members")


async def test_run_polls_and_calls_back_on_changes_only(server: DNSResponder) -> None:
    d = discovery(server, grace=0, interval=0.05)
    calls: asyncio.Queue[tuple[frozenset[Member], frozenset[Member], frozenset[Member]]] = asyncio.Queue()

    async def on_change(m: frozenset[Member], added: frozenset[Member], removed: frozenset[Member]) -> None:
        await calls.put((m, added, removed))

    task = asyncio.create_task(d.run(on_change))
    try:
        first = await asyncio.wait_for(calls.get(), 2)
        assert first == (members("10.0.0.1", "10.0.0.2"), members("10.0.0.1", "10.0.0.2"), frozenset())
        lookups = d.lookups
        server.set("tasks.backend", "A", ["10.0.0.2", "10.0.0.4"])
        second = await asyncio.wait_for(calls.get(), 2)
        assert second == (members("10.0.0.2", "10.0.0.4"), members("10.0.0.4"), members("10.0.0.1"))
        assert d.lookups - lookups <= 2  # seen within one poll (plus the one in flight)
        await poll(lambda: d.lookups >= lookups + 4, "several polls with no change", 2)
        assert calls.empty()  # and no call
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_run_survives_dns_errors_and_a_failing_callback(server: DNSResponder,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    d = discovery(server, interval=0.02, timeout=0.05)
    seen: list[frozenset[Member]] = []
    failures = 2

    def on_change(m: frozenset[Member], added: frozenset[Member], removed: frozenset[Member]) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise RuntimeError("haproxy is busy")
        seen.append(added)

    server.mode = "drop"
    task = asyncio.create_task(d.run(on_change))
    try:
        await poll(lambda: d.lookups >= 2, "two polls that time out", 2)
        assert d.last_outcome is Outcome.TIMEOUT
        assert not task.done() and d.members == frozenset() and seen == []
        server.mode = "answer"
        await poll(lambda: bool(seen), "a delivery once DNS answers", 2)
        # the callback raised twice; the third poll delivered everything it had missed
        assert seen == [members("10.0.0.1", "10.0.0.2")]
        assert "callback failed" in caplog.text
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_an_unexpected_error_is_a_failure_not_a_crash(server: DNSResponder,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Resolver):
        async def resolve(self) -> object:  # type: ignore[override]
            raise KeyError("a library surprise")

    d = Discovery(Broken(server.address, SERVICE, 0.3), Membership(10), interval=1)
    d.membership.answer(members("10.0.0.1"), 0)
    assert not await d.refresh(1)
    assert d.last_outcome is Outcome.FAILURE and d.members == members("10.0.0.1")
    assert "KeyError" in caplog.text


class _MetricsAgent:
    """What `Metrics` reads (`spoa.app.Agent` is one), around a real Discovery."""

    def __init__(self, d: Discovery) -> None:
        from spoa.routing import Router

        self.settings = Settings(service=SERVICE)
        self.router = Router(self.settings)
        self.discovery = d

    def ready(self) -> tuple[bool, str]:
        return bool(self.discovery.members), ""


@pytest.mark.parametrize(("bad", "mode"), [("AAAA", "refused"), ("A", "refused"), ("AAAA", "servfail"),
                                           ("AAAA", "drop")])
async def test_one_family_refused_keeps_its_members_and_uses_the_other(
        server: DNSResponder, caplog: pytest.LogCaptureFixture, bad: str, mode: str) -> None:
    """Issue 13: one family answering is an answer; the other family's last members are kept (no
    grace clock starts for them); one log line, with back-off; metrics and `status` say which."""
    from prometheus_client import generate_latest

    from spoa.metrics import Metrics
    from spoa.status import Status, parse_metrics, render, services_from_metrics

    caplog.set_level(logging.INFO, logger="spoa.discovery")
    server.set("tasks.backend", "AAAA", ["fd00::1", "fd00::2"])
    d = discovery(server, grace=10, outage_log=OutageLog(first_repeat=30, max_interval=120))
    metrics = Metrics(_MetricsAgent(d))  # type: ignore[arg-type]
    d.observer = metrics
    assert (await d.refresh(0)).added == members("10.0.0.1", "10.0.0.2", "fd00::1", "fd00::2")

    good, bad_v6 = ("A", True) if bad == "AAAA" else ("AAAA", False)
    kept = members("fd00::1", "fd00::2") if bad_v6 else members("10.0.0.1", "10.0.0.2")
    server.question_mode = {f"tasks.backend./{bad}": mode}  # type: ignore[dict-item]
    # The family that answers changes: one of its members leaves, one joins.
    if good == "A":
        server.set("tasks.backend", "A", ["10.0.0.2", "10.0.0.3"])
        joined, left, answered = members("10.0.0.3"), members("10.0.0.1"), members("10.0.0.2", "10.0.0.3")
    else:
        server.set("tasks.backend", "AAAA", ["fd00::2", "fd00::3"])
        joined, left, answered = members("fd00::3"), members("fd00::1"), members("fd00::2", "fd00::3")
    change = await d.refresh(2)
    assert change.added == joined and not change.removed
    assert d.last_outcome is Outcome.PARTIAL and list(d.failing_families) == [bad]
    assert kept <= d.members and set(d.membership.missing) == set(left)  # no grace clock for `kept`
    for t in range(4, 40, 2):
        await d.refresh(t)
    # The answering family's leaver is gone after its grace; the failing family's members all stay.
    assert d.members == kept | answered
    assert not d.membership.missing

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # at 2, then once after 30 s: not 19 lines
    assert f"{bad} lookup failed" in warnings[0] and "keeping the 2 " in warnings[0]
    assert f"{bad} still failing after 30 s" in warnings[1]
    assert "lookup failed:" not in caplog.text  # never reported as a failed lookup

    samples = parse_metrics(generate_latest(metrics.registry()).decode())
    outcomes = {labels["outcome"]: v for labels, v in samples["haproxy_swarm_dns_queries_total"]}
    assert outcomes["ok"] == 1 and outcomes["partial"] == 19 and outcomes["failure"] == outcomes["timeout"] == 0
    failing = {labels["family"]: v for labels, v in samples["haproxy_swarm_dns_family_failing"]}
    assert failing == {bad: 1.0, good: 0.0}
    assert samples["haproxy_swarm_dns_last_success_timestamp_seconds"][0][1] > 0
    svc = services_from_metrics(samples)[0]
    assert svc.dns_failing_families == [bad]
    text = render(Status("http://127.0.0.1:9101", "/nonexistent", services=[svc], time=0))
    assert f"DNS: {bad} lookups fail while the other family answers" in text

    server.question_mode = {}
    await d.refresh(40)
    assert d.failing_families == {} and "every address family answers again after 38 s" in caplog.text
