"""An in-process DNS server for unit tests: real UDP and TCP sockets on loopback, real wire format.

Built with dnspython's message parsing and rendering, so the resolver under test talks real DNS:
truncation sets the TC bit and cuts the answer the way servers do, timeouts are a server that
stays silent, NXDOMAIN is an rcode. It runs in the test's event loop. Not a fake resolver object.

    async with DNSResponder() as dns_server:
        dns_server.set("tasks.backend", "A", ["10.0.0.1", "10.0.0.2"])
        dns_server.address   # HostPort to give the resolver
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from spoa.config import HostPort

Mode = Literal["answer", "drop", "servfail", "refused", "formerr-edns", "garbage"]


@dataclass
class Seen:
    """One query as received."""

    transport: Literal["udp", "tcp"]
    name: str
    rdtype: str
    edns: int


@dataclass
class DNSResponder:
    host: str = "127.0.0.1"
    #: (absolute lower-case name, rdtype) → rdata texts
    records: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    mode: Mode = "answer"
    tcp_mode: Mode | None = None  # None: as `mode`
    udp_max: int = 1232  # the most we send over UDP even if the client offers more (like dnsmasq)
    shuffle: bool = False  # answer records in a random order
    srv_additional: bool = True  # put SRV targets' addresses in the additional section
    extra_answer: list[dns.rrset.RRset] = field(default_factory=list)  # stray rrsets added to answers
    #: questions answered SERVFAIL: "name." (any type) or "name./TYPE" (absolute, lower case)
    servfail: set[str] = field(default_factory=set)
    #: one question's mode, overriding `mode`: "name./TYPE" (absolute, lower case) → mode, e.g.
    #: {"tasks.backend./AAAA": "refused"} for a forwarder that refuses AAAA and answers A
    question_mode: dict[str, Mode] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # ------------------------------------------------------------------ records

    @staticmethod
    def _key(name: str, rdtype: str) -> tuple[str, str]:
        return (dns.name.from_text(name).to_text().lower(), rdtype.upper())

    def set(self, name: str, rdtype: str, rdatas: Iterable[str]) -> None:
        self.records[self._key(name, rdtype)] = list(rdatas)

    def delete(self, name: str) -> None:
        absolute = dns.name.from_text(name).to_text().lower()
        for key in [k for k in self.records if k[0] == absolute]:
            del self.records[key]

    @property
    def address(self) -> HostPort:
        return HostPort(self.host, self.port)

    def count(self, transport: str) -> int:
        return sum(1 for s in self.seen if s.transport == transport)

    # ------------------------------------------------------------------ answering

    def _exists(self, name: str) -> bool:
        return any(k[0] == name for k in self.records)

    def _rrset(self, name: str, rdtype: str) -> dns.rrset.RRset | None:
        rdatas = self.records.get((name, rdtype))
        if not rdatas:
            return None
        if self.shuffle:
            rdatas = random.sample(rdatas, len(rdatas))
        return dns.rrset.from_text_list(name, 600, "IN", rdtype, rdatas)

    def respond(self, query: dns.message.Message, mode: Mode) -> dns.message.Message | None:
        """The answer to `query` (None: say nothing)."""
        if mode == "drop":
            return None
        response = dns.message.make_response(query)
        if mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        if mode == "refused":
            response.set_rcode(dns.rcode.REFUSED)
            return response
        if mode == "formerr-edns" and query.edns >= 0:
            response = dns.message.make_response(query)
            response.use_edns(False)
            response.set_rcode(dns.rcode.FORMERR)
            return response
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        for _ in range(8):  # follow CNAMEs the way an authoritative server does
            cname = self._rrset(name, "CNAME")
            if cname is None or rdtype == "CNAME":
                break
            response.answer.append(cname)
            name = next(iter(cname)).target.to_text().lower()
        rrset = self._rrset(name, rdtype)
        if rrset is not None:
            response.answer.append(rrset)
            if rdtype == "SRV" and self.srv_additional:
                for rdata in rrset:
                    target = rdata.target.to_text().lower()
                    for kind in ("A", "AAAA"):
                        extra = self._rrset(target, kind)
                        if extra is not None and extra not in response.additional:
                            response.additional.append(extra)
        elif not self._exists(name) and not response.answer:
            response.set_rcode(dns.rcode.NXDOMAIN)
        response.answer.extend(self.extra_answer)
        return response

    def _udp_wire(self, query: dns.message.Message, response: dns.message.Message) -> bytes:
        limit = min(max(512, query.payload if query.edns >= 0 else 512), self.udp_max)
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            pass
        # Truncate the way servers do: as many records as fit, the TC bit set.
        records = [(rrset, rdata) for rrset in response.answer for rdata in rrset]
        lo, hi = 0, len(records)
        best = b""
        while lo <= hi:
            mid = (lo + hi) // 2
            cut = dns.message.make_response(query)
            cut.flags |= dns.flags.TC
            for rrset, rdata in records[:mid]:
                cut.find_rrset(cut.answer, rrset.name, rrset.rdclass, rrset.rdtype, create=True).add(
                    rdata, rrset.ttl)
            try:
                best = cut.to_wire(max_size=limit)
                lo = mid + 1
            except dns.exception.TooBig:
                hi = mid - 1
        return best

    def _handle(self, wire: bytes, transport: Literal["udp", "tcp"]) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        question = query.question[0]
        self.seen.append(Seen(transport, question.name.to_text().lower(),
                              dns.rdatatype.to_text(question.rdtype), query.edns))
        mode = self.mode if transport == "udp" or self.tcp_mode is None else self.tcp_mode
        if {self.seen[-1].name, f"{self.seen[-1].name}/{self.seen[-1].rdtype}"} & self.servfail:
            mode = "servfail"
        mode = self.question_mode.get(f"{self.seen[-1].name}/{self.seen[-1].rdtype}", mode)
        if mode == "garbage":
            return wire[:2] + b"\x81\x80" + b"\xff" * 20  # our id, a response, and then nonsense
        response = self.respond(query, mode)
        if response is None:
            return None
        if transport == "udp":
            return self._udp_wire(query, response)
        return response.to_wire(max_size=65535)  # over TCP the EDNS payload size does not apply

    # ------------------------------------------------------------------ sockets

    async def start(self) -> DNSResponder:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        responder = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                # (3.11's selector transport is not a DatagramTransport subclass; it behaves as one)
                self.transport = cast(asyncio.DatagramTransport, transport)

            def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
                out = responder._handle(data, "udp")
                if out is not None:
                    self.transport.sendto(out, addr)

        for _ in range(20):
            udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=(self.host, self.port),
                                                              family=family)
            port = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port, family=family)
            except OSError:
                udp.close()
                continue
            self._udp, self.port = udp, port
            return self
        raise OSError(f"no port free for both UDP and TCP on {self.host}")

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readexactly(2)
                wire = await reader.readexactly(struct.unpack("!H", head)[0])
                out = self._handle(wire, "tcp")
                if out is not None:
                    writer.write(struct.pack("!H", len(out)) + out)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for writer in list(self._writers):
                writer.close()
            with contextlib.suppress(Exception):
                await self._tcp.wait_closed()
            self._tcp = None

    async def __aenter__(self) -> DNSResponder:
        return await self.start()

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
