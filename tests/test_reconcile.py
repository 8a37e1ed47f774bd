"""The reconcile rules, with time as a parameter: pure plans, no HAProxy, no sleeping."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoa.haproxy.answers import AdminState, CheckResult, CheckState, MapEntry, OpState, ServerState
from spoa.haproxy.reconcile import (
    CUT_AFTER_DOWN,
    ActionKind,
    CheckSettings,
    Observation,
    Plan,
    Reconciler,
    cookie_entries,
    member_from_server_name,
    plan_cookie_map,
)
from spoa.haproxy.runtime import validate_command
from spoa.member import Member

BE = "be_app"
CHECKS = CheckSettings()
M1 = Member.parse("10.0.0.1", 80)
M2 = Member.parse("10.0.0.2", 80)
M6 = Member.parse("fd00::6", 8080)
ENABLED = CheckState.CONFIGURED | CheckState.ENABLED


def server(member: Member, *, op: OpState = OpState.STOPPED, admin: AdminState = AdminState.FMAINT,
           result: CheckResult = CheckResult.UNKNOWN, health: int = 0, checks: CheckState = ENABLED,
           backend: str = BE) -> ServerState:
    return ServerState(backend=backend, name=member.server_name, id=100, addr=member.ip, port=member.port,
                       op_state=op, admin=admin, check_result=result, check_health=health, check_state=checks)


def fresh(m: Member) -> ServerState:
    """Just added and health enabled: in maintenance, no check yet."""
    return server(m)


def passed(m: Member) -> ServerState:
    return server(m, result=CheckResult.PASSED, health=CHECKS.rise + CHECKS.fall - 1)


def up(m: Member) -> ServerState:
    return server(m, op=OpState.RUNNING, admin=AdminState(0), result=CheckResult.PASSED, health=3)


def down(m: Member, since: int = CUT_AFTER_DOWN) -> ServerState:
    """Marked DOWN by HAProxy `since` seconds ago (by default: long enough for its sessions to be cut)."""
    return replace(server(m, op=OpState.STOPPED, admin=AdminState(0), result=CheckResult.FAILED, health=0),
                   since_change=since)


def draining(m: Member) -> ServerState:
    return server(m, op=OpState.RUNNING, admin=AdminState.FDRAIN, result=CheckResult.PASSED, health=3)


def disabled(m: Member) -> ServerState:
    """After `disable server`: maintenance, checks paused."""
    return server(m, result=CheckResult.PASSED, health=0, checks=ENABLED | CheckState.PAUSED)


def template(i: int) -> ServerState:
    return ServerState(backend=BE, name=f"dns{i}", id=i, addr="-", port=80, op_state=OpState.STOPPED,
                       admin=AdminState.RMAINT, check_result=CheckResult.NEUTRAL, check_health=0,
                       check_state=CheckState.CONFIGURED)


def plan(r: Reconciler, desired: set[Member], servers: list[ServerState], now: float = 0.0,
         sessions: dict[str, int] | None = None, pid: int | None = None) -> Plan:
    return r.plan(frozenset(desired), Observation(servers, sessions or {}, pid), now)


def kinds(p: Plan) -> dict[str, ActionKind]:
    return {a.server: a.kind for a in p.actions}


def commands(p: Plan) -> list[str]:
    return [c for a in p.actions for c in a.commands]


@pytest.fixture
def r() -> Reconciler:
    return Reconciler(BE, drain_timeout=30)


# --------------------------------------------------------------------------- new members


def test_new_member_is_added_in_maintenance_with_checks_then_health_enabled(r: Reconciler) -> None:
    p = plan(r, {M1}, [template(1)])
    assert commands(p) == [
        "add server be_app/10.0.0.1_80 10.0.0.1:80 check inter 2000ms fastinter 250ms downinter 1000ms rise 2 fall 2"
        " observe layer4 error-limit 1 on-error mark-down pool-max-conn -1 pool-purge-delay 5s",
        "enable health be_app/10.0.0.1_80",
    ]
    assert p.pending == {M1} and not p.up
    # The first check is expected after downinter + (rise-1) x fastinter: step again then.
    assert p.retry_after == pytest.approx(1.25)


def test_ipv6_member_is_added_with_brackets(r: Reconciler) -> None:
    p = plan(r, {M6}, [])
    assert commands(p)[0].startswith("add server be_app/fd00--6_8080 [fd00::6]:8080 check ")


@pytest.mark.parametrize(("result", "health"), [
    (CheckResult.UNKNOWN, 0),  # no check yet
    (CheckResult.FAILED, 0),  # the task does not listen yet
    (CheckResult.PASSED, 1),  # one check passed, rise is 2
])
def test_member_is_not_enabled_before_its_check_passed(r: Reconciler, result: CheckResult, health: int) -> None:
    p = plan(r, {M1}, [server(M1, result=result, health=health)])
    assert p.actions == ()
    assert p.pending == {M1} and not p.up


def test_member_is_enabled_once_its_check_passed(r: Reconciler) -> None:
    p = plan(r, {M1}, [passed(M1)])
    assert commands(p) == ["enable server be_app/10.0.0.1_80"]
    assert p.actions[0].becomes_up and p.actions[0].member == M1
    assert not p.up  # UP only once the command succeeded (the writer adds it)


def test_health_is_enabled_when_add_succeeded_but_enable_health_did_not(r: Reconciler) -> None:
    p = plan(r, {M1}, [server(M1, checks=CheckState.CONFIGURED)])
    assert commands(p) == ["enable health be_app/10.0.0.1_80"]


def test_health_view_up_and_down(r: Reconciler) -> None:
    p = plan(r, {M1, M2}, [up(M1), down(M2)])
    assert p.actions == ()
    assert p.up == {M1} and p.down == {M2} and not p.pending


def test_retry_hint_stops_for_a_member_that_never_comes_up(r: Reconciler) -> None:
    assert plan(r, {M1}, [], now=0).retry_after is not None
    assert plan(r, {M1}, [fresh(M1)], now=1).retry_after is not None
    assert plan(r, {M1}, [fresh(M1)], now=100).retry_after is None


# --------------------------------------------------------------------------- an agent restarted


def test_held_members_are_the_wanted_servers_haproxy_still_has(r: Reconciler) -> None:
    m3, m4, m5 = (Member.parse(f"10.0.0.{i}", 80) for i in (3, 4, 5))
    servers = [up(M1), down(M2), fresh(M6), draining(m3), disabled(m4), replace(up(m5), addr="10.9.9.9"),
               template(1), replace(up(M1), name="static1"), replace(up(m3), backend="be_other")]
    # UP, DOWN and still starting were wanted; draining and being deleted were not; a wrong address
    # is not that member's server; foreign servers are nobody's.
    assert r.held(servers) == {M1, M2, M6}


# --------------------------------------------------------------------------- removed members


def test_removed_member_is_drained_then_deleted_once_idle(r: Reconciler) -> None:
    p = plan(r, set(), [up(M1)], now=0)
    assert commands(p) == ["set server be_app/10.0.0.1_80 state drain"]
    assert p.draining == {M1.server_name}
    # Same refresh instant: let in-flight decisions land first.
    assert plan(r, set(), [draining(M1)], now=0, sessions={M1.server_name: 0}).actions == ()
    # Sessions still open: wait.
    assert plan(r, set(), [draining(M1)], now=2, sessions={M1.server_name: 3}).actions == ()
    p = plan(r, set(), [draining(M1)], now=4, sessions={M1.server_name: 0})
    assert commands(p) == ["disable server be_app/10.0.0.1_80", "del server be_app/10.0.0.1_80"]
    # `draining` is what exists before the actions: the writer's report drops what it deleted.
    assert kinds(p) == {M1.server_name: ActionKind.DELETE} and p.draining == {M1.server_name}


def test_drain_timeout_cuts_remaining_sessions(r: Reconciler) -> None:
    plan(r, set(), [up(M1)], now=100)
    assert plan(r, set(), [draining(M1)], now=129.9, sessions={M1.server_name: 2}).actions == ()
    p = plan(r, set(), [draining(M1)], now=130, sessions={M1.server_name: 2})
    assert commands(p) == ["disable server be_app/10.0.0.1_80", "shutdown sessions server be_app/10.0.0.1_80"]
    assert kinds(p) == {M1.server_name: ActionKind.CUT} and p.draining == {M1.server_name}
    # Deleted at a step soon after, not in the same one: HAProxy closes cut streams in their own tasks.
    assert p.retry_after is not None and p.retry_after <= r.checks.fastinter
    p = plan(r, set(), [disabled(M1)], now=130.25, sessions={})
    assert commands(p) == ["del server be_app/10.0.0.1_80"]
    # A stream that outlived the cut is cut again, never deleted under it.
    p = plan(r, set(), [disabled(M1)], now=130.25, sessions={M1.server_name: 1})
    assert commands(p) == ["shutdown sessions server be_app/10.0.0.1_80"]


def test_removed_member_never_enabled_is_deleted_at_once(r: Reconciler) -> None:
    p = plan(r, set(), [fresh(M1)], now=0, sessions={M1.server_name: 0})
    assert commands(p) == ["del server be_app/10.0.0.1_80"]


def test_refused_delete_is_retried_and_timeout_still_applies(r: Reconciler) -> None:
    plan(r, set(), [up(M1)], now=0)
    # `disable server` went through, `del server` was refused (a session was still attached).
    assert plan(r, set(), [disabled(M1)], now=1, sessions={M1.server_name: 1}).actions == ()
    assert commands(plan(r, set(), [disabled(M1)], now=2, sessions={})) == ["del server be_app/10.0.0.1_80"]
    assert commands(plan(r, set(), [disabled(M1)], now=31, sessions={M1.server_name: 1})) == [
        "shutdown sessions server be_app/10.0.0.1_80"]


def test_member_back_while_draining_is_made_ready(r: Reconciler) -> None:
    plan(r, set(), [up(M1)], now=0)
    p = plan(r, {M1}, [draining(M1)], now=1)
    assert commands(p) == ["set server be_app/10.0.0.1_80 state ready"]
    assert p.actions[0].becomes_up
    # ...and its drain clock is forgotten: removed again later, it drains from scratch.
    assert kinds(plan(r, set(), [up(M1)], now=50)) == {M1.server_name: ActionKind.DRAIN}
    assert plan(r, set(), [draining(M1)], now=50, sessions={M1.server_name: 1}).actions == ()


def test_member_back_while_draining_but_down_is_not_counted_up(r: Reconciler) -> None:
    p = plan(r, {M1}, [replace(draining(M1), op_state=OpState.STOPPED)])
    assert kinds(p) == {M1.server_name: ActionKind.READY}
    assert not p.actions[0].becomes_up and p.down == {M1}


def test_desired_member_with_paused_checks_is_recreated_not_enabled(r: Reconciler) -> None:
    p = plan(r, {M1}, [disabled(M1)])
    assert kinds(p) == {M1.server_name: ActionKind.RECREATE}
    assert commands(p)[0] == "del server be_app/10.0.0.1_80"
    assert commands(p)[1].startswith("add server be_app/10.0.0.1_80 10.0.0.1:80 check")
    assert "enable server be_app/10.0.0.1_80" not in commands(p)


def test_recreate_waits_for_leftover_sessions_then_cuts_them_after_the_drain_timeout(r: Reconciler) -> None:
    name = M1.server_name
    assert r.wants_sessions(frozenset({M1}), [disabled(M1)])
    assert plan(r, {M1}, [disabled(M1)], now=0, sessions={name: 2}).actions == ()
    assert plan(r, {M1}, [disabled(M1)], now=29, sessions={name: 2}).actions == ()
    p = plan(r, {M1}, [disabled(M1)], now=30, sessions={name: 2})
    assert kinds(p) == {name: ActionKind.CUT} and M1 in p.pending
    assert commands(p) == [f"shutdown sessions server be_app/{name}"]
    p = plan(r, {M1}, [disabled(M1)], now=30.25, sessions={})
    assert kinds(p) == {name: ActionKind.RECREATE}
    assert commands(p)[0] == f"del server be_app/{name}"


def test_server_with_wrong_address_is_repaired(r: Reconciler) -> None:
    wrong = replace(up(M1), addr="10.9.9.9")
    p = plan(r, {M1}, [wrong])
    assert kinds(p) == {M1.server_name: ActionKind.REPAIR}
    assert commands(p)[:3] == ["disable server be_app/10.0.0.1_80", "shutdown sessions server be_app/10.0.0.1_80",
                               "del server be_app/10.0.0.1_80"]
    assert commands(p)[3].startswith("add server be_app/10.0.0.1_80 10.0.0.1:80 ")
    assert M1 not in p.up and M1 in p.pending


def test_foreign_servers_are_never_touched(r: Reconciler) -> None:
    foreign = [template(1), template(2),
               replace(up(M1), name="static1"),
               replace(up(M1), name="010.0.0.1_80"),  # not the canonical name of any member
               replace(up(M2), backend="be_other")]
    p = plan(r, set(), foreign)
    assert p.actions == () and not p.draining
    assert not r.wants_sessions(frozenset(), foreign)


def test_reload_is_detected_and_everything_re_added(r: Reconciler) -> None:
    plan(r, {M1, M2}, [up(M1), up(M2)], pid=100)
    p = plan(r, {M1, M2}, [template(1)], pid=200)
    assert p.reloaded
    assert kinds(p) == {M1.server_name: ActionKind.ADD, M2.server_name: ActionKind.ADD}
    assert not plan(r, {M1, M2}, [fresh(M1), fresh(M2)], pid=200).reloaded


def test_after_a_reload_members_that_were_up_are_enabled_at_once_pending_ones_wait(r: Reconciler) -> None:
    plan(r, {M1, M2}, [up(M1), fresh(M2)], pid=100)  # M2: a starting task, no check passed yet
    p = plan(r, {M1, M2}, [template(1)], pid=200)
    by_server = {a.server: a for a in p.actions}
    assert by_server[M1.server_name].becomes_up
    assert by_server[M1.server_name].commands[-1] == f"enable server {BE}/{M1.server_name}"
    assert not by_server[M2.server_name].becomes_up
    assert not any(c.startswith("enable server") for c in by_server[M2.server_name].commands)
    # Without a reload (and past the restore window), a server that vanished is a new server again.
    p = plan(r, {M1, M2}, [template(1)], pid=200, now=r.restore_window + 1)
    assert not any(a.becomes_up for a in p.actions)


def test_a_restore_survives_a_step_that_broke_half_way(r: Reconciler) -> None:
    """The socket broke after the reload was seen: the next plan (same pid) still restores."""
    plan(r, {M1}, [up(M1)], now=0, pid=100)
    assert plan(r, {M1}, [template(1)], now=0.5, pid=200).actions[0].becomes_up
    p = plan(r, {M1}, [template(1)], now=1.0, pid=200)
    assert not p.reloaded and p.actions[0].becomes_up
    # Once the window has passed, a vanished server is a new one again: checks first.
    assert not plan(r, {M1}, [template(1)], now=0.6 + r.restore_window, pid=200).actions[0].becomes_up


def test_a_health_view_older_than_the_restore_window_is_not_restored(r: Reconciler) -> None:
    """HAProxy back after a long outage (not a reload's moment): its members get checks first."""
    plan(r, {M1}, [up(M1)], now=0, pid=100)
    p = plan(r, {M1}, [template(1)], now=r.restore_window + 0.1, pid=200)
    assert p.reloaded and kinds(p) == {M1.server_name: ActionKind.ADD} and not p.actions[0].becomes_up
    plan(r, {M1}, [up(M1)], now=100, pid=200)
    assert plan(r, {M1}, [template(1)], now=100 + r.restore_window, pid=300).actions[0].becomes_up


def test_sessions_are_only_needed_while_removing_or_down(r: Reconciler) -> None:
    assert not r.wants_sessions(frozenset({M1}), [up(M1), template(1)])
    assert r.wants_sessions(frozenset({M1}), [up(M1), up(M2)])
    assert r.wants_sessions(frozenset({M1}), [down(M1)])
    assert not r.wants_sessions(frozenset({M1}), [fresh(M1)])  # in maintenance: not marked DOWN


def test_a_member_marked_down_has_its_sessions_cut(r: Reconciler) -> None:
    """A WebSocket to a task that died must not wait for `timeout tunnel`: its client reconnects."""
    assert plan(r, {M1}, [up(M1)], now=0, sessions={M1.server_name: 4}).actions == ()
    # Not at once: a request still waiting on its first connection (timeout connect) is redispatched.
    assert plan(r, {M1}, [down(M1, since=1)], now=1, sessions={M1.server_name: 4}).actions == ()
    p = plan(r, {M1}, [down(M1)], now=3, sessions={M1.server_name: 4})
    assert commands(p) == ["shutdown sessions server be_app/10.0.0.1_80"]
    assert kinds(p) == {M1.server_name: ActionKind.CUT} and p.down == {M1}
    assert plan(r, {M1}, [down(M1)], now=4, sessions={M1.server_name: 0}).actions == ()


def test_a_removed_member_marked_down_has_its_sessions_cut_before_the_drain_timeout(r: Reconciler) -> None:
    dead = replace(draining(M1), op_state=OpState.STOPPED, since_change=CUT_AFTER_DOWN)
    assert plan(r, set(), [draining(M1)], now=0, sessions={M1.server_name: 2}).actions == ()
    p = plan(r, set(), [dead], now=1, sessions={M1.server_name: 2})
    assert commands(p) == ["shutdown sessions server be_app/10.0.0.1_80"]
    assert commands(plan(r, set(), [dead], now=1.5, sessions={})) == [
        "disable server be_app/10.0.0.1_80", "del server be_app/10.0.0.1_80"]


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="backend"):
        Reconciler("be app", drain_timeout=1)
    with pytest.raises(ValueError, match="drain_timeout"):
        Reconciler(BE, drain_timeout=-1)
    with pytest.raises(ValueError, match="rise"):
        CheckSettings(rise=0)
    with pytest.raises(ValueError, match="inter"):
        CheckSettings(inter=0)


