"""Agent micro-benchmark (not a test): prints figures.

1. codec: decode NOTIFY + build ACK per CPU-second in one process (pure `spoa.protocol`, no I/O).
2. round trips: NOTIFY→ACK decisions per second over loopback. The agent (`AgentServer`, uvloop
   when installed) runs in its own process pinned to one core; a client process on another core
   pipelines like HAProxy 2.6: several connections, up to 20 NOTIFYs in flight on each.

    .venv/bin/python bench/agent.py                # both
    .venv/bin/python bench/agent.py --codec        # 1 only
    .venv/bin/python bench/agent.py --seconds 10 --connections 8 --inflight 20
    .venv/bin/python bench/agent.py --asyncio      # the agent on asyncio's loop instead of uvloop
    .venv/bin/python bench/agent.py --observer     # with metrics hooks attached
    .venv/bin/python bench/agent.py --real         # the real Router and the real Metrics observer,
                                                   # NOTIFYs shaped like the shipped spoe.conf's

The NOTIFY is shaped like the routing message: a 32-byte sticky cookie, three absent (NULL) key
slots and the client's IPv4 address, answered by a fixed handler. With `--real` it is what the
shipped spoe.conf sends on a first visit with the default key chain (no sticky cookie, the
client's IPv4 address, `ssl` false), decided by `spoa.routing.Router` over 3 members with the default key
chain (source-address hash, a sticky cookie issued) and timed by `spoa.metrics.Metrics`, as in
`haproxy-swarm agent`. The target for the finished agent is ≥ 50,000 decisions/s on one core.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import multiprocessing
import os
import struct
import sys
import time
from multiprocessing.connection import Connection as Pipe
from typing import cast

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from spoa.agent import AgentObserver, AgentServer, Handler, fixed_handler, new_event_loop, uses_uvloop
from spoa.config import HostPort
from spoa.protocol import (
    Connection,
    FrameType,
    Message,
    encode_haproxy_hello,
    encode_message,
    encode_notify,
)

_LENGTH = struct.Struct(">I")
TARGET = "10.0.1.5_80"


def routing_message(i: int = 0, real: bool = False) -> bytes:
    if real:  # the shipped spoe.conf's `route` message on a first visit, default key chain
        return encode_message("route", {
            "sticky": None,
            "src": ipaddress.IPv4Address(0x0A000000 + (i & 0xFFFF)),
            "ssl": False,
        })
    return encode_message("route", {
        "sticky": f"{i:032x}".encode(),
        "cookie": None,
        "header": None,
        "param": None,
        "src": ipaddress.IPv4Address(0x0A000000 + (i & 0xFFFF)),
    })


def real_agent() -> tuple[Handler, AgentObserver]:
    """The production handler and observer: `Router.handle` over 3 members, timed by `Metrics`."""
    from spoa.config import load_settings
    from spoa.member import Member
    from spoa.metrics import Metrics
    from spoa.routing import Router

    settings = load_settings({}, environ={"SWARM_SERVICE": "tasks.backend:80", "DNS_NAMESERVER": "127.0.0.1",
                                          "COOKIE_SECRET": "bench"})
    router = Router(settings, [Member.parse(f"10.0.1.{i}", 80) for i in range(1, 4)])

    class State:  # what Metrics reads from the agent
        def __init__(self) -> None:
            self.settings = settings
            self.router = router

    return router.handle, Metrics(State())  # type: ignore[arg-type]


def pin(cpu: int) -> str:
    try:
        os.sched_setaffinity(0, {cpu % (os.cpu_count() or 1)})
        return f"cpu {cpu % (os.cpu_count() or 1)}"
    except (AttributeError, OSError):
        return "not pinned"


# --------------------------------------------------------------------------- 1. codec


def bench_codec(seconds: float, real: bool = False) -> float:
    conn = Connection()
    conn.receive_data(encode_haproxy_hello())
    conn.data_to_send()
    handler = real_agent()[0] if real else fixed_handler(TARGET)
    chunks = [b"".join(encode_notify(1000 + 20 * j + i, 1, routing_message(20 * j + i, real)) for i in range(20))
              for j in range(50)]
    done = 0
    started = time.process_time()  # CPU time: other work on the machine does not count
    deadline = started + seconds
    while time.process_time() < deadline:
        for chunk in chunks:
            ack = conn.ack
            out = [ack(e.stream_id, e.frame_id, handler(e.messages))  # type: ignore[union-attr]
                   for e in conn.receive_data(chunk)]
            b"".join(out)
            done += len(out)
    rate = done / (time.process_time() - started)
    print(f"codec: {rate:,.0f} NOTIFY decoded{', routed' if real else ''} + ACK built per CPU-second in one "
          f"process ({1e6 / rate:.2f} µs each)")
    return rate


# --------------------------------------------------------------------------- 2. round trips


class _CountingObserver(AgentObserver):
    """Stands in for metrics: a counter per frame type and a bucketed latency count."""

    def __init__(self) -> None:
        self.frames: dict[FrameType, int] = {}
        self.buckets = [0] * 8

    def frames_received(self, frame_type: FrameType, count: int) -> None:
        self.frames[frame_type] = self.frames.get(frame_type, 0) + count

    def decision(self, seconds: float) -> None:
        self.buckets[min(7, int(seconds * 1e5))] += 1


def agent_process(pipe: Pipe, cpu: int, stdlib_loop: bool, observed: bool, real: bool) -> None:
    where = pin(cpu)
    loop = asyncio.new_event_loop() if stdlib_loop else new_event_loop()
    asyncio.set_event_loop(loop)

    decided = [0]
    answer, observer = real_agent() if real else (fixed_handler(TARGET), _CountingObserver())

    def handler(messages: list[Message]) -> bytes:
        decided[0] += 1
        return answer(messages)

    async def main() -> None:
        server = AgentServer(HostPort("127.0.0.1", 0), handler, read_timeout=None,
                             observer=observer if observed or real else None)
        await server.start()
        pipe.send((server.address.port, where, uses_uvloop(loop)))
        cpu_started = time.process_time()
        await loop.run_in_executor(None, pipe.recv)  # until the parent says stop
        pipe.send((decided[0], time.process_time() - cpu_started))
        server.close()
        await server.wait_closed()

    loop.run_until_complete(main())
    loop.close()


class _Client(asyncio.Protocol):
    def __init__(self, frames: list[bytes], inflight: int, counter: list[int], ready: asyncio.Future[None]):
        self.frames = frames
        self.inflight = inflight
        self.counter = counter
        self.ready = ready
        self.buf = b""
        self.next = 0
        self.hello_done = False
        self.running = True
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        self.transport = transport
        transport.write(encode_haproxy_hello(capabilities="pipelining,async"))

    def send(self, n: int) -> None:
        frames, i, size = self.frames, self.next, len(self.frames)
        wraps = i + n > size
        chunk = b"".join(frames[(i + k) % size] for k in range(n)) if wraps else b"".join(frames[i : i + n])
        self.next = (i + n) % size
        assert self.transport is not None
        self.transport.write(chunk)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos, size, acks = 0, len(buf), 0
        while size - pos >= 4:
            end = pos + 4 + _LENGTH.unpack_from(buf, pos)[0]
            if end > size:
                break
            if buf[pos + 4] == 103:
                acks += 1
            elif buf[pos + 4] == 101 and not self.hello_done:
                self.hello_done = True
                if not self.ready.done():
                    self.ready.set_result(None)
                self.send(self.inflight)
            pos = end
        self.buf = buf[pos:]
        if acks:
            self.counter[0] += acks
            if self.running:
                self.send(acks)


def client_process(port: int, cpu: int, connections: int, inflight: int, seconds: float, real: bool,
                   pipe: Pipe) -> None:
    pin(cpu)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    counter = [0]

    async def main() -> tuple[int, float]:
        clients = []
        for c in range(connections):
            frames = [encode_notify(c * 1_000_000 + i, 1, routing_message(i, real)) for i in range(2000)]
            ready: asyncio.Future[None] = loop.create_future()
            _, proto = await loop.create_connection(
                lambda f=frames, r=ready: _Client(f, inflight, counter, r), "127.0.0.1", port)  # type: ignore[misc]
            clients.append(proto)
            await ready
        await asyncio.sleep(0.5)  # warm up
        start_count, started = counter[0], time.perf_counter()
        await asyncio.sleep(seconds)
        done, elapsed = counter[0] - start_count, time.perf_counter() - started
        for proto in clients:
            proto.running = False
        await asyncio.sleep(0.1)
        for proto in clients:
            assert proto.transport is not None
            proto.transport.close()
        return done, elapsed

    pipe.send(loop.run_until_complete(main()))
    loop.close()


def bench_round_trips(seconds: float, connections: int, inflight: int, stdlib_loop: bool = False,
                      observed: bool = False, real: bool = False) -> float:
    ctx = multiprocessing.get_context("spawn")
    agent_pipe, agent_end = ctx.Pipe()
    agent = ctx.Process(target=agent_process, args=(agent_end, 0, stdlib_loop, observed, real), daemon=True)
    agent.start()
    try:
        port, where, uvloop_used = agent_pipe.recv()
        client_pipe, client_end = ctx.Pipe()
        client = ctx.Process(target=client_process,
                             args=(port, 1, connections, inflight, seconds, real, client_end), daemon=True)
        client.start()
        done, elapsed = client_pipe.recv()
        client.join(10)
        agent_pipe.send("stop")
        decided, agent_cpu = agent_pipe.recv()
        agent.join(10)
    finally:
        if agent.is_alive():
            agent.terminate()
            agent.join()
    rate = float(done) / float(elapsed)
    print(f"round trips: {rate:,.0f} NOTIFY→ACK decisions per second over loopback "
          f"(agent {'uvloop' if uvloop_used else 'asyncio'}"
          f"{', real Router + Metrics' if real else ', observed' if observed else ''}, {where}; "
          f"{connections} connections x "
          f"{inflight} in flight; {done:,} in {elapsed:.1f} s)")
    print(f"agent process: {decided / agent_cpu:,.0f} decisions per CPU-second of the agent "
          f"({decided:,} decisions in {agent_cpu:.1f} CPU-s, warm-up included)")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codec", action="store_true", help="only the in-process codec figure")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--inflight", type=int, default=20)
    parser.add_argument("--asyncio", action="store_true", help="run the agent on asyncio's own loop, not uvloop")
    parser.add_argument("--observer", action="store_true", help="with an observer (metrics hooks) attached")
    parser.add_argument("--real", action="store_true",
                        help="the real Router and Metrics, NOTIFYs shaped like the shipped spoe.conf's")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus")
    bench_codec(min(args.seconds, 3.0), args.real)
    if not args.codec:
        bench_round_trips(args.seconds, args.connections, args.inflight, args.asyncio, args.observer, args.real)


if __name__ == "__main__":
    main()
