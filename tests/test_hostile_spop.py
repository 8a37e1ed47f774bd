"""Hostile SPOP peers on the agent's port, against the real product on loopback.

The agent under attack is the real one: `haproxy-swarm run` (HAProxy 2.6 with the shipped config and
the agent, MAX_CONNECTIONS=LIMIT), dnsmasq and three backends. Alongside every attack:
- a well-behaved SPOP connection (`Steady`) pipelines NOTIFYs back to back and checks each ACK: the
  same (stream-id, frame-id), a server that is a member; it must never be closed;
- HAProxy itself keeps sending its NOTIFYs for a bounded HTTP load (every user cookieless, so each
  request asks the agent): every request must get a 200.

Attacks: fuzzed frames (Hypothesis; differential against the sans-I/O state machine: the agent on the
wire must answer exactly what `spoa.protocol.Connection` says), each kind of malformed input with
the SPOP status it must be closed with, slow partial frames and missing HELLOs (the read deadline
closes them with TIMEOUT, and trickling bytes does not extend it), thousands of idle connections
(the connection limit closes the least recently active idle one first; client and agent stay within
their fd limits), silent connections filling the limit (newcomers refused with RESOURCE_ERROR until
the HELLO deadline frees the slots), a peer that never reads its ACKs (back-pressure: paused, not
buffered, and not timed out for our own pause). Memory is read from /proc/<agent>/status (VmRSS).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import resource
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spoa.local.load import Load
from spoa.local.stack import Stack
from spoa.member import Member
from spoa.protocol import (
    FLAG_FIN,
    Binary,
    Connection,
    Frame,
    FrameType,
    Notify,
    SetVar,
    Status,
    Value,
    decode_actions,
    decode_disconnect,
    decode_frame,
    decode_kv_list,
    encode_frame,
    encode_haproxy_hello,
    encode_kv_list,
    encode_message,
    encode_notify,
    split_frames,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

LIMIT = 150  # MAX_CONNECTIONS of the agent under attack
READ_TIMEOUT = 5.0  # the agent's read deadline (AgentServer's default)
RSS_GROWTH_MB = 25.0  # the agent's VmRSS may grow at most this much over the whole module


# --------------------------------------------------------------------------- a raw SPOP peer


class Peer:
    """HAProxy's side of SPOP over a blocking socket."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def frames(self, n: int) -> list[Frame]:
        out: list[Frame] = []
        while True:
            bodies, self.buf = split_frames(self.buf)
            out += [decode_frame(b) for b in bodies]
            if len(out) >= n or not self._read():
                return out

    def hello(self, **kwargs: object) -> dict[str, Value]:
        self.send(encode_haproxy_hello(**kwargs))  # type: ignore[arg-type]
        (frame,) = self.frames(1)
        assert frame.type == FrameType.AGENT_HELLO, frame
        return decode_kv_list(frame.payload)

    def until_eof(self) -> list[Frame]:
        while self._read():
            pass
        bodies, rest = split_frames(self.buf)
        assert rest == b"", f"the agent wrote a partial frame: {rest!r}"
        self.buf = b""
        return [decode_frame(b) for b in bodies]

    def disconnect(self) -> tuple[int, str]:
        """The AGENT-DISCONNECT that ends the connection: (status, message)."""
        frames = self.until_eof()
        assert frames and frames[-1].type == FrameType.AGENT_DISCONNECT, frames
        return decode_disconnect(frames[-1].payload)

    def close(self) -> None:
        self.sock.close()


def route(i: int) -> bytes:
    """The routing message as HAProxy sends it for a cookieless client 10.x.y.z."""
    return encode_message("route", {"sticky": None, "cookie": None, "header": None, "param": None,
                                    "src": ipaddress.IPv4Address(0x0A000000 + i % 2**24), "ssl": False})


def server_of(frame: Frame) -> bytes | None:
    for action in decode_actions(frame.payload):
        if isinstance(action, SetVar) and action.name == "server":
            assert isinstance(action.value, bytes)
            return action.value
    return None