# --------------------------------------------------------------------------- members missing from DNS


def test_a_member_missing_from_dns_leaves_balancing_and_returns_with_its_weight(r: Reconciler) -> None:
    # Kept for the grace: still desired and UP (its users' decisions stand), but HAProxy's own
    # balancing (a redispatch, an undecided request) must not pick it.
    p = r.plan(frozenset({M1, M2}), Observation([up(M1), up(M2)]), 0.0, missing=frozenset({M2}))
    assert commands(p) == [f"set server {BE}/{M2.server_name} weight 0"]
    assert kinds(p) == {M2.server_name: ActionKind.UNBALANCE} and p.up == {M1, M2}
    unweighted = replace(up(M2), weight=0)
    assert not r.plan(frozenset({M1, M2}), Observation([up(M1), unweighted]), 1.0, missing=frozenset({M2})).actions
    # DNS lists it again: balanced again.
    p = r.plan(frozenset({M1, M2}), Observation([up(M1), unweighted]), 2.0)
    assert commands(p) == [f"set server {BE}/{M2.server_name} weight 1"]
    assert kinds(p) == {M2.server_name: ActionKind.REBALANCE}


def test_when_every_member_is_missing_none_leaves_balancing(r: Reconciler) -> None:
    # A service scaled to 0 or an answer listing none: something must stay to balance to.
    p = r.plan(frozenset({M1, M2}), Observation([up(M1), up(M2)]), 0.0, missing=frozenset({M1, M2}))
    assert not p.actions
    # ...and one that is missing while the other is not yet written still leaves.
    p = r.plan(frozenset({M1, M2}), Observation([up(M1)]), 0.0, missing=frozenset({M1}))
    assert kinds(p) == {M1.server_name: ActionKind.UNBALANCE, M2.server_name: ActionKind.ADD}


