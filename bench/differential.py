"""Differential bench (not a test): HAProxy deciding from the table against the agent deciding over SPOE.

Two complete stacks on the same backends and the same DNS (`haproxy-swarm run` each, the HAProxy
of HAPROXY_BIN): one with DECIDE=table, one with DECIDE=agent, both with the chain
`header:X-User,param:uid,src`. For KEYS random keys of each kind - X-User header values, `uid`
query values (1-40 characters, and some at the 1,024-byte hashing limit and beyond), and IPv4
sources anywhere in 127.0.0.0/8 (the client binds to them; all loopback) - the member that served
the request through each stack is compared. Any difference is printed and makes the exit status 1.
tests/test_table_haproxy.py runs the same comparison on 2,000 keys per CI run.

    .venv/bin/python bench/differential.py                   # 100,000 keys of each kind
    .venv/bin/python bench/differential.py --keys 10000 --workers 8
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import os
import random
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from spoa.config import KEY_LIMIT
from spoa.haproxy.process import haproxy_binary
from spoa.local.dnsmasq import Dnsmasq
from spoa.local.stack import Stack

CHAIN = "header:X-User,param:uid,src"
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_."


def token(rng: random.Random) -> str:
    size = rng.choice((KEY_LIMIT - 1, KEY_LIMIT, KEY_LIMIT + 1)) if rng.random() < 0.01 else rng.randrange(1, 41)
    return "".join(rng.choice(ALPHABET) for _ in range(size))


def served_by(conn: http.client.HTTPConnection, path: str, headers: dict[str, str]) -> str:
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    body = response.read().decode()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status} for {path[:60]} {str(headers)[:60]}: {body[:80]}")
    return response.getheader("X-Served-By") or "?"


def compare_keyed(ports: tuple[int, int], cases: list[tuple[str, dict[str, str]]]) -> list[str]:
    """Header or parameter keys on one keep-alive connection per stack."""
    conns = [http.client.HTTPConnection("127.0.0.1", p, timeout=10) for p in ports]
    differ = []
    try:
        for path, headers in cases:
            a, b = (served_by(c, path, headers) for c in conns)
            if a != b:
                differ.append(f"{path[:50]} {str(headers)[:50]}: table {a}, agent {b}")
    finally:
        for c in conns:
            c.close()
    return differ


def compare_sources(ports: tuple[int, int], sources: list[str]) -> list[str]:
    """Source keys: a connection of its own per source address and stack."""
    differ = []
    for source in sources:
        got = []
        for port in ports:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
            try:
                got.append(served_by(conn, "/", {}))
            finally:
                conn.close()
        if got[0] != got[1]:
            differ.append(f"src {source}: table {got[0]}, agent {got[1]}")
    return differ


def split(items: list, n: int) -> list[list]:  # type: ignore[type-arg]
    return [items[i::n] for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=100_000, help="keys of each kind")
    parser.add_argument("--workers", type=int, default=4, help="client threads")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    headers = [("/", {"X-User": token(rng)}) for _ in range(args.keys)]
    params = [(f"/?uid={quote(token(rng))}", {}) for _ in range(args.keys)]
    sources = sorted({str(ipaddress.IPv4Address((127 << 24) | rng.getrandbits(24))) for _ in range(args.keys)}
                     - {"127.0.0.0", "127.255.255.255"})
    print(f"HAProxy {haproxy_binary()}; {args.keys} keys of each kind, {len(sources)} distinct sources")
    with Dnsmasq() as dns:
        env = {"STICKY_KEY": CHAIN, "LOG_LEVEL": "warning"}
        table = Stack(n_slots=args.members, dns=dns, env={**env, "DECIDE": "table"})
        try:
            table.start(range(args.members))
            agent = Stack(dns=dns, tasks=table.tasks, env={**env, "DECIDE": "agent"})
            try:
                agent.start(range(args.members))
                ports = (table.traffic_port, agent.traffic_port)
                failed = False
                for kind, work, items in (("header", compare_keyed, headers), ("param", compare_keyed, params),
                                          ("src", compare_sources, sources)):
                    started = time.monotonic()
                    with ThreadPoolExecutor(args.workers) as pool:
                        parts = pool.map(lambda part, w=work: w(ports, part), split(items, args.workers))  # type: ignore[misc]
                        differ = [d for part in parts for d in part]
                    took = time.monotonic() - started
                    print(f"{kind:6} {len(items):7} keys in {took:5.1f} s: {len(differ)} differ")
                    for line in differ[:5]:
                        print("   ", line)
                    failed = failed or bool(differ)
                notifies = table.metric("haproxy_swarm_spop_frames_total", type="notify")
                print(f"NOTIFYs to the table stack's agent: {notifies:.0f} (0: the table decided every request)")
            finally:
                agent.stop()
        finally:
            table.stop()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
