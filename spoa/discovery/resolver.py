"""DNS → members: one lookup of the service against one nameserver (the I/O layer of discovery).

Owns: building the queries (`tasks.<service>` A and AAAA, or SRV for `_http._tcp.<name>`), UDP with a
retry over TCP when the answer comes truncated, following CNAMEs of the question's name only, turning
records into `Member`s, and classifying each lookup as ok, nxdomain, failure or timeout.

Must not: keep state between lookups, decide what a failed lookup means for the members (that is
`membership.py`), schedule polls, or look at TTLs (Swarm answers TTL 600; the caller polls on its own
interval). It never accepts anything as a member that is not a unicast IP address from a record of
the right type and name.

Time: each question (UDP and its TCP retry together) gets `timeout` seconds. A and AAAA are asked
at once, so an address lookup takes at most `timeout`; an SRV lookup at most twice that (the SRV
question, then the targets the additional section lacks). The TCP retry runs in a worker thread:
parsing 1,000 records costs ~30 ms of CPU, which inline would stall the agent's event loop.

Address families answer on their own: a server that answers A but refuses AAAA (REFUSED, SERVFAIL
or silence for that type alone; some forwarders do this) gives a partial `Answer`: the members of the
family that answered, and `failed` naming the family that did not (its members are for the caller to
keep). Only when no family answers does the lookup fail.

Outcomes are types: `resolve()` returns an `Answer` (ok or partial, possibly empty) or raises a
subclass of `ResolveError` whose `outcome` says which kind of failure it was.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import socket
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import dns._asyncbackend
import dns.asyncbackend
import dns.asyncquery
import dns.exception
import dns.flags
import dns.inet
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from spoa.config import HostPort, ServiceSpec, Settings
from spoa.member import Member

#: EDNS payload size we announce (the DNS flag day 2020 value): about 75 A records fit over UDP
#: instead of about 30; anything larger comes truncated and is fetched again over TCP.
DEFAULT_EDNS_PAYLOAD = 1232
#: At most this many SRV targets are resolved at the same time when the additional section lacks
#: their addresses.
DEFAULT_PARALLEL_TARGETS = 32

A = dns.rdatatype.A
AAAA = dns.rdatatype.AAAA
SRV = dns.rdatatype.SRV


class Outcome(enum.StrEnum):
    """What one lookup came to; a label for metrics and logs."""

    OK = "ok"
    PARTIAL = "partial"  # one address family answered, another failed
    NXDOMAIN = "nxdomain"
    FAILURE = "failure"
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class Answer:
    """A successful lookup: the members it named (possibly none: NOERROR without records)."""

    members: frozenset[Member]
    truncated: bool = False  # some UDP answer came truncated and was fetched again over TCP
    ignored: int = 0  # records that were not acceptable members (unspecified, multicast, port 0 ...)
    #: address families ("A", "AAAA") whose question failed while another answered, with why; the
    #: answer says nothing about the members of those families
    failed: tuple[tuple[str, str], ...] = ()

    @property
    def outcome(self) -> Outcome:
        return Outcome.PARTIAL if self.failed else Outcome.OK

    @property
    def unanswered_ipv4(self) -> bool:
        return any(family == "A" for family, _ in self.failed)

    @property
    def unanswered_ipv6(self) -> bool:
        return any(family == "AAAA" for family, _ in self.failed)


class ResolveError(Exception):
    """A lookup that gave no usable answer; `outcome` tells which kind."""

    outcome: ClassVar[Outcome] = Outcome.FAILURE

    def __init__(self, message: str, *, truncated: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.truncated = truncated


class NXDomain(ResolveError):
    """The name does not exist (for A/AAAA: neither family has it)."""

    outcome = Outcome.NXDOMAIN


class QueryFailed(ResolveError):
    """An error answer (SERVFAIL, REFUSED ...), a network error or a malformed answer."""

    outcome = Outcome.FAILURE


class QueryTimeout(ResolveError):
    """No answer within the timeout."""

    outcome = Outcome.TIMEOUT


@dataclass(frozen=True, slots=True)
class _Reply:
    """One question answered: the final rrset after CNAMEs (None when there is none)."""

    rcode: dns.rcode.Rcode
    rrset: dns.rrset.RRset | None
    message: dns.message.QueryMessage
    truncated: bool


def acceptable_ip(text: str) -> str | None:
    """The canonical form of `text` if it can address a member, else None.

    Refused: anything that does not parse as an IP, the unspecified address, multicast and the IPv4
    limited broadcast. Loopback and private ranges are fine (tests and Swarm overlays use them).
    """
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if addr.is_unspecified or addr.is_multicast:
        return None
    if isinstance(addr, ipaddress.IPv4Address) and addr == ipaddress.IPv4Address("255.255.255.255"):
        return None
    return addr.compressed


class Resolver:
    """Looks up one service on one nameserver; stateless between calls, safe to call concurrently."""

    def __init__(
        self,
        nameserver: HostPort,
        service: ServiceSpec,
        timeout: float,
        *,
        edns_payload: int | None = DEFAULT_EDNS_PAYLOAD,
        rdtypes: Sequence[dns.rdatatype.RdataType] = (A, AAAA),
        parallel_targets: int = DEFAULT_PARALLEL_TARGETS,
    ) -> None:
        """`timeout` bounds each question (UDP and its TCP retry together) in seconds.

        `rdtypes` are the address families asked for (A/AAAA services and SRV targets); `edns_payload`
        None sends plain 512-byte DNS.
        """
        try:
            ipaddress.ip_address(nameserver.host.split("%")[0])
        except ValueError:
            raise ValueError(f"the nameserver must be an IP address, got {nameserver.host!r}") from None
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if not service.srv and not 0 < service.port < 65536:
            raise ValueError(f"service {service.name!r} needs a port, got {service.port!r}")
        if not rdtypes or any(t not in (A, AAAA) for t in rdtypes):
            raise ValueError(f"rdtypes must be A and/or AAAA, got {rdtypes!r}")
        self.nameserver = nameserver
        self.service = service
        self.timeout = timeout
        self.edns_payload = edns_payload
        self.rdtypes = tuple(rdtypes)
        self.parallel_targets = max(1, parallel_targets)
        self.qname = dns.name.from_text(service.name)  # absolute: no search domains

    @classmethod
    def from_settings(cls, settings: Settings) -> Resolver:
        return cls(settings.nameserver, settings.service, settings.dns_timeout)

    async def resolve(self) -> Answer:
        """One lookup of the service. Raises `NXDomain`, `QueryFailed` or `QueryTimeout`."""
        if self.service.srv:
            return await self._resolve_srv()
        return await self._resolve_addresses()

    # ------------------------------------------------------------------ A / AAAA

    async def _resolve_addresses(self) -> Answer:
        results = await _gather_each([self._ask(self.qname, t) for t in self.rdtypes])
        failed = _failed_families(self.rdtypes, results)
        replies = [r for r in results if isinstance(r, _Reply)]
        truncated = any(r.truncated for r in results)
        port = self.service.port
        members: set[Member] = set()
        ignored = 0
        for reply in replies:
            for ip in _addresses(reply.rrset):
                if ip is None:
                    ignored += 1
                else:
                    members.add(Member(ip, port))
        if not members and any(r.rcode == dns.rcode.NXDOMAIN for r in replies):
            raise NXDomain(f"{self.qname} does not exist (NXDOMAIN)", truncated=truncated)
        return Answer(frozenset(members), truncated, ignored, failed)

    # ------------------------------------------------------------------ SRV

    async def _resolve_srv(self) -> Answer:
        reply = await self._ask(self.qname, SRV)
        truncated = reply.truncated
        if reply.rcode == dns.rcode.NXDOMAIN:
            raise NXDomain(f"{self.qname} does not exist (NXDOMAIN)", truncated=truncated)
        ignored = 0
        wanted: dict[dns.name.Name, set[int]] = {}
        for rdata in reply.rrset or ():
            target: dns.name.Name = rdata.target
            port: int = rdata.port
            if target == dns.name.root or not 0 < port < 65536:
                ignored += 1  # "." means "no service here"; port 0 addresses nothing
                continue
            wanted.setdefault(target, set()).add(port)

        # Addresses from the additional section; targets without any are resolved.
        found: dict[dns.name.Name, list[str | None]] = {}
        for target in wanted:
            ips = [ip for t in self.rdtypes for ip in _addresses(_find(reply.message.additional, target, t))]
            if ips:
                found[target] = ips
        missing = [t for t in wanted if t not in found]
        if missing:
            limit = asyncio.Semaphore(self.parallel_targets)

            async def ask_limited(name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> _Reply:
                async with limit:
                    return await self._ask(name, rdtype)

            results = await _gather_each(
                [ask_limited(t, rdtype) for t in missing for rdtype in self.rdtypes])
            failed = _failed_families(self.rdtypes * len(missing), results)
            for i, target in enumerate(missing):
                chunk = results[i * len(self.rdtypes):(i + 1) * len(self.rdtypes)]
                truncated = truncated or any(r.truncated for r in chunk)
                # A target that does not exist (any more) names no member; not an error.
                found[target] = [ip for r in chunk if isinstance(r, _Reply) for ip in _addresses(r.rrset)]
        else:
            failed = ()

        members: set[Member] = set()
        for target, ports in wanted.items():
            for ip in found.get(target, ()):
                if ip is None:
                    ignored += len(ports)
                    continue
                members.update(Member(ip, port) for port in ports)
        return Answer(frozenset(members), truncated, ignored, failed)

    # ------------------------------------------------------------------ one question

    async def _ask(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> _Reply:
        """One question: UDP, then TCP if truncated, within `timeout`; NOERROR or NXDOMAIN only."""
        label = f"{name} {dns.rdatatype.to_text(rdtype)}"
        where, port = self.nameserver.host, self.nameserver.port
        family = dns.inet.af_for_address(where)
        backend = dns.asyncbackend.get_default_backend()
        truncated = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout

        async def exchange() -> dns.message.Message:
            nonlocal truncated
            use_edns = self.edns_payload is not None
            while True:
                query = _make_query(name, rdtype, self.edns_payload if use_edns else None)
                # asyncio.timeout below bounds the whole exchange; dnspython's own timeout stays off.
                # A connected socket: the kernel drops datagrams from elsewhere, and a closed port
                # (ICMP unreachable) fails at once instead of waiting for the timeout.
                sock: dns._asyncbackend.DatagramSocket = await backend.make_socket(  # type: ignore[no-untyped-call]
                    family, socket.SOCK_DGRAM, 0, None, (where, port))
                async with sock:
                    reply = await dns.asyncquery.udp(query, where, port=port, sock=sock,
                                                     ignore_unexpected=True, ignore_errors=True)
                if reply.flags & dns.flags.TC:
                    truncated = True
                    # dnspython parses ~30 µs per record: 1,000 records stalled the event loop for
                    # 38 ms inline, 11 ms at most from a thread (the agent keeps answering).
                    remaining = max(0.001, deadline - loop.time())
                    reply = await asyncio.to_thread(dns.query.tcp, query, where, remaining, port)
                if use_edns and reply.rcode() == dns.rcode.FORMERR:
                    use_edns = False  # an old server that does not speak EDNS: ask again without it
                    continue
                return reply

        try:
            async with asyncio.timeout_at(deadline):
                message = await exchange()
        except (TimeoutError, dns.exception.Timeout):
            how = " over TCP after a truncated UDP answer" if truncated else ""
            raise QueryTimeout(f"{label}: no answer{how} from {self.nameserver} within {self.timeout:g}s",
                               truncated=truncated) from None
        except (OSError, EOFError, dns.exception.DNSException) as e:
            raise QueryFailed(f"{label}: {type(e).__name__} talking to {self.nameserver}: {e}",
                              truncated=truncated) from None
        if not isinstance(message, dns.message.QueryMessage):
            raise QueryFailed(f"{label}: not an answer to a query", truncated=truncated)
        rcode = message.rcode()
        if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            raise QueryFailed(f"{label}: {self.nameserver} answered {dns.rcode.to_text(rcode)}",
                              truncated=truncated)
        try:
            chain = message.resolve_chaining()
        except dns.exception.DNSException as e:  # CNAME loop, answer with NXDOMAIN, bad question
            raise QueryFailed(f"{label}: unusable answer: {type(e).__name__}", truncated=truncated) from None
        return _Reply(rcode, chain.answer, message, truncated)


def _make_query(name: dns.name.Name, rdtype: dns.rdatatype.RdataType,
                edns_payload: int | None) -> dns.message.QueryMessage:
    if edns_payload is None:
        return dns.message.make_query(name, rdtype, use_edns=False)
    return dns.message.make_query(name, rdtype, use_edns=0, payload=edns_payload)


def _find(section: list[dns.rrset.RRset], name: dns.name.Name,
          rdtype: dns.rdatatype.RdataType) -> dns.rrset.RRset | None:
    for rrset in section:
        if rrset.name == name and rrset.rdtype == rdtype and rrset.rdclass == dns.rdataclass.IN:
            return rrset
    return None


def _addresses(rrset: dns.rrset.RRset | None) -> Iterable[str | None]:
    """The acceptable IPs of an A/AAAA rrset; None for each record that is not acceptable."""
    if rrset is None or rrset.rdtype not in (A, AAAA):
        return ()
    return [acceptable_ip(rdata.address) for rdata in rrset]


async def _gather_each(coros: list[Coroutine[Any, Any, _Reply]]) -> list[_Reply | ResolveError]:
    """Run the questions together; each gives its reply or its own failure (one failing question
    does not cancel the others: another family may still answer)."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, ResolveError):
            raise result
    return cast(list[_Reply | ResolveError], results)


def _failed_families(rdtypes: Sequence[dns.rdatatype.RdataType],
                     results: Sequence[_Reply | ResolveError]) -> tuple[tuple[str, str], ...]:
    """The families with a failed question (the first failure's message for each); raises that
    failure when every family failed somewhere: then the lookup has no complete family to use."""
    failed: dict[dns.rdatatype.RdataType, ResolveError] = {}
    for rdtype, result in zip(rdtypes, results, strict=True):
        if isinstance(result, ResolveError):
            failed.setdefault(rdtype, result)
    if failed and len(failed) == len(set(rdtypes)):
        raise next(iter(failed.values()))
    return tuple((dns.rdatatype.to_text(t), e.message) for t, e in failed.items())
