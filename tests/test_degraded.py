"""Degraded modes under load (issue 4, shared/DESIGN.md "Degraded modes"): 0 failed requests.

Everything real on loopback: `haproxy-swarm run` (HAProxy 2.6, the shipped config, the agent, with
DECIDE=agent: the SPOE path; the same faults with the decision table: tests/test_table_degraded.py),
dnsmasq, three backends. A bounded load (`spoa.local.load`) of 200 requests/s from 200 users, each
its own 127.x source address: half keep their sticky cookie (routed by HAProxy's cookie map once
they have one), half keep none (every request asks the agent, so the agent is on the request path).
A request fails when its answer is anything but a 200, connection errors and timeouts included.

- the agent killed with kill -9: 0 failed; `run` restarts it and the new agent decides again;
  cookie holders never move;
- the agent killed while DNS does not answer: the new agent adopts the servers HAProxy holds, so
  nothing is drained, 0 failed, cookie holders never move;
- the agent frozen (SIGSTOP 3 s, then SIGCONT): 0 failed, no request waits for the frozen agent
  longer than `timeout processing` (+ slack); cookie holders never move; it decides again after;
- an operator's reload of HAProxy, both ways (SIGHUP to `run`; SIGUSR2 to HAProxy's master): 0
  failed; the agent writes its servers back within one refresh (`show servers state`), and cookie
  holders are back on their own member afterwards.

Figures are printed (`pytest -s tests/test_degraded.py`).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from polling import wait_for

from spoa.local.load import Load, Record, Summary
from spoa.local.ports import free_port
from spoa.local.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

RATE = 200.0
USERS = 200
DECISIONS = "haproxy_swarm_decisions_total"
PROCESSING_TIMEOUT = 0.050  # spoe.conf `timeout processing`
SLOW = 0.040  # a request this slow waited for the agent (they take ~1 ms otherwise)




def load_until(load: Load, t: float, what: str) -> None:
    """Let the load run until its clock reads `t`."""
    wait_for(lambda: load.now() >= t, what, timeout=max(1.0, t - load.now()) + 5)


def decisions(stack: Stack, **labels: str) -> float | None:
    """The agent's decisions counter, None while its metrics do not answer (it is down or frozen)."""
    try:
        return stack.metric(DECISIONS, **labels)
    except OSError:
        return None


def settled(stack: Stack, load: Load) -> None:
    """Every user has made a request and every cookie keeper holds a cookie."""
    keepers = [u for u in load.users if u.name not in load.cookieless]
    wait_for(lambda: all(u.cookies for u in keepers) and len({r.user for r in load.records()}) == USERS,
             "every user has had an answer and every cookie keeper a cookie")


def cookie_holders_moved(load: Load, since: float, until: float | None = None) -> dict[str, set[str]]:
    """Users who held a cookie at `since` and got answers from more than one backend after it."""
    seen: dict[str, set[str]] = {}
    for r in load.records():
        if r.user in load.cookieless or r.t < since or (until is not None and r.t >= until):
            continue
        if r.status == 200 and r.served_by is not None:
            seen.setdefault(r.user, set()).add(r.served_by)
    return {user: backends for user, backends in seen.items() if len(backends) > 1}


def slow_window(records: list[Record], since: float, until: float = float("inf")) -> tuple[float, float] | None:
    """(first, last) send times in [since, until) of requests slower than SLOW, or None."""
    slow = [r.t for r in records if since <= r.t < until and r.latency > SLOW]
    return (min(slow), max(slow)) if slow else None


def report(title: str, lines: list[str], summary: Summary) -> None:
    print(f"\n== {title}\n   load: {summary}")
    for line in lines:
        print(f"   {line}")


def assert_load_held(summary: Summary, seconds: float) -> None:
    assert summary.failed == 0, summary
    assert summary.sent >= 0.9 * RATE * seconds, f"the load did not reach its rate: {summary}"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # DECIDE=agent: the SPOE path, where the agent is on the request path of every cookieless user.
    # With the table (the default) nobody waits for the agent: tests/test_table_degraded.py.
    # `src` in the chain: the agent decides the cookieless users by their address.
    with Stack(n_slots=3, env={"DECIDE": "agent", "STICKY_KEY": "cookie:SWARMID,src"}) as s:
        yield s


