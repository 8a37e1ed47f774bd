"""Degraded modes with the decision table published (issue 11, DECIDE=table, the default).

Everything real on loopback: `haproxy-swarm run` (the shipped config, the HAProxy under test), the
agent, dnsmasq, three backends. The chain is `cookie:SWARMID,header:X-User,src`, and the load mixes
its three kinds of users (`spoa.local.load`, 200 requests/s): 60 send an X-User header and keep no
cookie, 60 send neither (decided by their source address), 80 keep the sticky cookie they are
given. HAProxy decides all of them from the table, so the agent is on no request's path:

- the agent killed with kill -9 (and restarted by `run`): 0 failed requests, 0 users moved, of any kind;
- the agent frozen (SIGSTOP 3 s, then SIGCONT): 0 failed, 0 users moved, no request waited for it;
- a cold start whose tasks do not listen yet: /readyz answers 503 until a member is UP and the
  table is published, then 200 with the whole table (65,536 slots) in HAProxy naming UP members;
- a cold start under load: each user's requests switch from HAProxy's own balancing to the table's
  decision at most once, and never after /readyz answers 200.

Figures are printed (`pytest -s tests/test_table_degraded.py`).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from itertools import pairwise

import pytest
from polling import wait_for

from spoa.local.client import User, users
from spoa.local.load import Load
from spoa.local.stack import Stack
from spoa.ring.hashing import TABLE_SIZE

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

RATE = 200.0
HEADER_USERS = 60
SOURCE_USERS = 60
COOKIE_USERS = 80
CHAIN = {"STICKY_KEY": "cookie:SWARMID,header:X-User,src"}
PROCESSING_TIMEOUT = 0.050  # spoe.conf `timeout processing`


def crowd(network: str) -> tuple[list[User], float]:
    """The three kinds of users, and the share of them that keeps no cookie (for Load)."""
    people = users(HEADER_USERS + SOURCE_USERS + COOKIE_USERS, "u", network=network)
    for u in people[:HEADER_USERS]:
        u.headers["X-User"] = f"user-{u.name}"
    return people, (HEADER_USERS + SOURCE_USERS) / len(people)


def kind(load: Load, name: str) -> str:
    user = next(u for u in load.users if u.name == name)
    if "X-User" in user.headers:
        return "header"
    return "src" if name in load.cookieless else "cookie"


def moved(load: Load, since: float, until: float | None = None) -> dict[str, set[str]]:
    """Users (any kind) answered by more than one backend in [since, until)."""
    seen: dict[str, set[str]] = {}
    for r in load.records():
        if r.t < since or (until is not None and r.t >= until):
            continue
        if r.status == 200 and r.served_by is not None:
            seen.setdefault(r.user, set()).add(r.served_by)
    return {user: backends for user, backends in seen.items() if len(backends) > 1}


def settled(load: Load) -> None:
    """Every user has had an answer and every cookie keeper holds a cookie."""
    keepers = [u for u in load.users if u.name not in load.cookieless]
    wait_for(lambda: all(u.cookies for u in keepers) and len({r.user for r in load.records()}) == len(load.users),
             "every user has had an answer and every cookie keeper a cookie")


def load_until(load: Load, t: float, what: str) -> None:
    wait_for(lambda: load.now() >= t, what, timeout=max(1.0, t - load.now()) + 5)


def table_published(stack: Stack) -> bool:
    return stack.readyz()[0] == 200


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack(n_slots=3, env=CHAIN) as s:
        yield s


@pytest.fixture
def published(stack: Stack) -> Stack:
    """All three members UP and the table that names them published, before each fault."""
    stack.wait_up([0, 1, 2])
    wait_for(lambda: table_published(stack), "/readyz: the table is published")
    return stack


def test_agent_killed_with_the_table_published_moves_nobody(published: Stack) -> None:
    stack = published
    people, cookieless = crowd("127.6")
    with Load("127.0.0.1", stack.traffic_port, users=people, rate=RATE, duration=60, cookieless=cookieless) as load:
        settled(load)
        victim = stack.agent_pid()
        assert victim is not None
        t_kill = load.now()
        os.kill(victim, signal.SIGKILL)
        restarted = wait_for(lambda: stack.agent_pid() not in (None, victim), "run restarts the agent")
        ready = wait_for(lambda: table_published(stack), "the new agent publishes its table", timeout=20)
        t_back = load.now()
        load_until(load, t_back + 2, "two more seconds of load")
        summary = load.stop()
    gone = moved(load, t_kill)
    print(f"\n== agent killed (kill -9), table published\n   load: {summary}\n"
          f"   new agent after {restarted:.2f}s, its table current {restarted + ready:.2f}s after the kill\n"
          f"   during the outage: {load.summary(t_kill, t_back)}\n   users moved: {len(gone)}")
    assert summary.failed == 0, summary
    assert summary.sent >= 0.9 * RATE * summary.duration, summary
    assert not gone, {name: (kind(load, name), backends) for name, backends in sorted(gone.items())[:5]}


def test_agent_frozen_with_the_table_published_moves_nobody_and_delays_nothing(published: Stack) -> None:
    stack = published
    victim = stack.agent_pid()
    assert victim is not None
    people, cookieless = crowd("127.7")
    with Load("127.0.0.1", stack.traffic_port, users=people, rate=RATE, duration=60, cookieless=cookieless,
              keep_alive=True) as load:
        settled(load)
        t_stop = load.now()
        os.kill(victim, signal.SIGSTOP)
        try:
            load_until(load, t_stop + 3.0, "three seconds frozen")
        finally:
            os.kill(victim, signal.SIGCONT)
        t_cont = load.now()
        load_until(load, t_cont + 2.0, "two more seconds of load")
        summary = load.stop()
    frozen = load.summary(t_stop, t_cont)
    gone = moved(load, t_stop)
    print(f"\n== agent frozen (SIGSTOP 3 s), table published\n   load: {summary}\n"
          f"   during the freeze: {frozen}\n   users moved: {len(gone)}")
    assert summary.failed == 0, summary
    assert stack.agent_pid() == victim
    assert not gone, {name: (kind(load, name), backends) for name, backends in sorted(gone.items())[:5]}
    # Nobody waited for the frozen agent: every request was decided by the table. (Without it, the
    # first requests of a freeze each wait `timeout processing`; tests/test_degraded.py.)
    assert frozen.latency_max < PROCESSING_TIMEOUT, frozen


def test_readyz_waits_for_a_member_up_and_the_table() -> None:
    stack = Stack(n_slots=3, env=CHAIN)
    try:
        stack.start(wait=False, start_backends=False)
        wait_for(lambda: stack.readyz()[0] != 0, "the agent's /readyz answers")
        wait_for(lambda: len(stack.servers()) == 3, "the agent writes the three servers (in maintenance)")
        t_end = time.monotonic() + 2.0
        while time.monotonic() < t_end:  # no task listens: never ready
            status, body = stack.readyz()
            assert status == 503, body
        assert "up" in body, body
        slot_map = os.path.join(stack.run_dir, "slots.map")
        assert stack.map_entries(slot_map) == {}
        for i in range(3):
            stack.tasks[i].start()
        wait_for(lambda: table_published(stack), "/readyz 200 once members are UP and the table published")
        slots = stack.map_entries(slot_map)
        names = {r["srv_name"] for r in stack.servers() if r.get("srv_op_state") == "2"}
        assert len(slots) == TABLE_SIZE
        assert set(slots.values()) <= names and set(slots.values()), (set(slots.values()), names)
    finally:
        stack.stop()


def test_a_cold_start_switches_to_the_table_once() -> None:
    stack = Stack(n_slots=3, env=CHAIN)
    people, cookieless = crowd("127.8")
    try:
        stack.start(wait=False)
        wait_for(lambda: stack.readyz()[0] != 0, "the agent's /readyz answers")
        with Load("127.0.0.1", stack.traffic_port, users=people, rate=RATE, duration=60,
                  cookieless=cookieless) as load:
            # Until the agent's first servers are UP, HAProxy's DNS fallback serves: by the chain's
            # first key (the cookie), round-robin without it. From then on each user switches once at most.
            wait_for(lambda: bool(stack.up()), "the agent's first server is UP", timeout=30)
            t_servers = load.now()
            wait_for(lambda: table_published(stack), "/readyz: the table is published", timeout=30)
            t_ready = load.now()
            load_until(load, t_ready + 3, "three seconds of load after /readyz 200")
            summary = load.stop()
        switches: dict[str, int] = {}
        for u in load.users:
            served = [r.served_by for r in load.records() if r.user == u.name and r.status == 200
                      and r.t >= t_servers]
            switches[u.name] = sum(a != b for a, b in pairwise(served))
        after = moved(load, t_ready)
        first_ok = min((r.t for r in load.records() if r.status == 200), default=None)
        print(f"\n== cold start under load\n   load: {summary}\n   /readyz 200 at +{t_ready:.2f}s; "
              f"users that switched once: {sum(n == 1 for n in switches.values())}, more: "
              f"{sum(n > 1 for n in switches.values())}; moved after /readyz: {len(after)}")
        assert first_ok is not None and load.summary(first_ok).failed == 0, load.summary(first_ok)
        assert max(switches.values()) <= 1, {n: (kind(load, n), k) for n, k in switches.items() if k > 1}
        assert not after, {name: (kind(load, name), b) for name, b in sorted(after.items())[:5]}
    finally:
        stack.stop()


def test_a_health_change_is_in_the_table_within_a_second(published: Stack) -> None:
    """A task that stops answering leaves the table within a second of HAProxy marking it DOWN,
    and is back in it within a second of HAProxy marking it UP again."""
    stack = published
    slot_map = os.path.join(stack.run_dir, "slots.map")
    victim = stack.tasks[1]
    server = f"{victim.ip}_{victim.port}"

    # One of its slots stands for all of them (a publication replaces the whole map at once); asking
    # for that one entry keeps the polling from loading HAProxy with 65,536-line dumps.
    probe = next(slot for slot, name in stack.map_entries(slot_map).items() if name == server)

    def named() -> bool:
        return f'value="{server}"' in stack.command(f"get map {slot_map} {probe}")

    assert named()
    victim.stop()  # still in DNS
    wait_for(lambda: victim.address not in stack.up(), "HAProxy marks it DOWN")
    gone = wait_for(lambda: not named(), "the table no longer names it", timeout=5)
    victim.start()
    wait_for(lambda: victim.address in stack.up(), "HAProxy marks it UP", timeout=20)
    back = wait_for(named, "the table names it again", timeout=5)
    print(f"\nout of the table {gone:.2f}s after DOWN, back {back:.2f}s after UP")
    assert gone <= 1.0 and back <= 1.0, (gone, back)