class Steady(threading.Thread):
    """A well-behaved peer: NOTIFY, check the ACK, again, for as long as the module runs."""

    def __init__(self, port: int, servers: set[bytes]) -> None:
        super().__init__(name="steady-spop", daemon=True)
        self.peer = Peer(port)
        self.peer.hello()
        self.servers = servers
        self.acks = 0
        self.errors: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        fid = 0
        try:
            while not self.stopping.is_set():
                fid += 1
                self.peer.send(encode_notify(1, fid, route(fid)))
                frames = self.peer.frames(1)
                if not frames:
                    self.errors.append(f"closed by the agent after {self.acks} ACKs")
                    return
                (frame,) = frames
                if frame.type != FrameType.ACK or (frame.stream_id, frame.frame_id) != (1, fid):
                    self.errors.append(f"expected the ACK of (1, {fid}), got {frame}")
                    return
                if server_of(frame) not in self.servers:
                    self.errors.append(f"ACK {fid} names {server_of(frame)!r}, not a member")
                self.acks += 1
                time.sleep(0.001)  # pacing: a steady trickle of requests, not a synchronisation
        except Exception as e:  # reported by the tests through `errors`
            self.errors.append(f"{type(e).__name__}: {e}")

    def check(self, since: int) -> int:
        """Fail if anything went wrong; require ACKs since `since`; return the current count."""
        deadline = time.monotonic() + 5
        while self.acks <= since and not self.errors and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not self.errors, self.errors
        assert self.acks > since, "the well-behaved connection got no ACK"
        return self.acks


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Target:
    stack: Stack
    pid: int
    port: int
    steady: Steady
    load: Load
    rss_start: float

    def metric(self, name: str, **labels: str) -> float:
        return self.stack.metric(name, **labels)

    def http_ok_since(self, since: float) -> int:
        """Fail if any HTTP request sent since `since` (load clock) failed; return how many ran."""
        summary = self.load.summary(since=since)
        assert summary.failed == 0, summary
        return summary.sent


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    with Stack(n_slots=3, env={"MAX_CONNECTIONS": str(LIMIT)}) as stack:
        servers = {Member.parse(t.ip, t.port).server_name.encode() for t in stack.tasks}
        load = Load("127.0.0.1", stack.traffic_port, 100, rate=50, duration=110, cookieless=1.0,
                    network="127.7", prefix="hostile-spop")
        steady = Steady(stack.agent_port, servers)
        steady.start()
        load.start()
        try:
            pid = stack.agent_pid()
            assert pid is not None
            yield Target(stack, pid, stack.agent_port, steady, load, rss_mb(pid))
        finally:
            steady.stopping.set()
            steady.join(5)
            steady.peer.close()
            summary = load.stop()
        assert summary.failed == 0, summary
        assert stack.agent_pid() == pid, "the agent was restarted"


# --------------------------------------------------------------------------- fuzzed frames


VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
    st.binary(max_size=300), st.binary(max_size=300).map(Binary), st.text(max_size=50),
    st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address), st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address),
)
ARG_NAMES = st.one_of(st.sampled_from(["sticky", "cookie", "header", "param", "src", "ssl"]), st.text(max_size=8))
IDS = st.one_of(st.integers(0, 300), st.sampled_from([239, 240, 2**32, 2**63, 2**64 - 1]))


@st.composite
def notify_frames(draw: st.DrawFn) -> bytes:
    args = draw(st.dictionaries(ARG_NAMES, VALUES, max_size=7))
    name = draw(st.sampled_from(["route", "route", "other", ""]))
    return encode_notify(draw(IDS), draw(IDS), encode_message(name, args))


