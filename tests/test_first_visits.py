"""First visits behind one shared address: placed by HAProxy by load, then sticky by cookie.

Behind Swarm's routing mesh (or a NAT) every client reaches HAProxy from one address. Real HAProxy
(the shipped config, HAPROXY_BIN), real dnsmasq, real backends, `haproxy-swarm run`, the default
key chain (`cookie:SWARMID`): every user here connects from 127.0.0.1 with its own cookie jar.
- 120 new users over 3 tasks: each task gets a fair share (a binomial spread, not one task), every
  user comes back to its task, and the agent sees no SPOE exchange for any of it;
- the same with the agent frozen (SIGSTOP): HAProxy needs nothing from it for a first visit;
- scale 3 -> 4: new users reach the new task, no cookie holder moves.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from polling import wait_for

from spoa.local.client import User
from spoa.local.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

SHARED = "127.0.0.1"  # every user's address, as behind the routing mesh
# 120 users over 3 tasks, each placed independently with p = 1/3: a share outside 20..60 has a
# probability below 1e-5. By load (leastconn) the spread is tighter still; all on one task is 120.
FAIR = range(20, 61)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack(n_slots=4, env={"STICKY_KEY": "cookie:SWARMID"}) as s:
        yield s


@pytest.fixture
def three(stack: Stack) -> Stack:
    stack.scale([0, 1, 2])  # and waits for the agent's table (the server -> cookie map) in HAProxy
    return stack


def crowd(n: int, prefix: str) -> list[User]:
    return [User(f"{prefix}-{i}", SHARED) for i in range(n)]


def visit_all(stack: Stack, users: list[User]) -> dict[str, str]:
    """One request per user, eight at a time (so HAProxy places by load, not in a fixed turn)."""
    def visit(user: User) -> tuple[str, str]:
        answer = user.get("127.0.0.1", stack.traffic_port)
        assert answer.status == 200, f"{user.name}: HTTP {answer.status}"
        assert answer.served_by is not None
        return user.name, answer.served_by

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(pool.map(visit, users))


def notifies(stack: Stack) -> float:
    return stack.metric("haproxy_swarm_spop_frames_total", type="notify")


def test_new_users_from_one_address_get_a_fair_share_and_stay(three: Stack) -> None:
    before = notifies(three)
    new_before = three.metric("haproxy_swarm_decisions_total", source="new")
    users = crowd(120, "mesh")
    first = visit_all(three, users)
    assert all("SWARMID" in u.cookies for u in users), "every first visit sets the sticky cookie"
    shares = Counter(first.values())
    assert set(shares) == three.addresses([0, 1, 2]), shares
    assert all(n in FAIR for n in shares.values()), shares
    assert visit_all(three, users) == first, "every user comes back to its task"
    assert notifies(three) == before, "a first visit or a cookie the table knows asks the agent nothing"
    # HAProxy counts the first visits it placed (fe_main's table, read by the agent at a scrape).
    wait_for(lambda: three.metric("haproxy_swarm_decisions_total", source="new") - new_before >= 120,
             "the 120 first visits counted as source=new")
    assert three.metric("haproxy_swarm_decisions_total", source="new") - new_before == 120


def test_new_users_are_placed_while_the_agent_is_frozen(three: Stack) -> None:
    agent = three.agent_pid()
    assert agent is not None
    os.kill(agent, signal.SIGSTOP)
    try:
        users = crowd(90, "frozen")
        first = visit_all(three, users)
        shares = Counter(first.values())
        assert set(shares) == three.addresses([0, 1, 2]), shares
        assert all(15 <= n <= 45 for n in shares.values()), shares  # 90 users, p = 1/3: below 1e-4
        assert visit_all(three, users) == first
    finally:
        os.kill(agent, signal.SIGCONT)


def test_scale_up_new_users_reach_the_new_task_and_no_cookie_holder_moves(three: Stack) -> None:
    holders = crowd(60, "holder")
    before = visit_all(three, holders)
    three.scale([0, 1, 2, 3])
    assert visit_all(three, holders) == before, "scale-up moves no cookie holder"
    newcomers = crowd(80, "newcomer")
    shares = Counter(visit_all(three, newcomers).values())
    assert set(shares) == three.addresses([0, 1, 2, 3]), shares
    assert shares[three.tasks[3].address] >= 8, shares  # 80 users, p = 1/4: below 1e-4
