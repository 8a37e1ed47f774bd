"""Services found on demand (issue 12): a pattern `*.apps.example.com tasks.{1}:<port>` in the file,
real HAProxy (the shipped config), real dnsmasq serving `tasks.<name>`, real backends per service.

Proves: the first request for a Host is where the agent finds its service (DNS, servers, table) and
answers; later ones are decided by HAProxy alone; a Host whose service does not exist gets a 404
at once and is remembered; only Hosts of the pattern's shape are ever looked up; `max=` bounds the
services; random Hosts grow neither the servers, nor the look-ups, nor the memory beyond the
limits; a service with no members is forgotten and its slot freed; an agent restart keeps them.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from polling import wait_for

from spoa.local.client import User
from spoa.local.services import ON_DEMAND, Services

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

LOOKUPS_PER_SECOND = 4
ENV = {"ONDEMAND_MISS_TTL": "4", "ONDEMAND_LOOKUPS": str(LOOKUPS_PER_SECOND), "ONDEMAND_FORGET": "2"}


@pytest.fixture(scope="module")
def apps() -> Iterator[Services]:
    services = Services([("www", None, ""), ("shop", ON_DEMAND, ""), ("blog", ON_DEMAND, ""), ("news", ON_DEMAND, ""),
                         ("extra", ON_DEMAND, "")], n_slots=2, env=ENV, patterns=[("*.apps.example.com", "max=3")])
    with services:
        yield services


def get(stack: Services, host: str, who: User | None = None, path: str = "/") -> tuple[int, str | None, float]:
    """(status, the service that answered, seconds)."""
    who = who or User("u", "127.1.0.1")
    who.headers["Host"] = host
    started = time.monotonic()
    answer = who.get("127.0.0.1", stack.traffic_port, path)
    return answer.status, stack.service_of(answer.served_by), time.monotonic() - started


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def lookups(stack: Services, outcome: str) -> float:
    return stack.metric("haproxy_swarm_ondemand_lookups_total", outcome=outcome)


def ondemand_map(stack: Services) -> dict[str, str]:
    return stack.map_entries(os.path.join(stack.run_dir, "ondemand.map"))


def test_two_new_hosts_at_once_take_two_slots(apps: Services) -> None:
    """Two first look-ups in the same moment: each claims its own slot before waiting for DNS."""
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda host: get(apps, host)[:2], ["shop.apps.example.com", "blog.apps.example.com"]))
    assert answers == [(200, "shop"), (200, "blog")]
    placed = ondemand_map(apps)
    assert placed["shop.apps.example.com"] != placed["blog.apps.example.com"], placed


def test_a_host_without_a_service_is_a_quick_404_and_remembered(apps: Services) -> None:
    """(With a slot free: a pattern whose slots are all taken answers 404 before asking DNS.)"""
    missing = lookups(apps, "missing")
    status, _, seconds = get(apps, "nosuch.apps.example.com")
    assert status == 404 and seconds < 5.0, seconds  # one DNS look-up, no waiting for a slot
    assert lookups(apps, "missing") == missing + 1
    cached = lookups(apps, "cached")
    for _ in range(5):
        assert get(apps, "nosuch.apps.example.com")[0] == 404
    assert lookups(apps, "cached") == cached + 5 and lookups(apps, "missing") == missing + 1


def test_first_request_finds_the_service_then_haproxy_decides(apps: Services) -> None:
    found = lookups(apps, "found")
    status, service, seconds = get(apps, "news.apps.example.com")
    assert (status, service) == (200, "news")
    print(f"\nfirst request for news.apps.example.com: {seconds * 1000:.0f} ms (DNS, servers, first checks, table)")
    assert lookups(apps, "found") == found + 1
    assert ondemand_map(apps)["news.apps.example.com"].startswith("be_apps_")
    # Later requests: HAProxy decides from its maps; the agent is not asked again.
    asked = sum(lookups(apps, o) for o in ("found", "known", "unready"))
    shopper = User("shopper", "127.1.0.2")
    first = get(apps, "shop.apps.example.com", shopper)
    assert shopper.cookies.get("SWARMID_apps"), shopper.cookies
    for _ in range(20):
        assert get(apps, "SHOP.apps.example.com:8099", shopper)[:2] == first[:2]
    assert sum(lookups(apps, o) for o in ("found", "known", "unready")) == asked


def test_only_hosts_of_the_patterns_shape_are_looked_up(apps: Services) -> None:
    invalid = lookups(apps, "invalid")
    for host in ("a.b.apps.example.com", "-x.apps.example.com"):
        assert get(apps, host)[0] == 404, host
    assert lookups(apps, "invalid") == invalid + 2
    assert get(apps, "apps.example.com")[:2] == (200, "www")  # not the pattern's: the default service


def test_max_bounds_the_services_found(apps: Services) -> None:
    for name in ("shop", "blog", "news"):
        assert get(apps, f"{name}.apps.example.com")[:2] == (200, name)
    full = lookups(apps, "full")
    assert get(apps, "extra.apps.example.com")[0] == 404  # max=3: every slot taken
    assert lookups(apps, "full") == full + 1
    assert apps.metric("haproxy_swarm_ondemand_services", state="found") == 3


def test_random_hosts_grow_nothing_beyond_the_limits(apps: Services) -> None:
    servers_before = {name: len(apps.servers_of(name)) for name in ("apps_1", "apps_2", "apps_3")}
    dns_before = sum(lookups(apps, o) for o in ("found", "missing", "full"))
    agent = apps.agent_pid()
    assert agent is not None
    get(apps, "warmup.apps.example.com")
    rss_before = rss_kib(agent)
    started = time.monotonic()
    statuses = [get(apps, f"r{n}x{os.getpid()}.apps.example.com")[0] for n in range(1000)]
    elapsed = time.monotonic() - started
    grown = rss_kib(agent) - rss_before
    assert set(statuses) == {404}
    dns = sum(lookups(apps, o) for o in ("found", "missing", "full")) - dns_before
    budget = LOOKUPS_PER_SECOND * (elapsed + 1) + LOOKUPS_PER_SECOND
    print(f"\n1,000 random Hosts in {elapsed:.1f}s: {dns:.0f} looked up (budget {budget:.0f}), "
          f"{lookups(apps, 'limited'):.0f} refused by the rate; agent RSS {grown:+d} KiB")
    assert dns <= budget
    assert grown < 4096, f"the agent grew by {grown} KiB"
    assert lookups(apps, "limited") > 0
    assert {name: len(apps.servers_of(name)) for name in servers_before} == servers_before
    assert apps.metric("haproxy_swarm_ondemand_misses") <= 10_000


def test_an_agent_restart_keeps_the_services_found(apps: Services) -> None:
    assert get(apps, "shop.apps.example.com")[:2] == (200, "shop")
    agent = apps.agent_pid()
    assert agent is not None
    os.kill(agent, signal.SIGKILL)
    # HAProxy serves on from its maps while no agent runs
    for _ in range(10):
        assert get(apps, "shop.apps.example.com")[:2] == (200, "shop")
    wait_for(lambda: apps.agent_pid() not in (None, agent), "the agent restarted", timeout=20)
    def adopted() -> bool:
        try:
            return apps.metric("haproxy_swarm_ondemand_services", state="found") >= 1
        except OSError:  # its metrics port is not open yet
            return False

    wait_for(adopted, "the restarted agent adopts the services found before", timeout=20)
    assert get(apps, "shop.apps.example.com")[:2] == (200, "shop")


def test_a_service_without_members_is_forgotten(apps: Services) -> None:
    assert get(apps, "blog.apps.example.com")[:2] == (200, "blog")
    apps.scale_service("blog", [], wait=False)
    wait_for(lambda: "blog.apps.example.com" not in ondemand_map(apps), "blog forgotten", timeout=30)
    assert get(apps, "blog.apps.example.com")[0] == 404
    # its slot is free again: extra (refused while every slot was taken) is found now
    wait_for(lambda: get(apps, "extra.apps.example.com")[:2] == (200, "extra"), "extra found in the freed slot",
             timeout=15)
    apps.scale_service("blog", [0, 1], wait=False)
