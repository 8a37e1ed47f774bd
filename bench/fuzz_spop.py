"""SPOP fuzzing (not a test): fuzzed and mutated frames against the codec, the connection state
machine and the real router; optionally against a live agent over TCP; optionally under atheris.

    .venv/bin/python bench/fuzz_spop.py                            # 120,000 streams, seed 1
    .venv/bin/python bench/fuzz_spop.py --count 1000000 --seed 7
    .venv/bin/python bench/fuzz_spop.py --live 127.0.0.1:12345     # and 5,000 streams to a live agent
    .venv/bin/python bench/fuzz_spop.py --atheris -atheris_runs=200000   # needs `pip install atheris`

What one input is: a byte stream HAProxy could have sent on one connection. Each stream is built
from 1-4 frames, taken from a corpus (HAProxy 2.6 golden frames, frames built like HAProxy builds
them with random arguments) or generated field by field with random types, flags, ids and payloads,
then mutated (bit flips, interesting bytes, insertions, deletions, duplications, truncation,
length-prefix lies, overlong varints, splices). Three in four streams start with a valid HELLO, so
most frames reach the READY state. What is checked, for every stream:

1. codec: every frame body through `decode_frame` and the payload parser of its type (KV list,
   messages, actions) raises nothing but `ProtocolError`;
2. state machine: `Connection.receive_data`, fed the stream in random chunks, raises nothing; the
   events do not depend on how the stream was cut (checked on one stream in eight); a connection
   closed for bad input says so with an AGENT-DISCONNECT carrying the error's status;
3. router: every NOTIFY decoded is answered by the real `Router` (5 members); the ACK decodes, and
   names a member or no server at all.

Any other exception is a finding: it is printed (type, where, the input in hex) and the exit
status is 1. `--live` sends streams to a running agent (`haproxy-swarm agent`, or the one of
`haproxy-swarm run`) after a real HELLO and checks that what comes back is well-formed agent
frames, an AGENT-DISCONNECT only last, and that the agent still answers a clean connection.
"""

from __future__ import annotations

import argparse
import collections
import ipaddress
import os
import random
import socket
import struct
import sys
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from spoa.config import load_settings
from spoa.member import Member
from spoa.protocol import (
    FLAG_ABORT,
    FLAG_FIN,
    Binary,
    Connection,
    Disconnected,
    FrameType,
    Notify,
    ProtocolError,
    Scope,
    SetVar,
    Status,
    Value,
    decode_actions,
    decode_frame,
    decode_kv_list,
    decode_messages,
    encode_frame,
    encode_haproxy_disconnect,
    encode_haproxy_hello,
    encode_message,
    encode_notify,
    split_frames,
)
from spoa.routing import Router

_LENGTH = struct.Struct(">I")

# HAProxy 2.6.12 frames, as captured for tests/test_protocol_connection.py.
GOLDEN_HELLO = bytes.fromhex(
    "000000810100000001000012737570706f727465642d76657273696f6e730803322e300e6d61782d6672616d652d73"
    "697a6503fcf0060c6361706162696c69746965730810706970656c696e696e672c6173796e6309656e67696e652d69"
    "64082435333831363435622d666163392d343665322d613763652d336135653932366563663339")
GOLDEN_NOTIFY = bytes.fromhex(
    "000000300300000001000105726f75746504036b6579080361626303737263067f00000102696408027231047061"
    "746808022f70")
GOLDEN_NOTIFY_NULLS = bytes.fromhex(
    "000000280300000001020105726f75746504036b65790003737263067f00000102696400047061746808012f")

MEMBERS = [Member.parse(f"10.0.0.{i}", 80) for i in range(1, 6)]
SERVER_NAMES = {m.server_name.encode() for m in MEMBERS}
INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xEF, 0xF0, 0xFE, 0xFF)
INTERESTING_LENGTHS = (0, 1, 6, 7, 255, 256, 16379, 16380, 16381, 65535, 1 << 24, 0x7FFFFFFF, 0xFFFFFFFF)


def make_router() -> Router:
    settings = load_settings({}, {"SWARM_SERVICE": "tasks.backend:80", "COOKIE_SECRET": "fuzz",
                                  "STICKY_KEY": "cookie:SWARMID,cookie:S,header:X-User,param:uid,src"})
    return Router(settings, MEMBERS)


# --------------------------------------------------------------------------- generating inputs