@st.composite
def any_frames(draw: st.DrawFn) -> bytes:
    ftype = draw(st.one_of(st.sampled_from([0, 1, 2, 3, 101, 102, 103]), st.integers(0, 255)))
    flags = draw(st.sampled_from([FLAG_FIN, FLAG_FIN, 0, 2, 3, 0xFFFFFFFF]))
    payload = draw(st.one_of(st.binary(max_size=200),
                             st.dictionaries(st.text(max_size=20), VALUES, max_size=4).map(encode_kv_list)))
    return encode_frame(ftype, draw(IDS), draw(IDS), payload, flags)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    buf = bytearray(draw(st.one_of(notify_frames(), any_frames())))
    for _ in range(draw(st.integers(1, 4))):
        if not buf:
            break
        i = draw(st.integers(0, len(buf) - 1))
        op = draw(st.sampled_from(["set", "insert", "delete", "truncate"]))
        if op == "set":
            buf[i] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xEF, 0xF0, 0xFF]))
        elif op == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del buf[i : i + draw(st.integers(1, 8))]
        else:
            del buf[i:]
    return bytes(buf)


STREAMS = st.lists(st.one_of(notify_frames(), any_frames(), mutated(), st.binary(min_size=1, max_size=64)),
                   min_size=1, max_size=5).map(b"".join)


def expected(stream: bytes) -> tuple[list[tuple[int, int, int]], int | None]:
    """What the state machine says the agent answers after a HELLO: the (type, stream-id, frame-id) of
    every frame, and the AGENT-DISCONNECT status (None when the connection stays open)."""
    conn = Connection(max_frame_size=16380)
    conn.receive_data(encode_haproxy_hello())
    conn.data_to_send()
    events = conn.receive_data(stream)
    frames = [(int(FrameType.ACK), e.stream_id, e.frame_id) for e in events if type(e) is Notify]
    if not conn.closed:
        return frames, None
    (body,), _ = split_frames(conn.data_to_send())
    kv = decode_kv_list(decode_frame(body).payload)
    status = kv["status-code"]
    assert isinstance(status, int)
    return [*frames, (int(FrameType.AGENT_DISCONNECT), 0, 0)], status


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=STREAMS)
def test_fuzzed_frames_get_exactly_the_answers_of_the_state_machine(target: Target, stream: bytes) -> None:
    want, status = expected(stream)
    peer = Peer(target.port)
    try:
        peer.hello()
        with contextlib.suppress(OSError):  # the agent may close before reading it all
            peer.send(stream)
            peer.sock.shutdown(socket.SHUT_WR)  # EOF: a stream left open ends here
        got = peer.until_eof()
    finally:
        peer.close()
    assert [(f.type, f.stream_id, f.frame_id) for f in got] == want
    if status is not None:
        kv = decode_kv_list(got[-1].payload)
        assert kv["status-code"] == status and kv["message"]
    for frame in got:
        if frame.type == FrameType.ACK:
            assert server_of(frame) in target.steady.servers | {None}


def test_fuzzing_left_no_agent_error_and_others_kept_their_answers(target: Target) -> None:
    assert target.metric("haproxy_swarm_handler_errors_total") == 0
    target.steady.check(0)
    assert target.http_ok_since(0) > 0
    assert target.stack.agent_pid() == target.pid


# --------------------------------------------------------------------------- each misbehaviour, its status


def hello(**items: Value) -> bytes:
    return encode_frame(FrameType.HAPROXY_HELLO, 0, 0, encode_kv_list(items))


VERSIONS: dict[str, Value] = {"supported-versions": "2.0", "max-frame-size": 16380, "capabilities": "pipelining"}
BIG = 16380


