"""Replicas agree (issue 4): two `haproxy-swarm run` that saw different membership histories route
every cookie, header and source key to the same member.

One dnsmasq and one set of backends, two complete instances (each its own HAProxy, agent and
ports). `early` starts with three members and sees a scale-up to five and a scale-down to four;
`late` starts after all that, with the four. Native HAProxy 2.6 hashing, measured with the same
histories, routed 100 % of users differently (shared/DESIGN.md): its hash depends on server ids,
which depend on the order servers were added. Ours depends on the member set alone, and the cookie
value on the member and the shared COOKIE_SECRET, so a cookie issued by one replica is honoured by
the other.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from spoa.local.client import User, users
from spoa.local.dnsmasq import Dnsmasq
from spoa.local.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

STICKY_KEY = "cookie:SWARMID,header:X-User,src"
FINAL = [0, 1, 3, 4]


@pytest.fixture(scope="module")
def replicas() -> Iterator[tuple[Stack, Stack]]:
    with Dnsmasq() as dns:
        early = Stack(n_slots=5, dns=dns, env={"STICKY_KEY": STICKY_KEY})
        try:
            early.start([0, 1, 2])
            early.scale([0, 1, 2, 3, 4])  # seen by `early` only
            early.scale(FINAL)  # task-3 leaves
            late = Stack(dns=dns, tasks=early.tasks, env={"STICKY_KEY": STICKY_KEY})
            try:
                late.start(FINAL)  # returns when FINAL is UP in its HAProxy
                yield early, late
            finally:
                late.stop()
        finally:
            early.stop()


def visit(stack: Stack, user: User, keep_cookie: bool = True) -> str:
    answer = user.get("127.0.0.1", stack.traffic_port)
    assert answer.status == 200, f"{user.name}: HTTP {answer.status}"
    assert answer.served_by is not None
    if not keep_cookie:
        user.cookies.clear()
    return answer.served_by


def assert_agree(first: dict[str, str], second: dict[str, str], what: str, members: set[str]) -> None:
    differ = {k: (first[k], second[k]) for k in first if first[k] != second[k]}
    print(f"\n{what}: {len(first) - len(differ)} of {len(first)} routed alike; spread {Counter(first.values())}")
    assert not differ, f"{what}: {len(differ)} routed differently, e.g. {sorted(differ.items())[:3]}"
    assert set(first.values()) == members, f"{what}: the keys reach every member"


def test_the_histories_differ_but_the_members_are_the_same(replicas: tuple[Stack, Stack]) -> None:
    early, late = replicas
    assert early.up() == late.up() == early.addresses(FINAL)
    # Different histories: HAProxy numbered the servers in a different order on each.
    ids = [{r["srv_name"]: r["srv_id"] for r in s.servers() if r["srv_addr"] in {t.ip for t in s.tasks}}
           for s in (early, late)]
    assert ids[0] != ids[1], ids


def test_source_keys_route_alike(replicas: tuple[Stack, Stack]) -> None:
    early, late = replicas
    crowd = users(200, "src", network="127.6")  # no cookie kept: routed by the source address
    on_early = {u.name: visit(early, u, keep_cookie=False) for u in crowd}
    on_late = {u.name: visit(late, u, keep_cookie=False) for u in crowd}
    assert_agree(on_early, on_late, "source keys", early.addresses(FINAL))


def test_header_keys_route_alike(replicas: tuple[Stack, Stack]) -> None:
    early, late = replicas
    # All from one address: only the header can spread them.
    crowd = [User(f"hdr-{i}", "127.0.0.1", headers={"X-User": f"customer-{i}"}) for i in range(150)]
    on_early = {u.name: visit(early, u, keep_cookie=False) for u in crowd}
    on_late = {u.name: visit(late, u, keep_cookie=False) for u in crowd}
    assert_agree(on_early, on_late, "header keys", early.addresses(FINAL))


def test_cookies_issued_by_one_replica_are_honoured_by_the_other(replicas: tuple[Stack, Stack]) -> None:
    early, late = replicas
    members = early.addresses(FINAL)
    for issuer, other, network in ((early, late, "127.7"), (late, early, "127.8")):
        crowd = users(100, f"cookie-{issuer.traffic_port}", network=network)
        issued = {u.name: visit(issuer, u) for u in crowd}
        assert all("SWARMID" in u.cookies for u in crowd)
        cookies = {u.name: dict(u.cookies) for u in crowd}
        honoured = {u.name: visit(other, u) for u in crowd}
        assert {u.name: dict(u.cookies) for u in crowd} == cookies, "the other replica re-issued no cookie"
        # And it is the cookie that decides, not the address: the same cookie from somewhere else.
        for u in crowd:
            u.source_ip = "127.0.0.1"
        moved_elsewhere = {u.name: visit(other, u) for u in crowd}
        assert_agree(issued, honoured, f"cookies from :{issuer.traffic_port}", members)
        assert moved_elsewhere == issued
