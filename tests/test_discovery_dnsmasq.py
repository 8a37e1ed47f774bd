"""Discovery against a real dnsmasq (spoa/local/dnsmasq.py) on a loopback port, and the launcher itself."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Iterator

import pytest

from spoa.config import ServiceSpec, Settings
from spoa.discovery import Discovery, Membership, Outcome, QueryTimeout, Resolver
from spoa.local.dnsmasq import Dnsmasq, DnsmasqError
from spoa.local.ports import free_tcp_udp_port
from spoa.member import Member

SERVICE = ServiceSpec("tasks.backend", 80)
THOUSAND = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(1000)]


def members(*ips: str, port: int = 80) -> frozenset[Member]:
    return frozenset(Member.parse(ip, port) for ip in ips)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def dnsmasq() -> Iterator[Dnsmasq]:
    with Dnsmasq({"tasks.backend": ["127.0.0.2", "127.0.0.3", "127.0.0.4"]}) as server:
        yield server


async def test_a_thousand_tasks_resolve_completely() -> None:
    """The required proof: 1,000 A records from a real DNS server, UDP truncated → TCP."""
    with Dnsmasq({"tasks.backend": THOUSAND}) as server:
        settings = Settings(service=SERVICE, nameserver=server.address, dns_timeout=2)
        answer = await Resolver.from_settings(settings).resolve()
    assert len(answer.members) == 1000
    assert answer.members == members(*THOUSAND)
    assert answer.truncated


async def test_order_of_records_does_not_matter() -> None:
    shuffled = random.Random(7).sample(THOUSAND[:100], 100)
    with Dnsmasq({"tasks.backend": THOUSAND[:100]}) as one, Dnsmasq({"tasks.backend": shuffled}) as two:
        answers = [await Resolver(s.address, SERVICE, 2).resolve() for s in (one, two, one, two)]
    assert {a.members for a in answers} == {members(*THOUSAND[:100])}


async def test_aaaa_and_nxdomain(dnsmasq: Dnsmasq) -> None:
    dnsmasq.set_hosts({"tasks.backend": ["127.0.0.2", "fd00::2"]})
    answer = await Resolver(dnsmasq.address, SERVICE, 1).resolve()
    assert answer.members == members("127.0.0.2", "fd00::2")
    result = await Discovery(Resolver(dnsmasq.address, ServiceSpec("tasks.nothing", 80), 1),
                             Membership(10), interval=1).refresh(0)
    assert not result.members  # dnsmasq answers NXDOMAIN, not REFUSED, for names it lacks


async def test_a_sighup_change_is_seen_within_one_poll(dnsmasq: Dnsmasq) -> None:
    interval = 0.2
    d = Discovery(Resolver(dnsmasq.address, SERVICE, 1), Membership(grace=0), interval=interval)
    changes: asyncio.Queue[tuple[frozenset[Member], frozenset[Member], int]] = asyncio.Queue()

    def on_change(m: frozenset[Member], added: frozenset[Member], removed: frozenset[Member]) -> None:
        changes.put_nowait((added, removed, d.lookups))

    task = asyncio.create_task(d.run(on_change))
    try:
        added, removed, _ = await asyncio.wait_for(changes.get(), 5)
        assert added == members("127.0.0.2", "127.0.0.3", "127.0.0.4") and not removed
        await asyncio.to_thread(dnsmasq.set_hosts, {"tasks.backend": ["127.0.0.3", "127.0.0.4", "127.0.0.5"]})
        served, lookups = time.monotonic(), d.lookups
        added, removed, seen_at = await asyncio.wait_for(changes.get(), 5)
        assert (added, removed) == (members("127.0.0.5"), members("127.0.0.2"))
        # the next poll saw it: at most the one in flight and the next one; and in about one interval
        assert seen_at - lookups <= 2
        assert time.monotonic() - served < interval + 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_frozen_dns_server_keeps_members_and_recovers(dnsmasq: Dnsmasq) -> None:
    d = Discovery(Resolver(dnsmasq.address, SERVICE, 0.2), Membership(grace=0), interval=1)
    await d.refresh(0)
    dnsmasq.pause()
    try:
        with pytest.raises(QueryTimeout):
            await d.resolver.resolve()
        assert not await d.refresh(1)
        assert d.last_outcome is Outcome.TIMEOUT
    finally:
        dnsmasq.resume()
    assert not await d.refresh(2)
    assert d.last_outcome is Outcome.OK and len(d.members) == 3


async def test_a_stopped_dns_server_is_a_failure_and_start_serves_the_same_port(dnsmasq: Dnsmasq) -> None:
    d = Discovery(Resolver(dnsmasq.address, SERVICE, 0.5), Membership(grace=0), interval=1)
    await d.refresh(0)
    port, old_pid = dnsmasq.port, dnsmasq.pid
    dnsmasq.stop()
    assert gone(old_pid)
    assert not await d.refresh(1)
    assert d.last_outcome is Outcome.FAILURE  # connection refused, at once
    dnsmasq.start()
    assert dnsmasq.port == port
    assert not await d.refresh(2) and d.last_outcome is Outcome.OK


async def test_srv_records() -> None:
    hosts = {"t1.backend": ["127.0.0.2"], "t2.backend": ["127.0.0.3"]}
    srv = {"_http._tcp.backend": [("t1.backend", 8080), ("t2.backend", 8081)]}
    service = ServiceSpec("_http._tcp.backend", 0, srv=True)
    with Dnsmasq(hosts, srv=srv) as server:
        answer = await Resolver(server.address, service, 1).resolve()
        assert answer.members == {Member.parse("127.0.0.2", 8080), Member.parse("127.0.0.3", 8081)}
        server.set_srv({"_http._tcp.backend": [("t2.backend", 8081)]})  # restarts on the same port
        assert server.query("_http._tcp.backend", "SRV") == {"t2.backend:8081"}
        answer = await Resolver(server.address, service, 1).resolve()
        assert answer.members == {Member.parse("127.0.0.3", 8081)}


# --------------------------------------------------------------------------- the launcher


def test_stop_leaves_no_process_and_no_files_even_when_paused() -> None:
    server = Dnsmasq({"tasks.backend": ["127.0.0.2"]}).start()
    pid, workdir = server.pid, server.workdir
    assert os.path.isfile(os.path.join(workdir, "hosts"))
    server.pause()
    assert server.paused
    server.stop()
    assert gone(pid) and not os.path.exists(workdir)
    assert not server.running
    server.stop()  # twice is fine


def test_an_error_inside_the_block_still_stops_it() -> None:
    with pytest.raises(RuntimeError, match="boom"), Dnsmasq({"tasks.backend": ["127.0.0.2"]}) as server:
        pid = server.pid
        raise RuntimeError("boom")
    assert gone(pid)


def test_set_hosts_returns_once_served_and_names_can_go(dnsmasq: Dnsmasq) -> None:
    dnsmasq.set_hosts({"tasks.other": ["127.0.0.9"]})
    assert dnsmasq.query("tasks.backend") == frozenset()
    assert dnsmasq.query("tasks.other") == {"127.0.0.9"}
    assert dnsmasq.hosts == {"tasks.other": frozenset({"127.0.0.9"})}
    with pytest.raises(ValueError):
        dnsmasq.set_hosts({"tasks.backend": ["not-an-ip"]})


def test_start_failures_are_clear_and_leave_nothing() -> None:
    with pytest.raises(DnsmasqError, match="exited at start"):
        Dnsmasq({"tasks.backend": ["127.0.0.2"]}, binary="/bin/false").start()
    with Dnsmasq({}) as first:
        with pytest.raises(DnsmasqError, match="taken"):
            Dnsmasq({}, port=first.port).start()
        assert first.running


def test_free_port_helper_agrees() -> None:
    """The launcher's default port picking gives a port free for both UDP and TCP."""
    port = free_tcp_udp_port()
    with Dnsmasq({}, port=port) as server:
        assert server.address.port == port