@pytest.mark.parametrize(("name", "before_hello", "data", "status"), [
    ("length above max-frame-size", False, (BIG + 1).to_bytes(4, "big") + b"\x03", Status.TOO_BIG),
    ("length 2**32-1 before HELLO", True, b"\xff\xff\xff\xff", Status.TOO_BIG),
    ("NOTIFY before HELLO", True, encode_notify(1, 1, route(1)), Status.INVALID),
    ("HELLO twice", False, encode_haproxy_hello(), Status.INVALID),
    ("an agent's frame type from HAProxy", False, encode_frame(FrameType.ACK, 1, 1, b""), Status.INVALID),
    ("truncated metadata", False, b"\x00\x00\x00\x02\x03\x00", Status.INVALID),
    ("string running past its frame", False,
     encode_frame(FrameType.NOTIFY, 1, 1, b"\x05route\x01\x03src\x08\x7f"), Status.INVALID),
    ("fragmented NOTIFY (no FIN)", False, encode_frame(FrameType.NOTIFY, 1, 1, route(1), flags=0),
     Status.FRAGMENTATION_NOT_SUPPORTED),
    ("HELLO without supported-versions", True,
     hello(**{k: v for k, v in VERSIONS.items() if k != "supported-versions"}), Status.NO_VERSION),
    ("HELLO without max-frame-size", True,
     hello(**{k: v for k, v in VERSIONS.items() if k != "max-frame-size"}), Status.NO_FRAME_SIZE),
    ("HELLO without capabilities", True,
     hello(**{k: v for k, v in VERSIONS.items() if k != "capabilities"}), Status.NO_CAPABILITIES),
    ("HELLO offering SPOP 1.0 only", True, hello(**(VERSIONS | {"supported-versions": "1.0"})), Status.BAD_VERSION),
    ("HELLO with max-frame-size 100", True, hello(**(VERSIONS | {"max-frame-size": 100})), Status.BAD_FRAME_SIZE),
])
def test_each_misbehaviour_is_closed_with_its_status(target: Target, name: str, before_hello: bool,
                                                     data: bytes, status: Status) -> None:
    acks = target.steady.acks
    errors_before = target.metric("haproxy_swarm_spop_protocol_errors_total", status=str(int(status)))
    peer = Peer(target.port)
    try:
        if not before_hello:
            peer.hello()
        peer.send(data)
        got, message = peer.disconnect()
    finally:
        peer.close()
    assert got == status, f"{name}: status {got} ({message})"
    assert message
    assert target.metric("haproxy_swarm_spop_protocol_errors_total", status=str(int(status))) == errors_before + 1
    target.steady.check(acks)


def test_a_frame_above_the_negotiated_size_is_too_big(target: Target) -> None:
    peer = Peer(target.port)
    try:
        answer = peer.hello(max_frame_size=1024)
        assert answer["max-frame-size"] == 1024
        peer.send(encode_notify(1, 1, route(1)))  # fits: answered
        (ack,) = peer.frames(1)
        assert ack.type == FrameType.ACK
        peer.send(encode_notify(1, 2, encode_message("route", {"header": b"x" * 2000})))
        status, message = peer.disconnect()
    finally:
        peer.close()
    assert status == Status.TOO_BIG and "1024" in message


# --------------------------------------------------------------------------- slow peers


