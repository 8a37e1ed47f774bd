"""A reload of HAProxy moves nobody: the rendered backends hold the agent's servers, with their states.

Real HAProxy (the shipped config, HAPROXY_BIN), real dnsmasq and backends, `haproxy-swarm run`, under
load from users of every key kind (sticky cookie, header, source address). HAProxy is reloaded both
ways an operator does it (SIGHUP to `run`; SIGUSR2 to HAProxy's master, which `run` does not see
coming): every user stays on its task through it and no request fails. Before the servers were
rendered into the config, a reload put every user on HAProxy's DNS fallback for about half a second
(measured: 881 of 16,500 requests answered by another task, docs/reliability.md).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from polling import wait_for

from spoa.local.client import User, users
from spoa.local.load import Load
from spoa.local.services import ON_DEMAND, Services
from spoa.local.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

CHAIN = {"STICKY_KEY": "cookie:SWARMID,header:X-User,src"}
RATE = 300.0


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack(n_slots=3, env=CHAIN | {"HAPROXY_LOG_LEVEL": "info"}) as s:  # the log of a moved user
        yield s


def crowd() -> tuple[list[User], float]:
    """30 header users, 30 source users (no cookie kept), 60 cookie users."""
    people = users(120, "r", network="127.9")
    for u in people[:30]:
        u.headers["X-User"] = f"user-{u.name}"
    return people, 60 / 120


def moved_users(load: Load, since: float) -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """(the tasks that served each user since `since`, the users served by more than one)."""
    served: dict[str, set[str]] = {}
    for r in load.records():
        if r.t >= since and r.status == 200 and r.served_by is not None:
            served.setdefault(r.user, set()).add(r.served_by)
    return served, {user: sorted(tasks) for user, tasks in served.items() if len(tasks) > 1}


@pytest.mark.parametrize("how", ["SIGHUP to run", "SIGUSR2 to the master"])
def test_a_reload_under_load_moves_nobody(stack: Stack, how: str) -> None:
    people, cookieless = crowd()
    with Load("127.0.0.1", stack.traffic_port, users=people, rate=RATE, duration=60, cookieless=cookieless) as load:
        keepers = [u for u in load.users if u.name not in load.cookieless]
        wait_for(lambda: all(u.cookies for u in keepers) and len({r.user for r in load.records()}) == len(people),
                 "every user has had an answer and every cookie keeper a cookie")
        # `run` saves the servers' states every 2 s (and before a reload of its own): a reload it does
        # not see coming starts from the last save.
        state = os.path.join(stack.run_dir, "servers.state")
        since = time.time()
        wait_for(lambda: os.path.getmtime(state) > since, "run saves the servers' states", timeout=5)
        t_settled = load.now()
        stack.reload(how)
        t_reloaded = load.now()
        wait_for(lambda: load.now() > t_reloaded + 2.0, "two seconds of load after the reload")
        summary = load.stop()
    served, moved = moved_users(load, t_settled)
    window = load.summary(t_settled, load.now())
    print(f"\n== reload ({how}) under load: {window}; users moved: {len(moved)}")
    assert summary.failed == 0, summary
    assert len(served) == len(people), "every user made requests across the reload"
    for user in sorted(moved)[:3]:  # what the log says of them, for a failure
        print(user, [(round(r.t - t_reloaded, 3), r.served_by, r.cookie_set) for r in load.records()
                     if r.user == user and r.t >= t_settled])
    if moved:
        with open(os.path.join(stack.run_dir, "haproxy.log"), errors="replace") as f:
            print("".join(line for line in f if "be_app/" in line or " r-" in line or ("fe_main" in line
                          and any(f"{u.source_ip}:" in line for u in people if u.name in moved))))
    assert not moved, sorted(moved.items())[:5]


def test_a_reload_moves_nobody_of_several_services_and_a_pattern() -> None:
    """Every kind of backend: a cookie service, a header-keyed one, the default, and a service a
    pattern found on demand (whose backend has no DNS fallback at all)."""
    services = Services([("shop", "shop.example.com", ""), ("api", "example.com/api", "key=header:X-User,src"),
                         ("www", None, ""), ("blog", ON_DEMAND, "")], n_slots=2,
                        patterns=[("*.apps.example.com", "max=2")])
    with services as s:
        people = users(80, "m", network="127.9")
        for n, u in enumerate(people):
            u.headers["Host"] = ("shop.example.com", "example.com", "www.example.com", "blog.apps.example.com")[n % 4]
            if n % 4 == 1:
                u.headers["X-User"] = f"user-{n}"
        with Load("127.0.0.1", s.traffic_port, users=people, rate=RATE, duration=60, path="/api/x") as load:
            wait_for(lambda: all(u.cookies or "X-User" in u.headers for u in people), "every cookie user has one")
            t_settled = load.now()
            s.reload("SIGHUP to run")
            t_reloaded = load.now()
            wait_for(lambda: load.now() > t_reloaded + 2.0, "two seconds of load after the reload")
            summary = load.stop()
    served, moved = moved_users(load, t_settled)
    print(f"\n== reload of several services and a pattern under load: {load.summary(t_settled, load.now())}; "
          f"users moved: {len(moved)}")
    assert summary.failed == 0, summary
    assert len(served) == len(people)
    assert {s.service_of(next(iter(tasks))) for tasks in served.values()} == {"shop", "api", "www", "blog"}
    assert not moved, sorted(moved.items())[:5]
