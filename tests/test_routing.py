"""Sticky decisions: the key chain, the issued cookie, DOWN and gone members, hostile input."""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from spoa.app import Agent
from spoa.config import load_settings
from spoa.member import Member
from spoa.protocol import Message, Scope, decode_actions
from spoa.routing import Router, cookie_value


def make_settings(**flags: str) -> Any:
    return load_settings(flags, {"SWARM_SERVICE": "tasks.backend:80", "COOKIE_SECRET": "s3cret"})


MEMBERS = [Member.parse(f"10.0.0.{i}", 80) for i in range(1, 6)]


def route(router: Router, **args: Any) -> dict[str, Any]:
    """Decode the ACK actions the router answers into {var name: value}."""
    full = {"sticky": None, "cookie": None, "header": None, "param": None, "src": None, "ssl": False} | args
    actions = decode_actions(router.handle([Message("route", full)]))
    assert actions, "an ACK always carries at least one action"
    out = {}
    for a in actions:
        assert a.scope == Scope.TRANSACTION
        value = a.value
        out[a.name] = value.decode() if isinstance(value, bytes) else value
    return out


def test_first_visit_by_source_ip_sets_the_cookie_then_the_cookie_decides() -> None:
    router = Router(make_settings(sticky_key="cookie:SWARMID,src"), MEMBERS)
    first = route(router, src=ipaddress.ip_address("192.0.2.7"))
    assert first["source"] == "src"
    member = next(m for m in MEMBERS if m.server_name == first["server"])
    assert first["addr"] == member.address
    value = cookie_value(member, "s3cret")
    assert first["set_cookie"] == f"SWARMID={value}; Path=/; HttpOnly; SameSite=Lax"
    again = route(router, sticky=value.encode(), src=ipaddress.ip_address("198.51.100.1"))
    assert again == {"server": member.server_name, "addr": member.address, "source": "cookie"}


def test_secure_and_max_age_attributes() -> None:
    router = Router(make_settings(cookie_max_age="3600"), MEMBERS)
    answer = route(router, src=ipaddress.ip_address("192.0.2.7"), ssl=True)
    assert answer["set_cookie"].endswith("; Path=/; HttpOnly; SameSite=Lax; Max-Age=3600; Secure")


def test_no_key_at_all_spreads_new_sessions_round_robin() -> None:
    router = Router(make_settings(sticky_key="cookie:SWARMID"), MEMBERS)
    seen = [route(router)["server"] for _ in range(10)]
    assert set(seen) == {m.server_name for m in MEMBERS}
    assert router.decisions[4] == 10  # "new"


def test_chain_order_header_before_src() -> None:
    router = Router(make_settings(sticky_key="header:X-User,src"), MEMBERS)
    a = route(router, header=b"alice", src=ipaddress.ip_address("192.0.2.1"))
    b = route(router, header=b"alice", src=ipaddress.ip_address("192.0.2.2"))
    assert a["source"] == b["source"] == "header"
    assert a["server"] == b["server"]
    assert "set_cookie" not in a  # the chain does not name the sticky cookie: nothing to issue
    c = route(router, src=ipaddress.ip_address("192.0.2.1"))
    assert c["source"] == "src"


def test_a_key_before_the_sticky_cookie_decides_and_issues_no_cookie() -> None:
    """`header:X-User,cookie:SWARMID,src`: the header wins whenever present, cookie or not; only the
    keys after the cookie issue one; HAProxy must not route by the cookie alone before the header
    (DECIDE=agent: it has no cookie map; DECIDE=table: it walks the chain, header first)."""
    chain = make_settings(sticky_key="header:X-User,cookie:SWARMID,src", decide="agent")
    assert chain.issues_cookie and not chain.cookie_first
    router = Router(chain, MEMBERS)
    src = ipaddress.ip_address("192.0.2.1")
    by_header = route(router, header=b"alice", src=src)
    assert by_header["source"] == "header" and "set_cookie" not in by_header
    by_src = route(router, src=src)
    assert by_src["source"] == "src" and "set_cookie" in by_src
    # A client holding a cookie for one member and a header for another goes where the header says.
    other = next(m for m in MEMBERS if m.server_name != by_header["server"])
    assert route(router, header=b"alice", sticky=router.cookie_value(other).encode())["server"] == by_header["server"]
    assert route(router, sticky=router.cookie_value(other).encode())["server"] == other.server_name
    assert router.cookie_map() == {}
    assert Agent(chain).writer.cookie_map is None  # HAProxy's cookie shortcut stays empty
    assert Agent(make_settings()).writer.cookie_map is not None
    # With the table, HAProxy consults the cookie map only at the cookie's place in the chain.
    table = make_settings(sticky_key="header:X-User,cookie:SWARMID,src")
    assert table.decide == "table" and table.chain_env()["STICKY_AT"] == "2"
    assert Router(table, MEMBERS).cookie_map() != {}


def test_scale_up_moves_no_cookie_session_and_new_members_get_new_sessions() -> None:
    router = Router(make_settings(), MEMBERS[:3])
    cookies = {}
    for i in range(300):
        answer = route(router, src=ipaddress.ip_address(f"192.0.{i // 250}.{i % 250 + 1}"))
        cookies[answer["set_cookie"].split(";")[0].split("=")[1]] = answer["server"]
    router.update(MEMBERS)
    for value, server in cookies.items():
        assert route(router, sticky=value.encode())["server"] == server
    fresh = {route(router, src=ipaddress.ip_address(f"203.0.113.{i}"))["server"] for i in range(1, 200)}
    assert {MEMBERS[3].server_name, MEMBERS[4].server_name} <= fresh