def test_slow_partial_frames_and_missing_hellos_hit_the_read_deadline(target: Target) -> None:
    """Silent, half a HELLO, half a NOTIFY, and a NOTIFY trickled a byte every 0.4 s: each is closed
    with TIMEOUT READ_TIMEOUT s after its partial frame began; trickling does not extend it."""
    since = target.load.now()
    acks = target.steady.acks
    timeouts_before = target.metric("haproxy_swarm_spop_protocol_errors_total", status="2")
    hello_bytes = encode_haproxy_hello()
    notify = encode_notify(1, 1, route(7))
    peers: list[tuple[str, Peer, float]] = []  # (kind, peer, when its partial frame began)
    trickled: list[tuple[Peer, bytes]] = []
    try:
        # `began` is read before the agent can start each deadline (the HELLO's runs from the accept,
        # a partial frame's from its first bytes), so a preempted test thread only makes it earlier.
        for i in range(5):
            began = time.monotonic()
            peers.append(("silent", Peer(target.port), began))
            began = time.monotonic()
            p = Peer(target.port)
            p.send(hello_bytes[: 10 + i])
            peers.append(("half a HELLO", p, began))
            p = Peer(target.port)
            p.hello()
            began = time.monotonic()
            p.send(notify[: 5 + i])
            peers.append(("half a NOTIFY", p, began))
            p = Peer(target.port)
            p.hello()
            began = time.monotonic()
            p.send(notify[:1])
            peers.append(("trickled NOTIFY", p, began))
            trickled.append((p, notify[1:]))
        # Trickle one byte every 0.4 s (never the whole frame) until the agent closes them.
        sel = selectors.DefaultSelector()
        for _, p, _ in peers:
            p.sock.setblocking(False)
            sel.register(p.sock, selectors.EVENT_READ, p)
        closed: dict[Peer, float] = {}
        deadline = time.monotonic() + READ_TIMEOUT + 5
        next_trickle = time.monotonic() + 0.4
        while len(closed) < len(peers) and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.05):
                p = key.data
                if not p._read():
                    closed[p] = time.monotonic()
                    sel.unregister(p.sock)
            if time.monotonic() >= next_trickle:
                next_trickle += 0.4
                for i, (p, rest) in enumerate(trickled):
                    if p not in closed and len(rest) > 1:
                        with contextlib.suppress(OSError):
                            p.sock.send(rest[:1])
                        trickled[i] = (p, rest[1:])
        sel.close()
        assert len(closed) == len(peers), f"{len(peers) - len(closed)} slow peers still open"
        for kind, p, began in peers:
            frames = [decode_frame(b) for b in split_frames(p.buf)[0]]
            assert frames and frames[-1].type == FrameType.AGENT_DISCONNECT, kind
            kv = decode_kv_list(frames[-1].payload)
            assert kv["status-code"] == Status.TIMEOUT, (kind, kv)
            waited = closed[p] - began
            assert READ_TIMEOUT - 0.05 <= waited <= READ_TIMEOUT + 2.0, f"{kind}: closed after {waited:.2f} s"
    finally:
        for _, p, _ in peers:
            p.close()
    assert target.metric("haproxy_swarm_spop_protocol_errors_total", status="2") == timeouts_before + len(peers)
    target.steady.check(acks)
    assert target.http_ok_since(since) > 0


def test_random_ids_and_values_from_many_peers_at_once(target: Target) -> None:
    """Forty peers pipelining 50 NOTIFYs each with random ids, in random chunk sizes: every NOTIFY gets
    exactly one ACK with its ids, naming a member."""
    rng = random.Random(7)
    peers = []
    try:
        for _ in range(40):
            p = Peer(target.port)
            p.hello()
            ids = [(rng.randrange(2**32), rng.randrange(2**32)) for _ in range(50)]
            stream = b"".join(encode_notify(s, f, route(rng.randrange(2**24))) for s, f in ids)
            pos = 0
            while pos < len(stream):
                step = rng.randrange(1, 400)
                p.send(stream[pos : pos + step])
                pos += step
            peers.append((p, ids))
        for p, ids in peers:
            frames = p.frames(len(ids))
            assert sorted((f.stream_id, f.frame_id) for f in frames) == sorted(ids)
            assert all(server_of(f) in target.steady.servers for f in frames)
    finally:
        for p, _ in peers:
            p.close()


# --------------------------------------------------------------------------- back-pressure


FLOOD_CAP = 64 << 20  # bytes of NOTIFYs: an agent that never stops reading would take them all


