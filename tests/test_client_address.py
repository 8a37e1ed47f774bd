"""The client's address from trusted proxies: X-Forwarded-For and the PROXY protocol (TRUSTED_PROXIES).

Real HAProxy (the shipped config, HAPROXY_BIN), real dnsmasq and backends, `haproxy-swarm run` with
STICKY_KEY=src, so where a request lands says which address HAProxy took for its client; the task
echoes the X-Real-IP and X-Forwarded-For it received (`X-Echo: 1`), which says it directly.
127.0.0.9 plays the trusted proxy; every other loopback address is an ordinary client.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import string
import struct
import zlib
from collections.abc import Iterator

import pytest

from spoa.local.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

PROXY = "127.0.0.9"
TRUSTED = ipaddress.ip_network("127.0.0.9/32")


@pytest.fixture(scope="module")
def xff() -> Iterator[Stack]:
    with Stack(n_slots=3, env={"STICKY_KEY": "src", "TRUSTED_PROXIES": PROXY}) as s:
        yield s


@pytest.fixture(scope="module")
def proxied() -> Iterator[Stack]:
    env = {"STICKY_KEY": "src", "TRUSTED_PROXIES": PROXY, "CLIENT_ADDRESS_FROM": "proxy-protocol,x-forwarded-for"}
    with Stack(n_slots=3, env=env) as s:
        yield s


class Reply:
    def __init__(self, raw: bytes) -> None:
        head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        self.status = int(head[0].split()[1])
        self.headers: dict[str, str] = {}
        for name, _, value in (line.partition(":") for line in head[1:]):
            key = name.strip().lower()  # a header sent twice: its values in order, as one list
            self.headers[key] = f"{self.headers[key]}, {value.strip()}" if key in self.headers else value.strip()

    @property
    def served_by(self) -> str | None:
        return self.headers.get("x-served-by")

    @property
    def real_ip(self) -> str | None:
        return self.headers.get("x-echo-x-real-ip")

    @property
    def forwarded_for(self) -> str | None:
        return self.headers.get("x-echo-x-forwarded-for")


def read_reply(sock: socket.socket) -> Reply | None:
    """One HTTP response, or None when HAProxy closed the connection without one."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return Reply(data)