def test_cookie_of_a_gone_member_is_rerouted_and_reissued() -> None:
    router = Router(make_settings(sticky_key="cookie:SWARMID,src"), MEMBERS)
    gone = MEMBERS[0]
    router.update(MEMBERS[1:])
    answer = route(router, sticky=cookie_value(gone, "s3cret").encode(), src=ipaddress.ip_address("192.0.2.9"))
    assert answer["server"] != gone.server_name
    assert answer["source"] == "src"
    assert "set_cookie" in answer
    assert router.cookies_rerouted == 1


def test_cookie_of_a_down_member_is_served_elsewhere_without_reissue_and_returns_when_up() -> None:
    router = Router(make_settings(), MEMBERS)
    down = MEMBERS[2]
    value = cookie_value(down, "s3cret").encode()
    router.update(MEMBERS, up=[m for m in MEMBERS if m != down])
    meanwhile = route(router, sticky=value, src=ipaddress.ip_address("192.0.2.9"))
    assert meanwhile["server"] != down.server_name
    assert "set_cookie" not in meanwhile
    router.update(MEMBERS)
    assert route(router, sticky=value)["server"] == down.server_name


def test_no_member_up_means_no_decision() -> None:
    router = Router(make_settings(), [])
    assert route(router, src=ipaddress.ip_address("192.0.2.9")) == {"source": "none"}
    router.update(MEMBERS, up=[])
    assert route(router, src=ipaddress.ip_address("192.0.2.9")) == {"source": "none"}


def test_replicas_agree_whatever_their_history() -> None:
    a = Router(make_settings(), MEMBERS[:2])
    a.update(MEMBERS)
    a.update(MEMBERS[1:])
    b = Router(make_settings(), reversed(MEMBERS[1:]))
    for i in range(200):
        args = {"src": ipaddress.ip_address(f"198.51.100.{i}")}
        assert route(a, **args) == route(b, **args)
    assert a.cookie_map() == b.cookie_map()


def test_cookie_map_names_only_up_members() -> None:
    router = Router(make_settings(), MEMBERS)
    router.update(MEMBERS, up=MEMBERS[:2])
    assert sorted(router.cookie_map().values()) == sorted(m.server_name for m in MEMBERS[:2])
    assert Router(make_settings(sticky_key="src"), MEMBERS).cookie_map() == {}


HOSTILE_ROUTER = Router(make_settings(sticky_key="cookie:SWARMID,cookie:S,header:X-User,param:uid,src"), MEMBERS)


@settings(max_examples=300, deadline=None)
@given(sticky=st.one_of(st.none(), st.binary(max_size=70000), st.integers(), st.booleans()),
       cookie=st.one_of(st.none(), st.binary(max_size=3000)),
       header=st.one_of(st.none(), st.binary(max_size=3000), st.text(max_size=100)),
       param=st.one_of(st.none(), st.binary(max_size=100)))
def test_hostile_values_only_ever_answer_a_current_member(sticky: bytes | int | None, cookie: bytes | None,
                                                          header: Any, param: bytes | None) -> None:
    answer = route(HOSTILE_ROUTER, sticky=sticky, cookie=cookie, header=header, param=param)
    assert answer["server"] in {m.server_name for m in MEMBERS}


def test_a_down_member_only_has_its_own_keys_served_elsewhere_and_gets_them_back() -> None:
    router = Router(make_settings(sticky_key="header:X-User"), MEMBERS)
    keys = [f"user-{i}".encode() for i in range(2000)]
    before = {k: route(router, header=k)["server"] for k in keys}
    down = MEMBERS[1]
    router.update(MEMBERS, up=[m for m in MEMBERS if m != down])
    during = {k: route(router, header=k)["server"] for k in keys}
    for k in keys:
        if before[k] == down.server_name:
            assert during[k] != down.server_name
        else:
            assert during[k] == before[k]
    shares = router.shares()
    assert shares[down] == 0.0 and abs(sum(shares.values()) - 1.0) < 1e-9
    # Where its keys went is where they stay if it leaves for good: a scale-down moves them once.
    router.update([m for m in MEMBERS if m != down])
    assert {k: route(router, header=k)["server"] for k in keys} == during
    router.update(MEMBERS)
    assert {k: route(router, header=k)["server"] for k in keys} == before


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 12), down=st.sets(st.integers(0, 11)), rings_from_elsewhere=st.booleans())
def test_each_key_goes_to_its_ring_member_if_up_else_to_the_fallback_rings(
        n: int, down: set[int], rings_from_elsewhere: bool) -> None:
    """The router's per-slot target table gives exactly the two-ring rule, whoever built the rings
    (app.py builds them in a thread, from equal but distinct Member objects)."""
    from spoa.ring import Ring

    members = [Member.parse(f"10.1.0.{i}", 80) for i in range(1, n + 1)]
    up = [m for i, m in enumerate(members) if i not in down]
    router = Router(make_settings(sticky_key="header:X-User"))
    copies = [Member.parse(m.ip, m.port) for m in members]
    ring = Ring(copies) if rings_from_elsewhere else None
    fallback = Ring([c for c, m in zip(copies, members, strict=True) if m in up]) if rings_from_elsewhere else None
    router.update(members, up=up, ring=ring, fallback=fallback)
    reference_ring, reference_fallback = Ring(members), Ring(up)
    for i in range(300):
        key = f"k{i}".encode()
        decision = router.decide({"header": key})
        if not up:
            assert decision.member is None
            continue
        member = reference_ring.lookup(key)
        assert decision.member == (member if member in up else reference_fallback.lookup(key))
    # Shares: each slot counted for the member it really goes to.
    counts = Counter(m if m in up else f for m, f in zip(reference_ring.table, reference_fallback.table,
                                                          strict=True)) if up else Counter()
    assert router.shares() == {m: counts[m] / len(reference_ring.table) for m in members}