@pytest.fixture
def healthy(stack: Stack) -> Stack:
    """All three members UP in HAProxy and the agent answering, before each fault."""
    stack.wait_up([0, 1, 2])
    wait_for(lambda: decisions(stack) is not None, "the agent's metrics answer")
    return stack


def test_the_load_counts_what_fails() -> None:
    # The instrument first: against a port where nothing listens every request is a failure.
    port = free_port()
    with Load("127.0.0.1", port, users=20, rate=100, duration=0.5, timeout=1.0) as load:
        summary = load.wait(10)
    assert summary.sent >= 40 and summary.failed == summary.sent, summary
    assert summary.statuses == {0: summary.sent}
    assert not load.running


def test_agent_killed_costs_no_request_and_run_restarts_it(healthy: Stack) -> None:
    stack = healthy
    with Load("127.0.0.1", stack.traffic_port, users=USERS, rate=RATE, duration=60, cookieless=0.5) as load:
        settled(stack, load)
        victim = stack.agent_pid()
        assert victim is not None
        t_kill = load.now()
        os.kill(victim, signal.SIGKILL)
        restarted = wait_for(lambda: stack.agent_pid() not in (None, victim), "run restarts the agent")
        # Back in charge: the new agent's own counter (it starts at 0) moves with the cookieless users.
        deciding = wait_for(lambda: (decisions(stack) or 0) > 0, "the new agent decides again")
        back = load.now()
        stack.wait_up([0, 1, 2])
        load_until(load, back + 2, "two more seconds of load")
        summary = load.stop()
    moved = cookie_holders_moved(load, t_kill)
    window = slow_window(load.records(), t_kill)
    report("agent killed (kill -9)", [
        f"new agent pid after {restarted:.2f}s; deciding again {deciding + restarted:.2f}s after the kill",
        f"requests slower than {SLOW * 1000:.0f} ms: "
        + (f"from +{window[0] - t_kill:.2f}s to +{window[1] - t_kill:.2f}s" if window else "none"),
        f"during the outage: {load.summary(t_kill, back)}",
        f"cookie holders moved: {len(moved)}",
    ], summary)
    assert_load_held(summary, summary.duration)
    assert not moved, f"cookie holders moved: {sorted(moved.items())[:5]}"
    assert stack.agent_pid() not in (None, victim)


def test_agent_restarted_while_dns_is_down_keeps_every_member(healthy: Stack) -> None:
    """The new agent adopts the servers HAProxy holds: a DNS outage at its start empties nothing."""
    stack = healthy
    members = stack.addresses([0, 1, 2])
    with Load("127.0.0.1", stack.traffic_port, users=USERS, rate=RATE, duration=60, cookieless=0.5) as load:
        settled(stack, load)
        stack.dns.pause()  # every query goes unanswered (times out)
        try:
            victim = stack.agent_pid()
            assert victim is not None
            t_kill = load.now()
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: stack.agent_pid() not in (None, victim), "run restarts the agent")
            # Deciding by source for the cookieless users: it routes to the members it adopted.
            deciding = wait_for(lambda: (decisions(stack, source="src") or 0) > 0, "the new agent decides")
            t_decides = load.now()
            # Past MEMBER_GRACE and a drain: with nothing adopted, every server would be gone by now.
            grace = float(stack.env()["MEMBER_GRACE"]) + float(stack.env()["DRAIN_TIMEOUT"])
            load_until(load, t_decides + grace + 1.0, "the grace and a drain, with DNS still down")
            assert stack.up() == members, stack.servers()
            assert stack.metric("haproxy_swarm_members", state="known") == 3
            assert stack.metric("haproxy_swarm_members", state="up") == 3
        finally:
            stack.dns.resume()
        summary = load.stop()
    moved = cookie_holders_moved(load, t_kill)
    report("agent restarted while DNS is down", [
        f"deciding again {deciding:.2f}s after the restart, on the {len(members)} members HAProxy held",
        f"cookie holders moved: {len(moved)}",
    ], summary)
    assert_load_held(summary, summary.duration)
    assert not moved, f"cookie holders moved: {sorted(moved.items())[:5]}"


