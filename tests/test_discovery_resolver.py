"""The resolver against a real DNS server in-process (tests/dnsresponder.py): real sockets, real wire."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import dns.rrset
import pytest
from dnsresponder import DNSResponder

from spoa.config import HostPort, ServiceSpec
from spoa.discovery.resolver import (
    Answer,
    NXDomain,
    Outcome,
    QueryFailed,
    QueryTimeout,
    Resolver,
    acceptable_ip,
)
from spoa.local.ports import free_port
from spoa.member import Member

SERVICE = ServiceSpec("tasks.backend", 80)
SRV_SERVICE = ServiceSpec("_http._tcp.backend", 0, srv=True)


@pytest.fixture
async def server() -> AsyncIterator[DNSResponder]:
    async with DNSResponder() as responder:
        yield responder


def resolver(server: DNSResponder, service: ServiceSpec = SERVICE, timeout: float = 1.0,
             **kwargs: object) -> Resolver:
    return Resolver(server.address, service, timeout, **kwargs)  # type: ignore[arg-type]


def members(*ips: str, port: int = 80) -> frozenset[Member]:
    return frozenset(Member.parse(ip, port) for ip in ips)


async def test_a_records_become_members_on_the_service_port(server: DNSResponder) -> None:
    server.set("tasks.backend", "A", ["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    answer = await resolver(server).resolve()
    assert answer == Answer(members("10.0.0.1", "10.0.0.2", "10.0.0.3"))
    assert answer.outcome is Outcome.OK
    assert {(s.name, s.rdtype, s.transport) for s in server.seen} == {
        ("tasks.backend.", "A", "udp"), ("tasks.backend.", "AAAA", "udp")}


@pytest.mark.parametrize("mode", ["refused", "servfail", "drop"])
@pytest.mark.parametrize(("bad", "good", "good_ip"), [("AAAA", "A", "10.0.0.1"), ("A", "AAAA", "fd00::1")])
async def test_one_family_failing_is_a_partial_answer(server: DNSResponder, mode: str, bad: str, good: str,
                                                      good_ip: str) -> None:
    """Issue 13: a server that answers A but refuses AAAA (or the other way round) still answers."""
    server.set("tasks.backend", "A", ["10.0.0.1"])
    server.set("tasks.backend", "AAAA", ["fd00::1"])
    server.question_mode = {f"tasks.backend./{bad}": mode}  # type: ignore[dict-item]
    answer = await resolver(server, timeout=0.3).resolve()
    assert answer.members == members(good_ip)
    assert answer.outcome is Outcome.PARTIAL
    assert [family for family, _ in answer.failed] == [bad]
    assert (answer.unanswered_ipv4, answer.unanswered_ipv6) == (bad == "A", bad == "AAAA")
    why = answer.failed[0][1]
    assert f"tasks.backend. {bad}" in why
    assert ("no answer" in why) if mode == "drop" else (mode.upper() in why)


async def test_both_families_failing_fails_the_lookup(server: DNSResponder) -> None:
    server.set("tasks.backend", "A", ["10.0.0.1"])
    server.question_mode = {"tasks.backend./AAAA": "refused", "tasks.backend./A": "servfail"}
    with pytest.raises(QueryFailed, match=r"SERVFAIL|REFUSED"):
        await resolver(server).resolve()


async def test_a_and_aaaa_together(server: DNSResponder) -> None:
    server.set("tasks.backend", "A", ["10.0.0.1"])
    server.set("tasks.backend", "AAAA", ["fd00::1", "FD00:0:0::2"])
    answer = await resolver(server, ServiceSpec("tasks.backend", 8080)).resolve()
    assert answer.members == members("10.0.0.1", "fd00::1", "fd00::2", port=8080)
    assert {m.address for m in answer.members} == {"10.0.0.1:8080", "[fd00::1]:8080", "[fd00::2]:8080"}


async def test_only_aaaa_is_fine(server: DNSResponder) -> None:
    server.set("tasks.backend", "AAAA", ["fd00::7"])
    assert (await resolver(server).resolve()).members == members("fd00::7")


async def test_families_can_be_limited(server: DNSResponder) -> None:
    server.set("tasks.backend", "A", ["10.0.0.1"])
    server.set("tasks.backend", "AAAA", ["fd00::7"])
    answer = await resolver(server, rdtypes=(dns.rdatatype.A,)).resolve()
    assert answer.members == members("10.0.0.1")
    assert {s.rdtype for s in server.seen} == {"A"}


async def test_order_of_records_does_not_matter(server: DNSResponder) -> None:
    ips = [f"10.0.1.{i}" for i in range(1, 21)]
    server.set("tasks.backend", "A", ips)
    server.shuffle = True
    answers = {(await resolver(server).resolve()) for _ in range(5)}
    assert answers == {Answer(members(*ips))}


async def test_nxdomain(server: DNSResponder) -> None:
    server.set("tasks.other", "A", ["10.0.0.1"])
    with pytest.raises(NXDomain) as info:
        await resolver(server).resolve()
    assert info.value.outcome is Outcome.NXDOMAIN
    assert "tasks.backend" in str(info.value)


async def test_name_without_records_is_an_empty_answer_not_nxdomain(server: DNSResponder) -> None:
    server.set("tasks.backend", "TXT", ['"nothing here"'])
    assert await resolver(server).resolve() == Answer(frozenset())


@pytest.mark.parametrize("mode", ["servfail", "refused"])
async def test_error_rcodes_are_failures(server: DNSResponder, mode: str) -> None:
    server.set("tasks.backend", "A", ["10.0.0.1"])
    server.mode = mode  # type: ignore[assignment]
    with pytest.raises(QueryFailed) as info:
        await resolver(server).resolve()
    assert info.value.outcome is Outcome.FAILURE
    assert mode.upper() in str(info.value)


async def test_a_server_that_never_answers_is_a_timeout(server: DNSResponder) -> None:
    server.set("tasks.backend", "A", ["10.0.0.1"])
    server.mode = "drop"
    started = time.monotonic()
    with pytest.raises(QueryTimeout) as info:
        await resolver(server, timeout=0.3).resolve()
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 0.55  # A and AAAA are asked together: one timeout (0.3 s), not two (0.6 s)
    assert info.value.outcome is Outcome.TIMEOUT
    assert not info.value.truncated


async def test_garbage_answers_are_ignored_like_silence(server: DNSResponder) -> None:
    server.set("tasks.backend", "A", ["10.0.0.1"])
    server.mode = "garbage"
    with pytest.raises(QueryTimeout):
        await resolver(server, timeout=0.2).resolve()


async def test_nothing_listening_is_a_failure_at_once() -> None:
    closed = HostPort("127.0.0.1", free_port("127.0.0.1", socket.SOCK_DGRAM))
    started = time.monotonic()
    with pytest.raises(QueryFailed, match="ConnectionRefused") as info:
        await Resolver(closed, SERVICE, 1.0).resolve()
    # The kernel reports the ICMP port-unreachable on our connected socket: a failure, at once.
    assert info.value.outcome is Outcome.FAILURE
    assert time.monotonic() - started < 0.5


async def test_truncated_udp_answer_is_fetched_again_over_tcp(server: DNSResponder) -> None:
    ips = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(1000)]
    server.set("tasks.backend", "A", ips)
    answer = await resolver(server).resolve()
    assert answer.members == members(*ips)
    assert len(answer.members) == 1000
    assert answer.truncated
    assert server.count("tcp") == 1  # only the A question was too large
    assert server.count("udp") == 2


async def test_edns_lets_a_medium_answer_through_udp_and_plain_dns_does_not(server: DNSResponder) -> None:
    ips = [f"10.0.0.{i}" for i in range(1, 51)]  # 50 A records: > 512 bytes, < 1232 bytes
    server.set("tasks.backend", "A", ips)
    answer = await resolver(server).resolve()
    assert answer.members == members(*ips) and not answer.truncated
    answer = await resolver(server, edns_payload=None).resolve()
    assert answer.members == members(*ips) and answer.truncated


async def test_tcp_silent_after_truncation_is_a_timeout_marked_truncated(server: DNSResponder) -> None:
    server.set("tasks.backend", "A", [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(500)])
    server.tcp_mode = "drop"
    with pytest.raises(QueryTimeout) as info:
        await resolver(server, timeout=0.3, rdtypes=(dns.rdatatype.A,)).resolve()
    assert info.value.truncated
    assert "TCP" in str(info.value)
    # Asked with AAAA (which answers, empty): a partial answer that keeps the IPv4 members.
    answer = await resolver(server, timeout=0.3).resolve()
    assert answer.truncated and answer.unanswered_ipv4 and not answer.members
    assert "TCP" in answer.failed[0][1]


async def test_formerr_to_edns_retries_without_it(server: DNSResponder) -> None:
    server.set("tasks.backend", "A", ["10.0.0.1"])
    server.mode = "formerr-edns"
    answer = await resolver(server).resolve()
    assert answer.members == members("10.0.0.1")
    assert [s.edns for s in server.seen if s.rdtype == "A"] == [0, -1]


async def test_cname_is_followed_and_stray_records_are_ignored(server: DNSResponder) -> None:
    server.set("tasks.backend", "CNAME", ["real.backend."])
    server.set("real.backend", "A", ["10.0.0.9"])
    server.extra_answer = [dns.rrset.from_text("evil.example.", 60, "IN", "A", "192.0.2.66")]
    answer = await resolver(server).resolve()
    assert answer.members == members("10.0.0.9")


async def test_addresses_that_cannot_be_members_are_ignored(server: DNSResponder) -> None:
    server.set("tasks.backend", "A", ["10.0.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255"])
    server.set("tasks.backend", "AAAA", ["::", "ff02::1", "fd00::1"])
    answer = await resolver(server).resolve()
    assert answer.members == members("10.0.0.1", "fd00::1")
    assert answer.ignored == 5


def test_acceptable_ip() -> None:
    assert acceptable_ip("10.0.0.01") is None  # leading zeros are ambiguous: refused by ipaddress
    assert acceptable_ip("tasks.backend") is None
    assert acceptable_ip("") is None
    assert acceptable_ip("127.0.0.2") == "127.0.0.2"
    assert acceptable_ip("FD00:0::1") == "fd00::1"


def test_construction_checks_its_inputs() -> None:
    with pytest.raises(ValueError, match="IP address"):
        Resolver(HostPort("dns.example", 53), SERVICE, 1.0)
    with pytest.raises(ValueError, match="timeout"):
        Resolver(HostPort("127.0.0.1", 53), SERVICE, 0)
    with pytest.raises(ValueError, match="port"):
        Resolver(HostPort("127.0.0.1", 53), ServiceSpec("tasks.backend", 0), 1.0)
    Resolver(HostPort("::1", 53), SERVICE, 1.0)  # IPv6 nameservers are fine


# --------------------------------------------------------------------------- SRV


async def test_srv_targets_and_ports_from_the_additional_section(server: DNSResponder) -> None:
    server.set("_http._tcp.backend", "SRV", ["0 0 8080 t1.backend.", "0 0 8081 t2.backend.",
                                             "0 0 9000 t1.backend."])
    server.set("t1.backend", "A", ["10.0.0.1"])
    server.set("t2.backend", "A", ["10.0.0.2"])
    server.set("t2.backend", "AAAA", ["fd00::2"])
    answer = await resolver(server, SRV_SERVICE).resolve()
    assert answer.members == {Member.parse("10.0.0.1", 8080), Member.parse("10.0.0.1", 9000),
                              Member.parse("10.0.0.2", 8081), Member.parse("fd00::2", 8081)}
    assert [s.rdtype for s in server.seen] == ["SRV"]  # nothing more to ask


async def test_srv_targets_resolved_when_not_in_additional(server: DNSResponder) -> None:
    server.srv_additional = False
    server.set("_http._tcp.backend", "SRV", ["0 0 8080 t1.backend.", "0 0 8081 gone.backend.",
                                             "0 0 80 ."])
    server.set("t1.backend", "A", ["10.0.0.1"])
    answer = await resolver(server, SRV_SERVICE).resolve()
    # "." means no service; a target that does not exist names no member; neither is an error
    assert answer.members == {Member.parse("10.0.0.1", 8080)}
    assert answer.ignored == 1
    assert {(s.name, s.rdtype) for s in server.seen} == {
        ("_http._tcp.backend.", "SRV"), ("t1.backend.", "A"), ("t1.backend.", "AAAA"),
        ("gone.backend.", "A"), ("gone.backend.", "AAAA")}


async def test_srv_nxdomain(server: DNSResponder) -> None:
    with pytest.raises(NXDomain):
        await resolver(server, SRV_SERVICE).resolve()


async def test_srv_target_that_fails_fails_the_lookup(server: DNSResponder) -> None:
    """Half an answer would remove members: a target that cannot be resolved at all fails it all."""
    server.srv_additional = False
    server.set("_http._tcp.backend", "SRV", ["0 0 8080 t1.backend.", "0 0 8080 t2.backend."])
    server.set("t1.backend", "A", ["10.0.0.1"])
    server.set("t2.backend", "A", ["10.0.0.2"])
    assert len((await resolver(server, SRV_SERVICE).resolve()).members) == 2
    server.servfail = {"t2.backend."}
    with pytest.raises(QueryFailed, match=r"t2\.backend"):
        await resolver(server, SRV_SERVICE).resolve()


async def test_srv_targets_whose_aaaa_is_refused_are_a_partial_answer(server: DNSResponder) -> None:
    server.srv_additional = False
    server.set("_http._tcp.backend", "SRV", ["0 0 8080 t1.backend.", "0 0 8080 t2.backend."])
    server.set("t1.backend", "A", ["10.0.0.1"])
    server.set("t2.backend", "A", ["10.0.0.2"])
    server.question_mode = {"t2.backend./AAAA": "refused"}
    answer = await resolver(server, SRV_SERVICE).resolve()
    assert answer.members == members("10.0.0.1", "10.0.0.2", port=8080)
    assert [family for family, _ in answer.failed] == ["AAAA"] and answer.outcome is Outcome.PARTIAL


async def test_large_srv_answer_over_tcp(server: DNSResponder) -> None:
    records = [f"0 0 {8000 + i} t{i}.backend." for i in range(300)]
    server.set("_http._tcp.backend", "SRV", records)
    for i in range(300):
        server.set(f"t{i}.backend", "A", [f"10.0.{i // 250}.{i % 250 + 1}"])
    answer = await resolver(server, SRV_SERVICE).resolve()
    assert len(answer.members) == 300
    assert answer.truncated
    assert Member.parse("10.0.1.50", 8299) in answer.members


async def test_queries_run_concurrently_within_one_timeout(server: DNSResponder) -> None:
    """Two resolvers on one server at once do not disturb each other."""
    server.set("tasks.backend", "A", ["10.0.0.1"])
    server.set("tasks.other", "A", ["10.0.0.2"])
    a, b = await asyncio.gather(resolver(server).resolve(),
                                resolver(server, ServiceSpec("tasks.other", 81)).resolve())
    assert a.members == members("10.0.0.1") and b.members == members("10.0.0.2", port=81)
