"""Agent memory benchmark (not a test): RSS of the real agent after 1M distinct sticky keys.

Starts the product on loopback (`Stack`: dnsmasq, three backends, `haproxy-swarm run` with the
shipped config, so the agent has members UP through HAProxy's health checks), then speaks SPOP
directly to the agent's listener like HAProxy does (HELLO, then pipelined NOTIFYs shaped like the
shipped spoe.conf's `route` message) with a distinct key in every NOTIFY:

- a sticky cookie of the issued length that no member has (the agent checks it against its members
  and the cookies of members that left),
- then, for half of the NOTIFYs, an X-User header (STICKY_KEY=cookie:SWARMID,header:X-User,src),
  for the other half only the client address: every IPv4 address is distinct too.

Prints the agent's RSS (/proc/<pid>/status VmRSS) before the first key and after every 100,000,
and its peak (VmHWM). Every NOTIFY must be answered with a member (checked on every ACK).

    .venv/bin/python bench/memory.py                  # 1,000,000 keys
    .venv/bin/python bench/memory.py --keys 200000

Target (shared/DESIGN.md): agent RSS <= 60 MB with 1M distinct keys seen.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from spoa.local.stack import Stack
from spoa.protocol import (
    FrameType,
    decode_actions,
    encode_haproxy_hello,
    encode_message,
    encode_notify,
    split_frames,
)
from spoa.protocol.codec import decode_varint

TARGET_MB = 60.0
BATCH = 100  # NOTIFYs in flight per round trip (HAProxy 2.6 pipelines 20 per connection)
_LENGTH = struct.Struct(">I")


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def notify(i: int) -> bytes:
    args: dict[str, object] = {
        "sticky": f"{i:020x}".encode(),  # the issued length, no member's value
        "src": ipaddress.IPv4Address((10 << 24) + i),
        "ssl": False,
    }
    if i % 2:
        args["header"] = f"user-{i:09d}".encode()
    return encode_notify(1 + i, 1, encode_message("route", args))  # type: ignore[arg-type]


class Client:
    """A blocking SPOP client: HELLO, then batches of pipelined NOTIFYs, every ACK checked."""

    def __init__(self, port: int, servers: set[bytes]) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.servers = servers
        self.rest = b""
        self.sock.sendall(encode_haproxy_hello(capabilities="pipelining"))
        (hello,) = self.frames(1)
        if hello[0] != FrameType.AGENT_HELLO:
            raise RuntimeError(f"expected AGENT-HELLO, got frame type {hello[0]}")

    def frames(self, n: int) -> list[bytes]:
        out: list[bytes] = []
        while len(out) < n:
            data = self.sock.recv(1 << 16)
            if not data:
                raise RuntimeError("the agent closed the connection")
            bodies, self.rest = split_frames(self.rest + data)
            out += bodies
        return out

    def send(self, first: int, count: int) -> None:
        self.sock.sendall(b"".join(notify(i) for i in range(first, first + count)))
        for body in self.frames(count):
            if body[0] != FrameType.ACK:
                raise RuntimeError(f"expected ACK, got frame type {body[0]}")
            _, pos = decode_varint(body, 5, len(body))  # after type and flags: stream-id, frame-id
            _, pos = decode_varint(body, pos, len(body))
            names = {a.name: getattr(a, "value", None) for a in decode_actions(body, pos)}
            if names.get("server") not in self.servers:
                raise RuntimeError(f"NOTIFY answered without a member: {names}")

    def close(self) -> None:
        self.sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--every", type=int, default=100_000, help="print RSS every this many keys")
    args = parser.parse_args()
    if not 1 <= args.keys <= 10_000_000:
        parser.error("--keys must be between 1 and 10,000,000")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus")
    with Stack(n_slots=3, refresh=2.0,
               env={"STICKY_KEY": "cookie:SWARMID,header:X-User,src", "LOG_LEVEL": "warning"}) as stack:
        pid = stack.agent_pid()
        if pid is None:
            raise RuntimeError("no agent process under `haproxy-swarm run`")
        servers = {r["srv_name"].encode() for r in stack.servers()}
        client = Client(stack.agent_port, servers)
        try:
            client.send(0, BATCH)  # warm-up: first decisions, lazily built tables
            start_kb = status_kb(pid, "VmRSS")
            print(f"agent pid {pid}: RSS {start_kb / 1024:.1f} MB before the keys "
                  f"(members: {', '.join(sorted(s.decode() for s in servers))})")
            started, cpu0 = time.monotonic(), _cpu(pid)
            sent = BATCH
            while sent < args.keys + BATCH:
                n = min(BATCH, args.keys + BATCH - sent)
                client.send(sent, n)
                sent += n
                if (sent - BATCH) % args.every == 0:
                    print(f"  {sent - BATCH:>9,} keys: RSS {status_kb(pid, 'VmRSS') / 1024:.1f} MB", flush=True)
            elapsed, cpu = time.monotonic() - started, _cpu(pid) - cpu0
        finally:
            client.close()
        rss, peak = status_kb(pid, "VmRSS") / 1024, status_kb(pid, "VmHWM") / 1024
        print(f"after {args.keys:,} distinct keys: RSS {rss:.1f} MB (+{rss - start_kb / 1024:.1f}), "
              f"peak {peak:.1f} MB; target <= {TARGET_MB:.0f} MB: {'met' if peak <= TARGET_MB else 'MISSED'}")
        print(f"{args.keys / elapsed:,.0f} NOTIFYs/s over one connection, {cpu / args.keys * 1e6:.1f} µs agent CPU "
              "each (decode, decide, ACK, metrics)")


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
