"""The decision table against real HAProxy (issue 11): HAProxy computes a key's slot exactly as the
agent does, and HAProxy deciding from the published table agrees with the agent's SPOE answer.

- `test_haproxy_computes_the_agents_slot`: a small HAProxy (the HAProxy under test, HAPROXY_BIN)
  answers, for each request, the slot of every kind of key with the expressions the shipped
  haproxy.cfg uses (`src,crc32,div(65536)`; `<fetch>,bytes(0,1024),crc32,div(65536)`); the test
  compares them with `spoa.ring.slot_of` for random cookies, headers, query values, IPv4 and IPv6
  sources (set from a header with `set-src`, so any address is tested while the traffic stays on
  loopback), and keys at, below and above the 1,024-byte limit.
- `test_table_and_agent_decide_alike`: two complete stacks on the same backends, one with
  DECIDE=table and one with DECIDE=agent; random header, parameter and source keys reach the same
  member through both (sources: 127.0.0.0/8 addresses the client binds to).
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import random
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from polling import wait_for

from spoa.haproxy.process import HAProxyProcess
from spoa.local.dnsmasq import Dnsmasq
from spoa.local.ports import free_port
from spoa.local.stack import Stack
from spoa.ring import slot_of
from spoa.routing.sticky import KEY_LIMIT, key_bytes

pytestmark = [pytest.mark.timeout(180)]

KEYS_PER_KIND = 2000

SLOT_CONFIG = """
global
    stats socket "${HAPROXY_SOCKET}" mode 600 level admin
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend fe
    bind "127.0.0.1:${PORT}"
    http-request set-src req.hdr(X-Src) if { req.hdr(X-Src) -m found }
    http-request return status 200 content-type text/plain lf-string "%[src,crc32,div(65536)] \
%[req.hdr(X-Key),bytes(0,1024),crc32,div(65536)] %[req.cook(K),bytes(0,1024),crc32,div(65536)] \
%[url_param(k),bytes(0,1024),crc32,div(65536)]"
""".replace("\\\n", "")


@pytest.fixture(scope="module")
def slot_haproxy() -> Iterator[int]:
    run_dir = tempfile.mkdtemp(prefix="haproxy-swarm-slot-")
    config = Path(run_dir) / "slot.cfg"
    config.write_text(SLOT_CONFIG)
    port = free_port()
    h = HAProxyProcess({"RUN_DIR": run_dir, "HAPROXY_SOCKET": os.path.join(run_dir, "admin.sock"),
                        "PORT": str(port)}, config=str(config))
    h.start()
    try:
        yield port
    finally:
        h.stop()


def _token(rng: random.Random, size: int) -> str:
    # Characters a cookie, a header and a query value all carry unchanged.
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_."
    return "".join(rng.choice(alphabet) for _ in range(size))


def _sizes(rng: random.Random) -> Iterator[int]:
    yield from (1, 2, 20, KEY_LIMIT - 1, KEY_LIMIT, KEY_LIMIT + 1, 3000)
    while True:
        yield rng.randrange(1, 64)


def test_haproxy_computes_the_agents_slot(slot_haproxy: int) -> None:
    rng = random.Random(11)
    conn = http.client.HTTPConnection("127.0.0.1", slot_haproxy, timeout=10)
    sizes = _sizes(rng)
    mismatches: list[str] = []
    for i in range(KEYS_PER_KIND):
        key = _token(rng, next(sizes))
        if i % 2:
            src: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(rng.getrandbits(32))
        else:
            src = ipaddress.IPv6Address(rng.getrandbits(128))
        conn.request("GET", f"/?k={key}", headers={"X-Key": key, "Cookie": f"K={key}", "X-Src": str(src)})
        answer = conn.getresponse().read().decode().split()
        expected_key = slot_of(key.encode()[:KEY_LIMIT])
        src_key = key_bytes(src)  # what the agent hashes for the `src` argument HAProxy sends
        assert src_key is not None
        expected = [str(slot_of(src_key)), *[str(expected_key)] * 3]
        if answer != expected:
            mismatches.append(f"key of {len(key)} bytes, src {src}: HAProxy {answer}, agent {expected}")
    conn.close()
    assert not mismatches, f"{len(mismatches)} of {KEYS_PER_KIND}: " + "; ".join(mismatches[:5])


# ---------------------------------------------------------------- table vs agent, end to end

STICKY_KEY = "header:X-User,param:uid,src"


@pytest.fixture(scope="module")
def table_and_agent() -> Iterator[tuple[Stack, Stack]]:
    with Dnsmasq() as dns:
        table = Stack(n_slots=4, dns=dns, env={"STICKY_KEY": STICKY_KEY, "DECIDE": "table"})
        try:
            table.start([0, 1, 2, 3])
            agent = Stack(dns=dns, tasks=table.tasks, env={"STICKY_KEY": STICKY_KEY, "DECIDE": "agent"})
            try:
                agent.start([0, 1, 2, 3])
                yield table, agent
            finally:
                agent.stop()
        finally:
            table.stop()


def _served_by(port: int, path: str, headers: dict[str, str], source: str = "127.0.0.1") -> str:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.sock = sock
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    body = response.read().decode()
    conn.close()
    assert response.status == 200, body
    return body.split()[0]


def test_table_and_agent_decide_alike(table_and_agent: tuple[Stack, Stack]) -> None:
    table, agent = table_and_agent
    wait_for(lambda: table.metric("haproxy_swarm_table_publications_total") >= 1, "the table is published")
    rng = random.Random(12)
    cases: list[tuple[str, dict[str, str], str]] = []
    for _ in range(KEYS_PER_KIND // 4):
        cases.append(("/", {"X-User": _token(rng, rng.randrange(1, 40))}, "127.0.0.1"))
        cases.append((f"/?uid={_token(rng, rng.randrange(1, 40))}", {}, "127.0.0.1"))
    for _ in range(KEYS_PER_KIND // 8):
        cases.append(("/", {}, str(ipaddress.IPv4Address((127 << 24) | rng.getrandbits(24) | 1))))
    differ = []
    for path, headers, source in cases:
        a = _served_by(table.traffic_port, path, headers, source)
        b = _served_by(agent.traffic_port, path, headers, source)
        if a != b:
            differ.append((path, headers, source, a, b))
    assert not differ, f"{len(differ)} of {len(cases)} differ: {differ[:5]}"
    # The table decided them (the agent of the table stack was not asked: no NOTIFY), the agent the
    # others; both count every decision (the table's from HAProxy's counters).
    assert table.metric("haproxy_swarm_spop_frames_total", type="notify") == 0
    assert agent.metric("haproxy_swarm_spop_frames_total", type="notify") >= len(cases)
    assert table.metric("haproxy_swarm_decisions_total", source="header") == KEYS_PER_KIND // 4
    assert agent.metric("haproxy_swarm_decisions_total", source="header") == KEYS_PER_KIND // 4


def test_haproxy_check_passes_from_any_directory() -> None:
    """The shipped config with its empty maps, from another directory (a fresh checkout)."""
    h = HAProxyProcess({"RUN_DIR": tempfile.mkdtemp(prefix="haproxy-swarm-check-")})
    res = subprocess.run([h.binary, "-c", "-f", h.config], cwd="/", env={**h.env, "SLOT_MAP": "maps/slots.map",
                         "SERVER_COOKIE_MAP": "maps/server-cookies.map", "COOKIE_MAP": "maps/cookies.map"},
                         capture_output=True, timeout=30)
    assert res.returncode == 0, res.stderr.decode()