def test_a_peer_that_stops_reading_is_paused_not_buffered(target: Target) -> None:
    """A peer pipelines NOTIFYs and never reads its ACKs: the agent stops reading it (what waits
    stays in the kernel's socket buffers, not in the agent's memory), keeps the connection for longer
    than the read deadline (that wait is the agent's, not the peer's), answers the others meanwhile,
    and once the peer reads again delivers every ACK in order."""
    acks, since = target.steady.acks, target.load.now()
    rss_before = rss_mb(target.pid)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # a small window for the ACKs
    sock.connect(("127.0.0.1", target.port))
    peer = Peer.__new__(Peer)
    peer.sock, peer.buf, peer.eof = sock, b"", False
    sock.settimeout(10)
    try:
        peer.hello()
        batch = b"".join(encode_notify(1, fid, route(fid)) for fid in range(1, 1001))
        sock.setblocking(False)
        sent = frames = 0
        pending = memoryview(b"")
        with selectors.DefaultSelector() as writable:
            writable.register(sock, selectors.EVENT_WRITE)
            # Send until the socket stays full for half a second: the agent stopped reading.
            while sent < FLOOD_CAP and writable.select(0.5):
                if not pending:
                    pending = memoryview(batch)
                    frames += 1000
                with contextlib.suppress(BlockingIOError):
                    n = sock.send(pending)
                    sent += n
                    pending = pending[n:]
        assert sent < FLOOD_CAP, f"the agent read {sent >> 20} MiB without anyone reading its ACKs"
        grown = rss_mb(target.pid) - rss_before
        print(f"\nback-pressure: the agent stopped reading after {sent / 2**20:.1f} MiB ({frames:,} NOTIFYs "
              f"sent in part or whole); its RSS grew {grown:.1f} MB")
        assert grown < 16, f"the agent buffered {grown:.1f} MiB for a peer that does not read"

        # Paused longer than the read deadline: a partial frame left unread is not the peer's fault.
        time.sleep(READ_TIMEOUT + 1)  # the condition is the passing of time itself
        target.steady.check(acks)
        assert target.http_ok_since(since) > 0

        # The peer reads again: the rest of its NOTIFYs go through and every ACK arrives, in order.
        got: list[Frame] = []
        reader = threading.Thread(target=lambda: got.extend(peer.frames(frames)), daemon=True)
        sock.setblocking(True)
        sock.settimeout(20)
        reader.start()
        try:
            sock.sendall(pending)
        except OSError as e:
            pytest.fail(f"the agent closed the connection it had paused itself: {e}")
        reader.join(30)
        assert not reader.is_alive() and not peer.eof, f"{len(got)} of {frames} ACKs, then the agent closed"
        assert [f.type for f in got] == [FrameType.ACK] * frames
        assert [f.frame_id for f in got] == [fid for _ in range(frames // 1000) for fid in range(1, 1001)]
        assert all(server_of(f) in target.steady.servers for f in got[::97])
    finally:
        peer.close()
    assert target.metric("haproxy_swarm_handler_errors_total") == 0


# --------------------------------------------------------------------------- the connection limit


def test_thousands_of_idle_connections_close_the_oldest_idle_first(target: Target) -> None:
    """3,000 connections, each past its HELLO and then idle, opened one after the other: the agent
    never holds more than LIMIT; each newcomer closes the least recently active idle one (status 0,
    "connection limit"), so the flood's own connections close in the order they were opened, while
    the well-behaved connection (always recently active) keeps its answers."""
    total = 3000
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft > LIMIT + 200, f"ulimit -n {soft} is too small for this test"
    since = target.load.now()
    acks = target.steady.acks
    sel = selectors.DefaultSelector()
    open_peers: dict[int, Peer] = {}
    closed_order: list[int] = []
    statuses: dict[int, tuple[int, str]] = {}
    peak_agent_fds = peak_client = 0

    def drain(timeout: float = 0.0) -> None:
        for key, _ in sel.select(timeout):
            i, p = key.data
            if not p._read():
                sel.unregister(p.sock)
                frames = [decode_frame(b) for b in split_frames(p.buf)[0]]
                kv = decode_kv_list(frames[-1].payload) if frames else {}
                message = kv.get("message")
                statuses[i] = (int(kv.get("status-code", -1)),  # type: ignore[arg-type]
                               message.decode() if isinstance(message, bytes) else "")
                closed_order.append(i)
                p.close()
                del open_peers[i]

    try:
        for i in range(total):
            p = Peer(target.port)
            p.hello()
            p.sock.setblocking(False)
            open_peers[i] = p
            sel.register(p.sock, selectors.EVENT_READ, (i, p))
            drain()
            peak_client = max(peak_client, len(open_peers))
            assert len(open_peers) < LIMIT + 100, "connections beyond the limit were not closed"
            if i % 100 == 0:
                peak_agent_fds = max(peak_agent_fds, fds(target.pid))
        end = time.monotonic() + 5
        while time.monotonic() < end and len(open_peers) > LIMIT:
            drain(0.05)
        connections = target.metric("haproxy_swarm_spop_connections")
        assert connections <= LIMIT
        # The flood's closures: all with the limit's status, oldest first.
        assert closed_order, "nothing was closed"
        assert all(statuses[i] == (Status.NORMAL, "connection limit reached") for i in closed_order), \
            {statuses[i] for i in closed_order}
        assert max(closed_order) < min(open_peers), "a newer idle connection was closed before an older one"
        assert sorted(closed_order) == list(range(len(closed_order)))
        assert len(closed_order) >= total - LIMIT
        assert peak_agent_fds <= LIMIT + 40, f"the agent held {peak_agent_fds} fds"
        target.steady.check(acks)
        assert target.http_ok_since(since) > 0
    finally:
        sel.close()
        for p in open_peers.values():
            p.close()
    assert rss_mb(target.pid) - target.rss_start < RSS_GROWTH_MB
    print(f"\n{total} idle connections, limit {LIMIT}: {len(closed_order)} closed oldest first, "
          f"client peak {peak_client} sockets, agent peak {peak_agent_fds} fds, "
          f"RSS {target.rss_start:.1f} -> {rss_mb(target.pid):.1f} MB")


def test_silent_connections_filling_the_limit_cost_newcomers_only_until_the_hello_deadline(target: Target) -> None:
    """Connections that never send a HELLO are not idle (closing one could lose a HELLO in flight),
    so when they fill the limit the newcomers - HAProxy's too - are refused with RESOURCE_ERROR until
    the HELLO deadline closes the silent ones. HAProxy balances on its own meanwhile: no HTTP request
    fails, and the agent decides again afterwards. (The bound of what an unauthenticated peer on the
    agent's port can do: see docs/security.md.) Runs last: the well-behaved connection may be closed
    by the limit here, like any idle one."""
    target.steady.check(0)
    target.steady.stopping.set()
    target.steady.join(5)
    since = target.load.now()
    peers: list[Peer] = []
    try:
        for _ in range(LIMIT + 30):
            p = Peer(target.port)
            p.sock.setblocking(False)
            peers.append(p)
        pending = list(peers)
        refused = 0
        deadline = time.monotonic() + 5
        while refused < 30:  # at most LIMIT can be admitted: at least 30 newcomers must be refused
            assert time.monotonic() < deadline, f"only {refused} newcomers refused"
            for p in list(pending):
                try:
                    data = p.sock.recv(65536)
                except BlockingIOError:
                    continue
                pending.remove(p)
                p.buf = data
                p.sock.setblocking(True)
                p.sock.settimeout(5)
                status, message = p.disconnect()
                assert status == Status.RESOURCE_ERROR and "too many" in message, (status, message)
                refused += 1
            time.sleep(0.01)
        # The HELLO deadline frees the admitted ones (any still pending newcomer is refused).
        timeouts = 0
        for p in pending:
            p.sock.setblocking(True)
            p.sock.settimeout(READ_TIMEOUT + 3)
            status, _ = p.disconnect()
            assert status in (Status.TIMEOUT, Status.RESOURCE_ERROR)
            timeouts += status == Status.TIMEOUT
        assert 0 < timeouts <= LIMIT
    finally:
        for p in peers:
            p.close()
    peer = Peer(target.port)
    try:
        peer.hello()
        peer.send(encode_notify(1, 1, route(1)))
        (ack,) = peer.frames(1)
        assert server_of(ack) in target.steady.servers
    finally:
        peer.close()
    before = target.metric("haproxy_swarm_decisions_total")
    deadline = time.monotonic() + 10
    while target.metric("haproxy_swarm_decisions_total") <= before + 1:
        assert time.monotonic() < deadline, "HAProxy did not come back to the agent"
        time.sleep(0.05)
    assert target.http_ok_since(since) > 0
    assert target.metric("haproxy_swarm_handler_errors_total") == 0
    assert rss_mb(target.pid) - target.rss_start < RSS_GROWTH_MB
