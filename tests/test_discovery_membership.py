"""The membership rules, with `now` as a number: no sockets, no sleeping."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoa.discovery.membership import Change, Membership
from spoa.discovery.outage import OutageLog
from spoa.member import Member

A, B, C, D = (Member.parse(f"10.0.0.{i}", 80) for i in range(1, 5))
GRACE = 10.0


def test_first_answer_adds_everything() -> None:
    m = Membership(GRACE)
    change = m.answer([A, B, C], now=0)
    assert change.added == {A, B, C}
    assert change.removed == set()
    assert change.members == {A, B, C} == m.members
    assert change


def test_adopted_members_stay_through_failures_and_get_their_grace() -> None:
    """An agent restarted while DNS is down adopts what HAProxy holds: nothing is emptied."""
    m = Membership(GRACE)
    change = m.adopt([A, B, C])
    assert change.added == {A, B, C} and m.members == {A, B, C}
    assert not m.failure(now=0) and not m.nxdomain(now=1)  # NXDOMAIN: like a failure until the grace
    change = m.answer([A, D], now=5)  # a partial first answer: B and C wait for their grace
    assert change.added == {D} and not change.removed and m.members == {A, B, C, D}
    assert m.answer([A, D], now=1 + GRACE).removed == {B, C}
    # Only before the first answer: afterwards, answers alone say who is a member.
    assert not m.adopt([B]) and B not in m.members


def test_same_answer_again_is_no_change() -> None:
    m = Membership(GRACE)
    m.answer([A, B], now=0)
    change = m.answer([B, A], now=2)
    assert not change
    assert change.members == {A, B}


def test_new_member_joins_at_once() -> None:
    m = Membership(GRACE)
    m.answer([A], now=0)
    change = m.answer([A, B], now=2)
    assert change.added == {B} and not change.removed
    assert m.members == {A, B}


def test_missing_member_stays_until_grace_then_goes() -> None:
    m = Membership(GRACE)
    m.answer([A, B], now=0)
    assert not m.answer([A], now=2)  # missing since 2
    assert m.members == {A, B}
    assert m.missing == {B: 2}
    assert m.removal_due() == 12
    assert not m.answer([A], now=11.9)
    change = m.answer([A], now=12)
    assert change.removed == {B} and not change.added
    assert m.members == {A}
    assert m.missing == {}
    assert m.removal_due() is None


def test_member_back_before_grace_simply_stays_and_clock_restarts() -> None:
    m = Membership(GRACE)
    m.answer([A, B], now=0)
    m.answer([A], now=2)
    change = m.answer([A, B], now=8)
    assert not change  # neither added nor removed: it never left
    assert m.missing == {}
    m.answer([A], now=9)  # missing again: a new grace from 9
    assert not m.answer([A], now=18)
    assert m.answer([A], now=19).removed == {B}


def test_failures_keep_members_and_do_not_reset_pending_removals() -> None:
    m = Membership(GRACE)
    m.answer([A, B], now=0)
    for t in range(1, 100):
        change = m.failure(now=t)
        assert not change
        assert change.members == {A, B}
    m2 = Membership(GRACE)
    m2.answer([A, B], now=0)
    m2.answer([A], now=1)
    m2.failure(now=5)
    m2.failure(now=20)  # a failure never removes, even past the grace
    assert m2.members == {A, B}
    assert m2.answer([A], now=21).removed == {B}  # the next answer that still lacks B does


def test_a_partial_answer_speaks_only_for_the_family_that_answered() -> None:
    """Issue 13: AAAA refused, A answered: IPv6 members stay as on a failure, IPv4 follow the answer."""
    v6a, v6b = Member.parse("fd00::1", 80), Member.parse("fd00::2", 80)
    m = Membership(GRACE)
    m.answer([A, B, v6a, v6b], now=0)
    m.answer([A, B, v6a], now=1)  # v6b missing since 1
    change = m.answer([A, C], now=2, unanswered_ipv6=True)  # AAAA failed; B left, C came
    assert change.added == {C} and not change.removed
    assert set(m.missing) == {B, v6b} and m.missing[v6b] == 1  # no clock for v6a; v6b's keeps running
    assert m.answer([A, C], now=30, unanswered_ipv6=True).removed == {B}  # past the grace: only B goes
    assert m.members == {A, C, v6a, v6b}
    assert m.answer([A, C, v6a], now=31).removed == {v6b}  # AAAA answers again: v6b's grace is over
    change = m.answer([v6a], now=32, unanswered_ipv4=True)  # the other way round
    assert not change and set(m.missing) == set()


def test_nxdomain_is_a_failure_until_the_grace_ends() -> None:
    m = Membership(GRACE)
    m.answer([A, B], now=0)
    for t in (2, 4, 11.9):
        assert not m.nxdomain(now=t)
        assert m.members == {A, B}
    change = m.nxdomain(now=12)
    assert change.removed == {A, B}
    assert m.members == frozenset()


def test_empty_answer_is_like_nxdomain() -> None:
    m = Membership(GRACE)
    m.answer([A, B], now=0)
    assert not m.answer([], now=1)
    assert m.members == {A, B}
    assert m.answer([], now=11).removed == {A, B}


def test_nxdomain_then_members_back_before_grace_keeps_them() -> None:
    m = Membership(GRACE)
    m.answer([A, B], now=0)
    m.nxdomain(now=1)
    m.failure(now=3)
    assert not m.answer([A, B], now=5)
    assert not m.nxdomain(now=12)  # a fresh grace from 12
    assert m.members == {A, B}


def test_nothing_known_and_dns_failing_stays_empty() -> None:
    m = Membership(GRACE)
    assert not m.failure(now=0)
    assert not m.nxdomain(now=1)
    assert m.members == frozenset()
    assert m.last_answer == 1


def test_zero_grace_removes_at_once_and_negative_is_refused() -> None:
    m = Membership(0)
    m.answer([A, B], now=0)
    assert m.answer([A], now=0).removed == {B}
    with pytest.raises(ValueError, match="grace"):
        Membership(-1)


def test_change_describe_is_short_for_large_changes() -> None:
    many = frozenset(Member.parse(f"10.1.{i // 250}.{i % 250 + 1}", 80) for i in range(1000))
    text = Change(many, added=many, removed=frozenset({A})).describe(limit=3)
    assert text.startswith("added 10.1.0.1:80, 10.1.0.2:80, 10.1.0.3:80 and 997 more; removed 10.0.0.1:80")
    assert Change(frozenset()).describe() == "no change"


# --------------------------------------------------------------------------- properties

members_st = st.frozensets(
    st.builds(lambda i: Member.parse(f"10.9.0.{i}", 8080), st.integers(min_value=1, max_value=12)),
    max_size=12,
)
step_st = st.one_of(
    st.tuples(st.just("answer"), members_st),
    st.tuples(st.just("failure"), st.just(frozenset())),
    st.tuples(st.just("nxdomain"), st.just(frozenset())),
)


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.tuples(step_st, st.floats(min_value=0, max_value=7)), max_size=40),
       grace=st.floats(min_value=0, max_value=20))
def test_rules_hold_for_any_sequence(steps: list[tuple[tuple[str, frozenset[Member]], float]],
                                     grace: float) -> None:
    m = Membership(grace)
    last_seen: dict[Member, float] = {}  # when each member was last in an answer
    first_missing: dict[Member, float] = {}
    now = 0.0
    for (kind, answer), dt in steps:
        now += dt
        before = m.members
        if kind == "answer":
            change = m.answer(answer, now)
        elif kind == "nxdomain":
            answer = frozenset()
            change = m.nxdomain(now)
        else:
            change = m.failure(now)
        assert change.members == m.members == (before | change.added) - change.removed
        assert not change.added & change.removed
        assert bool(change) == (m.members != before)
        if kind == "failure":
            assert m.members == before  # failures never change anything
            continue
        assert answer <= m.members  # whatever an answer names is a member at once
        assert change.added == answer - before
        for member in answer:
            last_seen[member] = now
            first_missing.pop(member, None)
        for member in before - answer:
            first_missing.setdefault(member, now)
        for member in change.removed:
            # removed only after missing for the grace, counted from the first answer lacking it
            assert now - first_missing[member] >= grace
            del first_missing[member]
        for member in m.members - answer:
            assert now - first_missing[member] < grace  # kept: still within its grace


@settings(max_examples=100, deadline=None)
@given(answer=members_st, seed=st.integers())
def test_order_of_records_never_matters(answer: frozenset[Member], seed: int) -> None:
    listed = sorted(answer)
    random.Random(seed).shuffle(listed)
    m1, m2 = Membership(GRACE), Membership(GRACE)
    m1.answer([A, B], 0)
    m2.answer([B, A], 0)
    assert m1.answer(sorted(answer), 1) == m2.answer(listed + listed, 1)


# --------------------------------------------------------------------------- outage log


def test_outage_log_once_at_start_rarely_after_and_once_at_the_end() -> None:
    log = OutageLog(first_repeat=30, max_interval=120)
    assert log.succeeded(0) is None  # no outage, nothing to say
    notes = [(t, log.failed(t)) for t in range(0, 1000, 2)]
    said = [(t, n.kind, n.failures) for t, n in notes if n is not None]
    assert said[0] == (0, "started", 1)
    assert [t for t, _, _ in said] == [0, 30, 90, 210, 330, 450, 570, 690, 810, 930]
    assert all(kind == "ongoing" for _, kind, _ in said[1:])
    assert said[1][2] == 16  # the line counts every failed lookup
    end = log.succeeded(1000)
    assert end is not None and end.kind == "ended" and end.failures == 500 and end.duration == 1000
    assert log.succeeded(1002) is None
    again = log.failed(2000)
    assert again is not None and again.kind == "started" and again.failures == 1


def test_outage_log_refuses_a_nonsense_schedule() -> None:
    with pytest.raises(ValueError):
        OutageLog(first_repeat=0)
    with pytest.raises(ValueError):
        OutageLog(first_repeat=60, max_interval=30)