# --------------------------------------------------------------------------- server names


@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), st.integers(1, 65535))
def test_server_names_map_back_to_their_member(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    member = Member.parse(str(ip), port)
    assert member_from_server_name(member.server_name) == member


@pytest.mark.parametrize("name", ["dns1", "static", "10.0.0.1", "10.0.0.1_080", "10.0.0.1_0", "10.0.0.1_70000",
                                  "fd00::6_80", "FD00--6_80", "fd00-0-0-0-0-0-0-6_80", "10.0.0.1_80_80", "_80"])
def test_other_names_are_not_members(name: str) -> None:
    assert member_from_server_name(name) is None


# --------------------------------------------------------------------------- the cookie map


def cookie(m: Member) -> str:
    return "c" + m.server_name.replace(".", "").replace("-", "")


def test_cookie_entries_skip_unusable_and_colliding_values() -> None:
    values = {M1: "same", M2: "same", M6: "bad value;x"}
    want, skipped = cookie_entries({M1, M2, M6}, values.__getitem__)
    assert want == {"same": M1.server_name}  # the smaller address wins, on every replica
    assert len(skipped) == 2


def test_cookie_map_plan_deletes_stale_wrong_and_duplicate_entries() -> None:
    want = {"a": M1.server_name, "b": M2.server_name}
    entries = [MapEntry("0x1", "a", M1.server_name), MapEntry("0x2", "a", M1.server_name),  # duplicate
               MapEntry("0x3", "b", "10.9.9.9_80"),  # wrong server
               MapEntry("0x4", "gone", "10.0.0.3_80")]  # a member that is not UP
    deletes, adds = plan_cookie_map("/run/cookies.map", want, entries)
    assert deletes == [f"del map /run/cookies.map #0x{i}" for i in (2, 3, 4)]
    assert adds == ["add map /run/cookies.map b 10.0.0.2_80"]


def test_cookie_map_plan_is_empty_when_equal() -> None:
    want = {"a": M1.server_name}
    assert plan_cookie_map("/m", want, [MapEntry("0x1", "a", M1.server_name)]) == ([], [])


# --------------------------------------------------------------------------- properties

POOL = [Member.parse(f"10.0.0.{i}", 80) for i in range(1, 5)] + [M6]

STATES: dict[str, Callable[[Member], ServerState]] = {
    "fresh": fresh, "passed": passed, "up": up, "down": down, "draining": draining, "disabled": disabled,
    "no-health": lambda m: server(m, checks=CheckState.CONFIGURED),
    "half-passed": lambda m: server(m, result=CheckResult.PASSED, health=1),
    "wrong-addr": lambda m: replace(up(m), addr="192.0.2.1"),
}


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[frozenset[Member], list[ServerState], dict[str, int]]:
    desired = frozenset(draw(st.sets(st.sampled_from(POOL))))
    servers = [template(1), replace(up(M1), name="static1")]
    sessions: dict[str, int] = {}
    for m in POOL:
        state = draw(st.sampled_from([None, *STATES]))
        if state is not None:
            servers.append(STATES[state](m))
            sessions[m.server_name] = draw(st.integers(0, 3))
    return desired, servers, sessions


@settings(max_examples=300, deadline=None)
@given(scenarios(), st.floats(0, 100), st.floats(0, 100))
def test_plan_invariants(scenario: tuple[frozenset[Member], list[ServerState], dict[str, int]],
                         first: float, then: float) -> None:
    desired, servers, sessions = scenario
    r = Reconciler(BE, drain_timeout=30)
    r.plan(desired, Observation(servers, sessions, 1), first)  # some memory (drain clocks)
    p = r.plan(desired, Observation(servers, sessions, 1), first + then)
    by_name = {s.name: s for s in servers}
    wanted = {m.server_name for m in desired}
    for action in p.actions:
        assert member_from_server_name(action.server) is not None  # only the agent's servers
        for command in action.commands:
            validate_command(command)
            assert f" {BE}/{action.server}" in command
        observed = by_name.get(action.server)
        if "enable server" in " ".join(action.commands):
            # Never enabled unless its check passed: a task that does not listen gets no request.
            assert observed is not None and observed.check_passed(CHECKS.rise) and action.server in wanted
        if action.kind in (ActionKind.DRAIN, ActionKind.DELETE):
            assert action.server not in wanted
        if action.kind is ActionKind.READY:
            assert observed is not None and observed.draining and action.server in wanted
    for m in desired:
        if m.server_name not in by_name:
            assert p.actions and any(a.kind is ActionKind.ADD and a.member == m for a in p.actions)
    assert p.up | p.down | p.pending == desired
    assert not (p.up & p.down) and not (p.up & p.pending) and not (p.down & p.pending)
    assert all(by_name[m.server_name].is_up for m in p.up)
    assert set(r._drain_started) <= set(by_name) - wanted  # memory bounded by what HAProxy holds
    assert set(r._recreate_started) <= set(by_name) & wanted


class FakeBackend:
    """A model of one HAProxy backend, as measured on 2.6 - including its traps: leaving maintenance
    makes a server UP whether or not a check passed, and `del server` needs maintenance and no session."""

    def __init__(self, servers: list[ServerState], listening: set[Member], sessions: dict[str, int]) -> None:
        self.servers = {s.name: s for s in servers}
        self.listening = {m.server_name for m in listening}
        self.sessions = sessions
        self.served_by_dead: set[str] = set()

    def apply(self, command: str) -> bool:
        words = command.split()
        name = words[2].split("/", 1)[1] if words[:2] != ["shutdown", "sessions"] else words[3].split("/", 1)[1]
        s = self.servers.get(name)
        verb = " ".join(words[:2])
        if verb == "add server":
            if s is not None:
                return False
            addr = words[3]
            ip, port = (addr[1:].split("]:") if addr.startswith("[") else addr.rsplit(":", 1))
            self.servers[name] = ServerState(BE, name, 1, ip, int(port), OpState.STOPPED, AdminState.FMAINT,
                                             CheckResult.UNKNOWN, 0, CheckState.CONFIGURED)
            return True
        if s is None:
            return False
        if verb == "enable health":
            self.servers[name] = replace(s, check_state=s.check_state | CheckState.ENABLED)
        elif verb == "enable server" or command.endswith("state ready"):
            self.servers[name] = replace(s, admin=AdminState(0), check_state=s.check_state & ~CheckState.PAUSED,
                                         op_state=OpState.RUNNING if s.in_maintenance else s.op_state)
        elif verb == "disable server":
            self.servers[name] = replace(s, admin=s.admin | AdminState.FMAINT, op_state=OpState.STOPPED,
                                         check_state=s.check_state | CheckState.PAUSED)
        elif command.endswith("state drain"):
            self.servers[name] = replace(s, admin=s.admin | AdminState.FDRAIN)
        elif verb == "shutdown sessions":
            self.sessions[name] = 0
        elif verb == "del server":
            if not s.in_maintenance or self.sessions.get(name, 0):
                return False
            del self.servers[name]
        else:
            raise AssertionError(f"unexpected command {command!r}")
        return True

    def run_checks(self) -> None:
        for name, s in list(self.servers.items()):
            if name in self.listening:
                self.sessions[name] = max(0, self.sessions.get(name, 0) - 1)
            if not s.checks_enabled or s.checks_paused or member_from_server_name(name) is None:
                continue
            if name in self.listening:
                s = replace(s, check_result=CheckResult.PASSED, check_health=min(s.check_health + 1, 3))
                if not s.in_maintenance and s.check_health >= 2:
                    s = replace(s, op_state=OpState.RUNNING)
            else:
                s = replace(s, check_result=CheckResult.FAILED, check_health=0, op_state=OpState.STOPPED)
            self.servers[name] = s

    def check_traffic(self) -> None:
        """A server that takes traffic while its task does not listen: what must never happen."""
        for name, s in self.servers.items():
            if s.is_up and name not in self.listening and member_from_server_name(name) is not None:
                self.served_by_dead.add(name)


@settings(max_examples=200, deadline=None)
@given(scenarios(), st.sets(st.sampled_from(POOL)))
def test_converges_and_never_enables_a_task_that_does_not_listen(
        scenario: tuple[frozenset[Member], list[ServerState], dict[str, int]], listening: set[Member]) -> None:
    desired, servers, sessions = scenario
    # A check that passed, or a server UP, means its task listened when HAProxy was asked.
    listening |= {m for m in POOL for s in servers
                  if s.name == m.server_name and (s.is_up or s.check_result == CheckResult.PASSED)}
    haproxy = FakeBackend(servers, listening, sessions)
    r = Reconciler(BE, drain_timeout=10)
    before_dead = {n for n, s in haproxy.servers.items() if s.is_up and n not in haproxy.listening}
    now = 0.0
    for _ in range(12):
        p = r.plan(desired, Observation(list(haproxy.servers.values()), dict(haproxy.sessions), 1), now)
        for action in p.actions:
            for command in action.commands:
                if not haproxy.apply(command):
                    break
        haproxy.check_traffic()
        haproxy.run_checks()
        now += 2.0
    owned = {n for n in haproxy.servers if member_from_server_name(n) is not None}
    assert owned == {m.server_name for m in desired}
    assert {n for n in owned if haproxy.servers[n].is_up} == {m.server_name for m in desired & listening}
    assert haproxy.served_by_dead <= before_dead
    final = r.plan(desired, Observation(list(haproxy.servers.values()), dict(haproxy.sessions), 1), now)
    assert final.actions == ()
    assert final.up == desired & listening