def test_agent_frozen_costs_no_request(healthy: Stack) -> None:
    stack = healthy
    victim = stack.agent_pid()
    assert victim is not None
    with Load("127.0.0.1", stack.traffic_port, users=USERS, rate=RATE, duration=60, cookieless=0.5,
              keep_alive=True) as load:
        settled(stack, load)
        before = decisions(stack)
        assert before is not None
        t_stop = load.now()
        os.kill(victim, signal.SIGSTOP)
        try:
            load_until(load, t_stop + 3.0, "three seconds frozen")
        finally:
            os.kill(victim, signal.SIGCONT)
        t_cont = load.now()
        deciding = wait_for(lambda: (decisions(stack) or 0) > before + 10, "the thawed agent decides again")
        load_until(load, t_cont + deciding + 2, "two more seconds of load")
        summary = load.stop()
    frozen = load.summary(t_stop, t_cont)
    # Slow requests while frozen only: after SIGCONT the agent is a different story (new HELLOs).
    window = slow_window(load.records(), t_stop, t_cont)
    moved = cookie_holders_moved(load, t_stop)
    report("agent frozen (SIGSTOP 3 s, SIGCONT)", [
        f"during the freeze: {frozen}",
        f"requests slower than {SLOW * 1000:.0f} ms: "
        + (f"{sum(r.latency > SLOW for r in load.records() if r.t >= t_stop)}, from +{window[0] - t_stop:.2f}s "
           f"to +{window[1] - t_stop:.2f}s after SIGSTOP" if window else "none"),
        f"deciding again {deciding:.2f}s after SIGCONT; cookie holders moved: {len(moved)}",
    ], summary)
    assert_load_held(summary, summary.duration)
    assert stack.agent_pid() == victim, "a frozen agent is not restarted: it comes back by itself"
    # No request waited for the frozen agent: `timeout processing` bounds each one, then HAProxy's
    # spop-check marks the agent DOWN and shutdown-sessions makes the rest skip it at once.
    assert frozen.latency_max < PROCESSING_TIMEOUT + 0.45, frozen
    assert window is not None and window[1] - t_stop < 2.5, "the agent was marked DOWN within ~1 s"
    assert not moved, f"cookie holders moved: {sorted(moved.items())[:5]}"


def reload_and_measure(stack: Stack, how: str) -> tuple[float, float, float]:
    """Reload HAProxy `how`; return (new worker, agent's servers there, all UP) in seconds."""
    master = stack.haproxy_pid()
    start = time.monotonic()
    worker = stack.reload(how)
    want = stack.addresses([0, 1, 2])
    wait_for(lambda: {f"{r['srv_addr']}:{r['srv_port']}" for r in stack.servers()} == want,
             "the new worker has the agent's servers")
    written = time.monotonic() - start
    stack.wait_up([0, 1, 2])
    up = time.monotonic() - start
    assert stack.haproxy_pid() == master, "a reload keeps the master"
    return worker, written, up


def test_operator_reload_costs_no_request_and_the_agent_writes_its_servers_back(healthy: Stack) -> None:
    stack = healthy
    lines: list[str] = []
    with Load("127.0.0.1", stack.traffic_port, users=USERS, rate=RATE, duration=60, cookieless=0.5) as load:
        settled(stack, load)
        home = {u.name: u.history[-1] for u in load.users if u.name not in load.cookieless}
        for how in ("SIGHUP to run", "SIGUSR2 to the master"):
            t0 = load.now()
            worker, written, up = reload_and_measure(stack, how)
            # Within one refresh: the agent reads `show servers state` at least every DNS_REFRESH.
            assert written - worker <= 2 * stack.refresh + 0.5, (how, worker, written)
            load_until(load, t0 + up + 1.0, "a second of load after the reload")
            lines.append(f"{how}: new worker after {worker:.2f}s, servers written back {written - worker:.2f}s "
                         f"later, UP {up:.2f}s after the reload; window: {load.summary(t0, load.now())}")
        # Cookie holders are back on their own member: the agent's cookie map is written back too.
        t_back = load.now()
        load_until(load, t_back + 1.5, "every user has made a request since")
        summary = load.stop()
    after = {}
    for r in load.records():
        if r.t >= t_back and r.user in home and r.status == 200:
            after[r.user] = r.served_by
    report("operator reloads (SIGHUP to run; SIGUSR2 to the master)", lines, summary)
    assert_load_held(summary, summary.duration)
    assert after and all(after[u] == home[u] for u in after), "cookie holders back on their member"