class Generator:
    """Random SPOP-ish streams from one seeded `random.Random` (the same seed gives the same run)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.corpus = [GOLDEN_HELLO, GOLDEN_NOTIFY, GOLDEN_NOTIFY_NULLS,
                       encode_haproxy_hello(healthcheck=True),
                       encode_haproxy_disconnect(0, "bye"),
                       encode_notify(1, 1, self.route_message())]

    def blob(self, limit: int = 40) -> bytes:
        r = self.rng
        kind = r.random()
        n = r.choice((0, 1, 2, r.randrange(limit + 1)))
        if kind < 0.3:
            return r.randbytes(n)
        if kind < 0.6:
            return bytes(r.choice(INTERESTING_BYTES) for _ in range(n))
        if kind < 0.8:
            return "é\udcff☃".encode("utf-8", "surrogatepass")[: n or 1] * r.randrange(1, 4)
        return b"A" * n

    def value(self) -> Value:
        r = self.rng
        k = r.randrange(10)
        if k == 0:
            return None
        if k == 1:
            return r.random() < 0.5
        if k == 2:
            return r.choice((0, 1, -1, 239, 240, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63), 2**64 - 1))
        if k == 3:
            return ipaddress.IPv4Address(r.getrandbits(32))
        if k == 4:
            return ipaddress.IPv6Address(r.getrandbits(128))
        if k == 5:
            return Binary(self.blob())
        if k == 6:
            return b"x" * r.choice((239, 240, 1023, 1024, 1025, 5000))
        return self.blob()

    def route_message(self) -> bytes:
        args = {name: self.value() for name in ("sticky", "cookie", "header", "param", "src", "ssl")}
        if self.rng.random() < 0.3:
            args["sticky"] = self.rng.choice([b"", b"0" * 20, b"\xff" * 20])
        return encode_message(self.rng.choice(("route", "route", "other", "")), args)

    def structured_frame(self) -> bytes:
        """A frame generated field by field: any type, flags, ids, a payload of any shape."""
        r = self.rng
        ftype = r.choice((0, 1, 2, 3, 3, 3, 4, 101, 102, 103, r.randrange(256)))
        flags = r.choice((FLAG_FIN, FLAG_FIN, FLAG_FIN, 0, FLAG_ABORT, FLAG_FIN | FLAG_ABORT,
                          r.getrandbits(32)))
        sid = r.choice((0, 1, 239, 240, 2**32, 2**64 - 1, r.randrange(1000)))
        fid = r.choice((0, 1, 239, 240, 2**32, 2**64 - 1, r.randrange(1000)))
        shape = r.randrange(4)
        if shape == 0:
            payload = b"".join(self.route_message() for _ in range(r.randrange(1, 3)))
        elif shape == 1:
            payload = b"".join(bytes([len(k)]) + k + bytes([8, len(v)]) + v
                               for k, v in ((self.blob(12), self.blob(12)) for _ in range(r.randrange(4))))
        elif shape == 2:
            payload = (bytes([0x12]) + b"supported-versions" + bytes([8, 3]) + b"2.0"
                       + bytes([0x0E]) + b"max-frame-size" + bytes([3]) + self.blob(5))
        else:
            payload = self.blob(64)
        return encode_frame(ftype, sid, fid, payload, flags)

    def mutate(self, frame: bytes) -> bytes:
        """1-4 mutations; then, seven times in ten, the length prefix is made true again so that the
        damage reaches the payload parsers instead of the framing."""
        r = self.rng
        buf = bytearray(frame[4:] if r.random() < 0.7 else frame)
        fix = len(buf) != len(frame)
        for _ in range(r.randrange(1, 5)):
            op = r.randrange(9)
            i = r.randrange(len(buf) + 1)
            if op == 0 and buf:
                buf[min(i, len(buf) - 1)] ^= 1 << r.randrange(8)
            elif op == 1 and buf:
                buf[min(i, len(buf) - 1)] = r.choice(INTERESTING_BYTES)
            elif op == 2:
                buf[i:i] = self.blob(8)
            elif op == 3 and buf:
                del buf[i : i + r.randrange(1, 9)]
            elif op == 4 and buf:
                j = r.randrange(len(buf))
                buf[i:i] = buf[j : j + r.randrange(1, 17)]
            elif op == 5:
                del buf[i:]
            elif op == 6 and len(buf) >= 4:  # the length prefix lies
                length = r.choice((*INTERESTING_LENGTHS, len(buf) - 4 + r.randrange(-3, 4)))
                buf[0:4] = _LENGTH.pack(max(0, min(length, 0xFFFFFFFF)))
            elif op == 7:  # an overlong varint somewhere
                buf[i:i] = bytes([0xF0]) + b"\xff" * r.randrange(1, 12)
            elif op == 8:  # splice with another corpus frame
                other = r.choice(self.corpus)
                buf[i:] = other[r.randrange(len(other)) :]
        return _LENGTH.pack(len(buf)) + bytes(buf) if fix else bytes(buf)

    def frame(self) -> bytes:
        r = self.rng
        k = r.random()
        if k < 0.35:
            return self.mutate(r.choice(self.corpus))
        if k < 0.55:
            return self.structured_frame()
        if k < 0.75:
            return self.mutate(self.structured_frame())
        if k < 0.9:
            return encode_notify(r.randrange(300), r.randrange(300), self.route_message())
        return r.randbytes(r.randrange(1, 64))

    def stream(self) -> tuple[bytes, list[bytes]]:
        """(the stream, the fuzzed frames in it). Two in five are a HELLO and well-framed NOTIFYs with
        hostile arguments (the router's input); the rest are 1-4 fuzzed frames, three in four after a
        valid HELLO."""
        r = self.rng
        if r.random() < 0.4:  # well-framed NOTIFYs with hostile arguments, then maybe one bad frame
            frames = [encode_notify(r.randrange(2**20), r.randrange(2**20), self.route_message())
                      for _ in range(r.randrange(1, 9))]
            if r.random() < 0.5:
                frames.append(self.frame())
            return GOLDEN_HELLO + b"".join(frames), frames
        frames = [self.frame() for _ in range(r.randrange(1, 5))]
        if r.random() < 0.2:
            frames.append(self.rng.choice((GOLDEN_NOTIFY, encode_haproxy_disconnect(0, "bye"))))
        return (GOLDEN_HELLO if r.random() < 0.75 else b"") + b"".join(frames), frames

    def chunks(self, data: bytes) -> list[bytes]:
        r = self.rng
        if len(data) < 2 or r.random() < 0.5:
            return [data]
        cuts = sorted(r.sample(range(1, len(data)), min(len(data) - 1, r.randrange(1, 6))))
        return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


# --------------------------------------------------------------------------- checking one input


class Finding(Exception):
    """An invariant did not hold (not a crash, but as bad)."""


class Stats:
    def __init__(self) -> None:
        self.streams = 0
        self.frames = 0
        self.bytes = 0
        self.events: collections.Counter[str] = collections.Counter()
        self.closes: collections.Counter[str] = collections.Counter()
        self.codec: collections.Counter[str] = collections.Counter()
        self.acks = 0
        self.findings: dict[str, tuple[int, str, bytes]] = {}

    def finding(self, exc: BaseException, data: bytes) -> None:
        tb = traceback.extract_tb(exc.__traceback__)
        where = f"{tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else "?"
        key = f"{type(exc).__name__} at {where}: {exc}"[:200]
        count, text, first = self.findings.get(key, (0, "".join(traceback.format_exception(exc)), data))
        self.findings[key] = (count + 1, text, first)


def check_codec(frames: list[bytes], stats: Stats) -> None:
    """Every frame (its body, whatever its length prefix says) through the frame decoder and the
    payload parser of its type."""
    for frame_bytes in frames:
        body = frame_bytes[4:]
        try:
            frame = decode_frame(body)
            if frame.type in (FrameType.HAPROXY_HELLO, FrameType.HAPROXY_DISCONNECT,
                              FrameType.AGENT_HELLO, FrameType.AGENT_DISCONNECT):
                decode_kv_list(frame.payload)
            elif frame.type == FrameType.NOTIFY:
                decode_messages(frame.payload)
            elif frame.type == FrameType.ACK:
                decode_actions(frame.payload)
            stats.codec["decoded"] += 1
        except ProtocolError as e:
            stats.codec[f"refused: {e.status.name}"] += 1


def run_connection(chunks: list[bytes], router: Router, stats: Stats | None) -> tuple[list[Any], bytes, Connection]:
    """Feed `chunks` to a fresh Connection, answering NOTIFYs with the router like the server does.
    Returns (events, every byte the agent would write, the connection)."""
    conn = Connection(0.0, read_timeout=5.0)
    events: list[Any] = []
    out: list[bytes] = []
    for now, chunk in enumerate(chunks):
        got = conn.receive_data(chunk, float(now))
        events += got
        head = b"" if conn.closed else conn.data_to_send()
        out.append(head)
        for event in got:
            if type(event) is Notify:
                actions = router.handle(event.messages)
                ack = conn.ack(event.stream_id, event.frame_id, actions)
                check_ack(ack, event, stats)
                out.append(ack)
        if conn.closed:
            out.append(conn.data_to_send())
            break
    return events, b"".join(out), conn


def check_ack(ack: bytes, event: Notify, stats: Stats | None) -> None:
    (body,), rest = split_frames(ack)
    frame = decode_frame(body)
    if rest or frame.type != FrameType.ACK or (frame.stream_id, frame.frame_id) != (event.stream_id, event.frame_id):
        raise Finding(f"bad ACK for ({event.stream_id}, {event.frame_id}): {ack.hex()}")
    actions = decode_actions(frame.payload)
    if not actions:
        raise Finding("an ACK without actions")
    for action in actions:
        if isinstance(action, SetVar) and action.name == "server":
            value = action.value
            if action.scope != Scope.TRANSACTION or not isinstance(value, bytes) or value not in SERVER_NAMES:
                raise Finding(f"the router answered a server that is not a member: {action}")
    if stats is not None:
        stats.acks += 1


def check_stream(data: bytes, chunks: list[bytes], router: Router, stats: Stats, compare: bool) -> None:
    events, out, conn = run_connection(chunks, router, stats)
    if compare and len(chunks) > 1:
        whole, _, whole_conn = run_connection([data], router, None)
        same_end = (whole_conn.state, whole_conn.error and whole_conn.error.status) == \
            (conn.state, conn.error and conn.error.status)
        if not same_end or not _same_events(whole, events):
            raise Finding(f"the outcome depends on how the stream was cut: {whole!r} != {events!r}")
    for event in events:
        stats.events[type(event).__name__] += 1
    if conn.closed:
        if conn.error is not None:
            stats.closes[conn.error.status.name] += 1
            last = split_frames(out)[0][-1]
            frame = decode_frame(last)
            kv = decode_kv_list(frame.payload)
            if frame.type != FrameType.AGENT_DISCONNECT or kv.get("status-code") != int(conn.error.status):
                raise Finding(f"closed for {conn.error} but the last frame is {frame}")
        elif any(type(e) is Disconnected for e in events):
            stats.closes["haproxy-disconnect"] += 1
        else:
            stats.closes["healthcheck"] += 1
    else:
        stats.closes["open" if not conn.buffered else "open, partial frame"] += 1


def _same_events(whole: list[Any], cut: list[Any]) -> bool:
    """The same events, but for one documented difference: NOTIFYs read together with the HELLO are
    dropped when that same read then fails (spoa.protocol.connection); cut elsewhere, they are
    answered. So a NOTIFY may be missing on either side when the connection failed; nothing else."""
    if whole == cut:
        return True
    def rest(events: list[Any]) -> list[Any]:
        return [e for e in events if type(e) is not Notify]
    def notifies(events: list[Any]) -> list[Any]:
        return [e for e in events if type(e) is Notify]
    a, b = notifies(whole), notifies(cut)
    shorter, longer = (a, b) if len(a) <= len(b) else (b, a)
    return rest(whole) == rest(cut) and longer[: len(shorter)] == shorter


def fuzz_once(gen: Generator, router: Router, stats: Stats, i: int) -> None:
    data, frames = gen.stream()
    chunks = gen.chunks(data)
    stats.streams += 1
    stats.frames += len(frames)
    stats.bytes += len(data)
    try:
        check_codec(frames, stats)
        check_stream(data, chunks, router, stats, compare=i % 8 == 0)
    except Exception as exc:  # every non-ProtocolError escaping the codec or the state machine is a finding
        stats.finding(exc, data)


# --------------------------------------------------------------------------- a live agent


def live(address: tuple[str, int], gen: Generator, count: int, stats: Stats) -> None:
    """Send `count` fuzzed streams, each on its own connection after a real HELLO."""
    for _ in range(count):
        _, frames = gen.stream()
        data = b"".join(frames)
        stats.streams += 1
        stats.frames += len(frames)
        stats.bytes += len(data)
        try:
            with socket.create_connection(address, timeout=10) as s:
                s.sendall(GOLDEN_HELLO)
                reply = _read_frames(s, 1)
                if not reply or decode_frame(reply[0]).type != FrameType.AGENT_HELLO:
                    raise Finding(f"no AGENT-HELLO: {reply!r}")
                try:
                    s.sendall(data)
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # the agent closed first (its AGENT-DISCONNECT is read below)
                raw = b""
                while True:
                    try:
                        chunk = s.recv(65536)
                    except ConnectionResetError:
                        break
                    if not chunk:
                        break
                    raw += chunk
            bodies, rest = split_frames(raw)
            if rest:
                raise Finding(f"the agent wrote a partial frame: {raw.hex()}")
            types = [decode_frame(b).type for b in bodies]
            if any(t not in (FrameType.ACK, FrameType.AGENT_DISCONNECT, FrameType.AGENT_HELLO) for t in types):
                raise Finding(f"unexpected frame types from the agent: {types}")
            if FrameType.AGENT_DISCONNECT in types[:-1]:
                raise Finding(f"frames after AGENT-DISCONNECT: {types}")
            stats.acks += types.count(FrameType.ACK)
            if types and types[-1] == FrameType.AGENT_DISCONNECT:
                status = decode_kv_list(decode_frame(bodies[-1]).payload).get("status-code")
                stats.closes[Status(status).name if isinstance(status, int) and status in set(Status)
                             else f"status {status!r}"] += 1
            else:
                stats.closes["closed at EOF"] += 1
        except Exception as exc:
            stats.finding(exc, data)
    # The agent still answers a clean connection.
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(GOLDEN_HELLO + GOLDEN_NOTIFY)
        types = [decode_frame(b).type for b in _read_frames(s, 2)]
        if types != [FrameType.AGENT_HELLO, FrameType.ACK]:
            stats.finding(Finding(f"a clean connection after the fuzzing got {types}"), b"")


def _read_frames(s: socket.socket, n: int) -> list[bytes]:
    raw = b""
    while True:
        bodies, _ = split_frames(raw)
        if len(bodies) >= n:
            return bodies
        chunk = s.recv(65536)
        if not chunk:
            return bodies
        raw += chunk


# --------------------------------------------------------------------------- report


def report(stats: Stats, seconds: float, title: str) -> None:
    print(f"\n== {title}: {stats.streams:,} streams, {stats.frames:,} fuzzed frames, {stats.bytes:,} bytes, "
          f"{seconds:.1f} s ({stats.streams / max(seconds, 1e-9):,.0f} streams/s)")
    if stats.codec:
        print("codec, per frame body:    " + ", ".join(f"{k} {v:,}" for k, v in stats.codec.most_common()))
    if stats.events:
        print("events decoded:           " + ", ".join(f"{k} {v:,}" for k, v in stats.events.most_common()))
    print(f"ACKs built and checked:   {stats.acks:,}")
    print("how connections ended:    " + ", ".join(f"{k} {v:,}" for k, v in stats.closes.most_common()))
    total = sum(c for c, _, _ in stats.findings.values())
    print(f"non-ProtocolError exceptions and broken invariants: {total}")
    for key, (count, text, first) in stats.findings.items():
        print(f"\n--- {count} x {key}\ninput: {first.hex()}\n{text}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=120_000, help="streams to fuzz in-process")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--live", metavar="HOST:PORT", help="also fuzz a running agent over TCP")
    parser.add_argument("--live-count", type=int, default=5_000)
    parser.add_argument("--atheris", action="store_true", help="coverage-guided, with atheris (other "
                        "arguments after this one go to libFuzzer, e.g. -atheris_runs=200000)")
    args, rest = parser.parse_known_args(argv)
    if args.atheris:
        return run_atheris(rest)
    rng = random.Random(args.seed)
    gen = Generator(rng)
    router = make_router()
    stats = Stats()
    started = time.perf_counter()
    for i in range(args.count):
        fuzz_once(gen, router, stats, i)
        if i and i % 50_000 == 0:
            print(f"  {i:,} streams, {time.perf_counter() - started:.1f} s", flush=True)
    report(stats, time.perf_counter() - started, f"in-process (codec + state machine + router), seed {args.seed}")
    failed = bool(stats.findings)
    if args.live:
        host, _, port = args.live.rpartition(":")
        live_stats = Stats()
        started = time.perf_counter()
        live((host.strip("[]"), int(port)), gen, args.live_count, live_stats)
        report(live_stats, time.perf_counter() - started, f"live agent on {args.live}")
        failed = failed or bool(live_stats.findings)
    return 1 if failed else 0


def run_atheris(rest: list[str]) -> int:  # pragma: no cover - optional
    try:
        import atheris  # type: ignore[import-not-found, import-untyped, unused-ignore]
    except ImportError:
        print("atheris is not installed: .venv/bin/pip install atheris", file=sys.stderr)
        return 2
    atheris.instrument_all()  # spoa is imported already: instrument what is loaded for coverage
    router = make_router()

    def one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        after_hello = fdp.ConsumeBool()
        cut = fdp.ConsumeIntInRange(0, 64)
        body = fdp.ConsumeBytes(fdp.remaining_bytes())
        stream = (GOLDEN_HELLO if after_hello else b"") + body
        check_codec([_LENGTH.pack(len(body)) + body], Stats())
        chunks = [stream[:cut], stream[cut:]] if 0 < cut < len(stream) else [stream]
        check_stream(stream, chunks, router, Stats(), compare=True)

    atheris.Setup([sys.argv[0], *rest], one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