def request(headers: dict[str, str] | None = None) -> bytes:
    lines = ["GET / HTTP/1.1", "Host: test", "X-Echo: 1", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def connect(stack: Stack, source: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", stack.traffic_port), timeout=5, source_address=(source, 0))
    return sock


def get(stack: Stack, source: str, headers: dict[str, str] | None = None, prefix: bytes = b"") -> Reply | None:
    with connect(stack, source) as sock:
        sock.sendall(prefix + request(headers))
        return read_reply(sock)


_tables: dict[int, dict[str, str]] = {}


def task_for(stack: Stack, address: str) -> str:
    """Where the agent's table sends the key `src` = address (its slot, as HAProxy computes it).
    The table is read from HAProxy once per stack: its members do not change in this module."""
    table = _tables.get(id(stack))
    if table is None:
        table = _tables[id(stack)] = stack.map_entries(f"{stack.run_dir}/slots.map")
    slot = zlib.crc32(ipaddress.ip_address(address).packed) >> 16
    ip, _, port = table[str(slot)].rpartition("_")
    return f"{ip}:{port}"


def ok(reply: Reply | None) -> Reply:
    assert reply is not None, "HAProxy closed the connection"
    assert reply.status == 200, reply.status
    return reply


# --------------------------------------------------------------------------- X-Forwarded-For


def test_untrusted_peers_headers_change_nothing(xff: Stack) -> None:
    client = "127.4.0.1"
    plain = ok(get(xff, client))
    assert plain.real_ip == client and plain.forwarded_for == client
    forged = ok(get(xff, client, {"X-Forwarded-For": "1.2.3.4", "X-Real-IP": "5.6.7.8"}))
    assert forged.served_by == plain.served_by == task_for(xff, client), "the user did not move"
    assert forged.real_ip == client, "a forged X-Real-IP is replaced"
    assert forged.forwarded_for == f"1.2.3.4, {client}", "the peer's address is appended, never replaced"


def test_a_trusted_proxy_gives_the_client_address(xff: Stack) -> None:
    client = "127.5.0.7"
    direct = ok(get(xff, client))
    via = ok(get(xff, PROXY, {"X-Forwarded-For": client}))
    assert via.real_ip == client
    assert via.served_by == direct.served_by == task_for(xff, client), "the same task as the client directly"
    assert via.forwarded_for == f"{client}, {PROXY}"
    # Two trusted hops: the right-most address that is not itself trusted; to the left of it, the client's own word.
    hops = ok(get(xff, PROXY, {"X-Forwarded-For": f"6.6.6.6, {client}, {PROXY}"}))
    assert hops.real_ip == client and hops.served_by == direct.served_by
    # The header twice: its values in order, the last line's right-most.
    with connect(xff, PROXY) as sock:
        second = f"\r\nX-Forwarded-For: {client}\r\n\r\n".encode()
        sock.sendall(request({"X-Forwarded-For": "6.6.6.6"}).replace(b"\r\n\r\n", second))
        twice = ok(read_reply(sock))
    assert twice.real_ip == client


def test_keep_alive_from_a_trusted_proxy_takes_each_requests_own_client(xff: Stack) -> None:
    """A proxy multiplexes its clients over one connection: the address is per request."""
    with connect(xff, PROXY) as sock:
        seen = []
        for client in ("127.5.1.1", "127.5.1.2", "127.5.1.3", "127.5.1.1"):
            sock.sendall(request({"X-Forwarded-For": client}))
            reply = ok(read_reply(sock))
            seen.append(reply.real_ip)
            assert reply.served_by == task_for(xff, client)
    assert seen == ["127.5.1.1", "127.5.1.2", "127.5.1.3", "127.5.1.1"]


def random_address(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return str(ipaddress.IPv6Address(rng.getrandbits(128)))
    return str(ipaddress.IPv4Address(rng.getrandbits(32)))


def expected_client(peer: str, values: list[str]) -> str:
    """The rule: from a trusted peer, walk X-Forwarded-For from the right while the address taken so
    far is trusted (three hops at most)."""
    client = peer
    for hop in range(1, 4):
        if ipaddress.ip_address(client) not in TRUSTED or hop > len(values):
            break
        client = values[-hop]
    return client


def test_two_hundred_random_forwarded_for_values(xff: Stack) -> None:
    rng = random.Random(17)
    garbage_alphabet = string.ascii_letters + " ,;=-_/\\\"'()[]{}<>!?*&%$#@~^|`"  # no digit, no ':'
    for i in range(200):
        if i % 2:
            values = [random_address(rng) for _ in range(rng.randint(1, 5))]
            if rng.random() < 0.5:
                values.append(PROXY)  # a second trusted hop
            header = ", ".join(values)
        else:
            header = "".join(rng.choice(garbage_alphabet) for _ in range(rng.randint(1, 3000))).strip() or "x"
            values = []
        for peer in (PROXY, "127.4.0.2"):
            reply = ok(get(xff, peer, {"X-Forwarded-For": header}))
            want = expected_client(peer, values) if values else peer
            assert reply.real_ip == want, (peer, header[:200], reply.real_ip)
            assert reply.served_by == task_for(xff, want), (peer, header[:200])


# --------------------------------------------------------------------------- the PROXY protocol


def proxy_v1(source: str, port: int = 40000) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 {port} 8099\r\n".encode()


def proxy_v2(source: str, port: int = 40000) -> bytes:
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    addresses = socket.inet_aton(source) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", port, 8099)
    return signature + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


@pytest.mark.parametrize("header", [proxy_v1, proxy_v2], ids=["v1", "v2"])
def test_proxy_protocol_from_a_trusted_peer(proxied: Stack, header: object) -> None:
    assert callable(header)
    client = "127.6.0.3"
    reply = ok(get(proxied, PROXY, prefix=header(client)))
    assert reply.real_ip == client
    assert reply.served_by == task_for(proxied, client)
    assert reply.forwarded_for == client, "the connection's address is the PROXY header's source"


def test_a_bad_or_missing_proxy_header_closes_that_connection_only(proxied: Stack) -> None:
    with connect(proxied, PROXY) as good:
        good.sendall(proxy_v1("127.6.0.4") + request())
        assert ok(read_reply(good)).real_ip == "127.6.0.4"
        for bad in (b"", b"PROXY TCP4 not-an-address 127.0.0.1 1 2\r\n", b"PROXY UNKNOWN-JUNK\r\n",
                    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff", b"PROXY TCP4 127.6.0.5\r\n"):
            assert get(proxied, PROXY, prefix=bad) is None, bad
        # The good connection goes on.
        good.sendall(request())
        assert ok(read_reply(good)).real_ip == "127.6.0.4"


def test_a_proxy_header_from_an_untrusted_peer_is_refused(proxied: Stack) -> None:
    reply = get(proxied, "127.4.0.3", prefix=proxy_v1("127.6.0.6"))
    assert reply is not None and reply.status == 400
    plain = ok(get(proxied, "127.4.0.3", {"X-Forwarded-For": "127.6.0.6"}))
    assert plain.real_ip == "127.4.0.3" and plain.served_by == task_for(proxied, "127.4.0.3")
