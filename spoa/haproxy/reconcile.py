"""Converging HAProxy's servers and cookie map to the desired members (sans-I/O, time as `now`).

Owns: the rules that turn (desired members, what HAProxy reports, `now`) into runtime-API commands,
the little memory those rules need between refreshes (when a drain started, when a member was
added, HAProxy's last pid), and the health view (which desired members HAProxy reports UP).
Must not: open sockets, read clocks, or touch servers it does not own.

Ownership: a server is the agent's when its name is a member's canonical `server_name`
(`10.0.1.5_80`, `fd00--5_80`). Everything else in the backend (the `dns*` template fallback, an
operator's static servers) is never touched.

Rules, per server (every command targets the configured backend):
- desired, absent just after HAProxy was reloaded (a new pid), and UP in the previous plan (at most
  `restore_window` before): added as below and enabled in the same step - not a starting task;
- desired, absent: `add server <be>/<name> <addr> check inter .. fastinter .. downinter .. rise ..
  fall .. observe layer4 error-limit 1 on-error mark-down pool-max-conn -1 pool-purge-delay 5s`,
  then `enable health`. The server starts in
  maintenance with its checks running. The pool keywords are what a server from the config file
  gets by default; a dynamic server on 2.6 gets none of it (idle_lim 0 in `show servers conn`), so
  HAProxy opened a new server connection for every request (measured: 2.3x the HAProxy CPU per
  request, bench/e2e.py);
- desired, in maintenance, checks passed (`srv_check_result` PASSED and the counter at `rise`):
  `enable server` - UP at once. Never earlier: leaving maintenance makes a server UP whether or not a
  check ever passed (measured on 2.6), so a task that does not listen yet would get requests;
- desired, in maintenance with paused checks (someone ran `disable server`; we do so while deleting):
  deleted and re-added, because its check result is stale and enabling it would skip the check (its
  leftover sessions end first, or are cut after `drain_timeout` and it is re-created a step later);
- desired, draining (a removed member that came back): `set server ... state ready`;
- desired, in service, missing from DNS but kept for the grace (`missing`): `set server ... weight 0`,
  and `weight 1` once DNS lists it again. The agent's decisions (`use-server`, the table) still send
  its users there, but HAProxy's own balancing - a retry's redispatch, a request the agent did not
  decide - never picks it: a Swarm task removed by a scale-down stops answering at once (no RST: its
  network is gone), so a request pinned to it waits out `timeout connect` and is redispatched, and
  the redispatch must not land on another removed task (measured in the Swarm test: 12-13 requests
  of 1,180 failed after 6 s on scale 6 -> 2 without this). Not when every desired member is missing
  (a service scaled to 0, a DNS answer that lists none): then nothing would be left to balance to;
- desired, address differs from the name: deleted and re-added (`repaired`);
- desired or removed, enabled, marked DOWN by HAProxy (its checks, or the refused connection that
  `observe` counts) for CUT_AFTER_DOWN seconds, with sessions left: `shutdown sessions server`
  (`cut`). A WebSocket or a stream to a task that died or whose network is gone would otherwise stay
  half-open until `timeout tunnel` (or `drain_timeout`), and its client would not reconnect to a
  live task until then. The agent does it at its next step, not HAProxy's `on-marked-down
  shutdown-sessions`: that one fires inside the request whose refused connection marked the server
  DOWN and kills it too, where the retry would have redispatched it (measured on 2.6: 1-2 requests
  failed at the chaos test's scale-down in 2 of 3 runs with it, none without);
- not desired, serving: `set server ... state drain` (no new sessions from load balancing; the agent
  stops choosing it and its cookie entry goes first);
- not desired, draining or in maintenance: once it has no sessions left (and has drained for at least
  one refresh) `disable server` + `del server`; after `drain_timeout` the remaining sessions are cut
  (`disable server` + `shutdown sessions server`) and the server is deleted at the next step, which the
  plan asks for soon (`retry_after`). Not in the same step: HAProxy closes cut streams in their own
  tasks, so a `del server` right behind the shutdown can find them still attached and be refused.
  A refused `del server` is simply tried again next refresh.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from spoa.haproxy.answers import MapEntry, OpState, ServerState
from spoa.member import Member

_BACKEND_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
# RFC 6265 cookie-octet: no white space, DQUOTE, comma, semicolon or backslash - and so nothing that
# could split a CLI command or a map line.
_COOKIE_VALUE = re.compile(r"^[\x21\x23-\x2B\x2D-\x3A\x3C-\x5B\x5D-\x7E]{1,256}$")


# Idle server connections kept for reuse, as for a server from the config file (HAProxy's defaults:
# no limit, purged after 5 s idle). Without them a dynamic server on 2.6 never reuses a connection.
POOL_KEYWORDS = "pool-max-conn -1 pool-purge-delay 5s"

# A task that dies is still UP for HAProxy until its next check fails (up to `inter`). A request sent
# to it meanwhile is retried and redispatched by `balance hash`, which avoids only the last server
# tried: with two tasks killed at once it could land on the other dead one and run out of retries
# (a 503 SC-- in the chaos test on 3.4). One refused or timed-out connection marks the server DOWN
# at once (its checks then run at `fastinter` and bring it back if it answers), so every retry goes
# to a server that has not failed yet.
OBSERVE_KEYWORDS = "observe layer4 error-limit 1 on-error mark-down"


@dataclass(frozen=True, slots=True)
class CheckSettings:
    """Health-check timing of the servers the agent adds (seconds, and rise/fall counts).

    Measured on 2.6 with these defaults: after `enable health` on a server in maintenance the first
    check runs after `downinter` (1.0 s), the next after `fastinter` (0.25 s); with `rise 2` the server
    can be enabled 1.25 s after it was added. A server that stops listening is DOWN at the first
    failed check after UP (fall counts from the last transition), i.e. within `inter`.
    """

    inter: float = 2.0
    fastinter: float = 0.25
    downinter: float = 1.0
    rise: int = 2
    fall: int = 2

    def __post_init__(self) -> None:
        for name in ("inter", "fastinter", "downinter"):
            value = getattr(self, name)
            if not 0.001 <= value <= 3600:
                raise ValueError(f"check {name} must be between 1 ms and 1 h, got {value!r}")
        for name in ("rise", "fall"):
            value = getattr(self, name)
            if not 1 <= value <= 100:
                raise ValueError(f"check {name} must be between 1 and 100, got {value!r}")

    def keywords(self) -> str:
        """The `add server` arguments that configure the check."""
        def ms(seconds: float) -> str:
            return f"{round(seconds * 1000)}ms"
        return (f"check inter {ms(self.inter)} fastinter {ms(self.fastinter)} downinter {ms(self.downinter)}"
                f" rise {self.rise} fall {self.fall}")

    @property
    def first_pass(self) -> float:
        """Expected time from `enable health` to a server that may be enabled, if it listens."""
        return self.downinter + (self.rise - 1) * self.fastinter


def server_keywords(checks: CheckSettings) -> str:
    """What follows the address of every server the agent owns: in `add server`, and in the
    `server` lines `run` renders for a reload (spoa.haproxy.template), so both are the same server."""
    return f"{checks.keywords()} {OBSERVE_KEYWORDS} {POOL_KEYWORDS}"


def owned_members(servers: Iterable[ServerState]) -> list[tuple[ServerState, Member]]:
    """The servers the agent owns (named from a member's address, and at that address), with their member."""
    out = []
    for server in servers:
        member = member_from_server_name(server.name)
        if member is not None and _same_address(server, member):
            out.append((server, member))
    return out


def member_from_server_name(name: str) -> Member | None:
    """The member whose canonical `server_name` is `name`, or None (not one of the agent's servers)."""
    ip_text, sep, port_text = name.rpartition("_")
    if not sep or not port_text.isdigit() or len(name) > 64:
        return None
    try:
        member = Member.parse(ip_text.replace("-", ":"), int(port_text))
    except ValueError:
        return None
    return member if member.server_name == name else None


def _same_address(server: ServerState, member: Member) -> bool:
    if server.addr == member.ip:
        return server.port == member.port
    try:
        addr = ipaddress.ip_address(server.addr).compressed
    except ValueError:
        return False
    return addr == member.ip and server.port == member.port


# How long a server is DOWN before its sessions are cut: longer than `timeout connect` (2 s), so a
# request still waiting on its first connection to a task that vanished (a Swarm scale-down: no RST)
# is retried and redispatched instead of cut (measured in the Swarm test: 4 of 1,238 requests cut at a
# scale-down without it). A WebSocket to a dead task is still cut within seconds.
CUT_AFTER_DOWN = 3


def _marked_down(server: ServerState) -> bool:
    """Enabled (not in maintenance) and DOWN by HAProxy's checks or `observe`."""
    return not server.in_maintenance and server.op_state is OpState.STOPPED


@dataclass(frozen=True, slots=True)
class Observation:
    """What HAProxy reported at the start of a refresh."""

    servers: Sequence[ServerState]  # `show servers state <backend>`, all rows (filtered here)
    sessions: Mapping[str, int] = field(default_factory=dict)  # sessions per server, when fetched
    pid: int | None = None  # `show info` Pid: a new one means HAProxy was reloaded or restarted


class ActionKind(enum.Enum):
    ADD = "added"
    ENABLE_HEALTH = "checks enabled"
    ENABLE = "enabled"
    READY = "ready again"
    RECREATE = "re-created"
    REPAIR = "repaired"
    DRAIN = "draining"
    UNBALANCE = "out of balancing (missing from DNS)"
    REBALANCE = "balanced again"
    CUT = "sessions cut"
    DELETE = "deleted"


@dataclass(frozen=True, slots=True)
class Action:
    """Commands for one server, to run in order, stopping at the first failure."""

    kind: ActionKind
    server: str
    commands: tuple[str, ...]
    member: Member | None = None  # the desired member it serves (None for removals)
    becomes_up: bool = False  # success makes the member UP: its cookie may be published
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind.value} {self.server}" + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True, slots=True)
class Plan:
    actions: tuple[Action, ...]
    up: frozenset[Member]  # desired members HAProxy reports UP (before the actions)
    down: frozenset[Member]  # desired, enabled, but the checks say DOWN
    pending: frozenset[Member]  # desired, kept in maintenance until a check passes
    draining: frozenset[str]  # servers of removed members that exist (before the actions)
    reloaded: bool = False  # HAProxy's pid changed since the previous plan
    retry_after: float | None = None  # a refresh this soon would likely enable a pending member


class Reconciler:
    """Plans one refresh at a time. One per backend; its memory is only for the servers it owns."""

    def __init__(self, backend: str, *, drain_timeout: float, checks: CheckSettings | None = None) -> None:
        if not _BACKEND_NAME.match(backend):
            raise ValueError(f"invalid HAProxy backend name {backend!r}")
        if drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0, got {drain_timeout!r}")
        self.backend = backend
        self.drain_timeout = drain_timeout
        self.checks = checks or CheckSettings()
        # How old the previous plan's health view may be for a reload to restore it (seconds).
        self.restore_window = max(5.0, 2 * self.checks.inter)
        self._drain_started: dict[str, float] = {}
        self._recreate_started: dict[str, float] = {}
        self._pending_since: dict[str, float] = {}
        self._pid: int | None = None
        self._last_up: frozenset[str] = frozenset()  # server names UP at the previous plan
        self._last_plan: float | None = None  # `now` of the previous plan
        self._restore: frozenset[str] = frozenset()  # UP before the last reload, until restore_until
        self._restore_until = 0.0
        self._names: dict[str, Member | None] = {}  # server name → member, for the names last seen

    def owned(self, servers: Iterable[ServerState]) -> dict[str, ServerState]:
        """The agent's servers (by name) among `servers`."""
        known = self._names
        self._names = {}  # keeps only the names HAProxy holds now: bounded
        owned: dict[str, ServerState] = {}
        for s in servers:
            if s.backend != self.backend:
                continue
            member = known[s.name] if s.name in known else member_from_server_name(s.name)
            self._names[s.name] = member
            if member is not None:
                owned[s.name] = s
        return owned

    def held(self, servers: Iterable[ServerState]) -> frozenset[Member]:
        """The members whose servers HAProxy holds as wanted ones: the agent's servers at their
        member's address, neither draining nor being deleted (maintenance with paused checks)."""
        held = set()
        for name, s in self.owned(servers).items():
            member = self._names[name]
            if (member is not None and _same_address(s, member) and not s.draining
                    and not (s.in_maintenance and s.checks_paused)):
                held.add(member)
        return frozenset(held)

    def wants_sessions(self, desired: frozenset[Member], servers: Iterable[ServerState]) -> bool:
        """True when the plan needs sessions per server: some owned server is being removed or
        re-created, or is marked DOWN (its sessions are cut)."""
        names = {m.server_name for m in desired}
        return any(name not in names or (s.in_maintenance and s.checks_paused) or _marked_down(s)
                   for name, s in self.owned(servers).items())

    # ------------------------------------------------------------------ commands

    def _srv(self, name: str) -> str:
        return f"{self.backend}/{name}"

    def _add(self, member: Member) -> tuple[str, ...]:
        srv = self._srv(member.server_name)
        return f"add server {srv} {member.address} {server_keywords(self.checks)}", f"enable health {srv}"

    # ------------------------------------------------------------------ the plan

    def plan(self, desired: frozenset[Member], observed: Observation, now: float,
             missing: frozenset[Member] = frozenset()) -> Plan:
        """`missing`: desired members that DNS no longer lists, kept for the grace (see the rules)."""
        reloaded = observed.pid is not None and self._pid is not None and observed.pid != self._pid
        if observed.pid is not None:
            self._pid = observed.pid
        # After an operator's reload, the members that were UP just before come back UP at once: they
        # are not starting tasks, and waiting for new checks would route their users elsewhere. Only
        # when "just before" is recent: after a long outage of HAProxy that health view is stale.
        # Kept for the window, not just this plan: a step the socket breaks half-way re-plans it.
        recent = self._last_plan is not None and now - self._last_plan <= self.restore_window
        if reloaded:
            self._restore = self._last_up if recent else frozenset()
            self._restore_until = now + self.restore_window
        elif now > self._restore_until:
            self._restore = frozenset()
        restore = self._restore
        self._last_plan = now
        owned = self.owned(observed.servers)
        wanted = {m.server_name: m for m in desired}
        missing = missing & desired if desired - missing else frozenset()
        actions: list[Action] = []
        up: set[Member] = set()
        down: set[Member] = set()
        pending: set[Member] = set()

        for name, member in sorted(wanted.items()):
            action, state = self._plan_desired(member, owned.get(name), observed.sessions.get(name, 0), now,
                                               restore=name in restore, missing=member in missing)
            if action is not None:
                actions.append(action)
            if state == "up":
                up.add(member)
            elif state == "down":
                down.add(member)
            else:
                pending.add(member)
                self._pending_since.setdefault(name, now)
                if action is not None and action.kind in (ActionKind.ADD, ActionKind.RECREATE, ActionKind.REPAIR):
                    self._pending_since[name] = now

        draining: set[str] = set()
        for name, server in sorted(owned.items()):
            if name in wanted:
                continue
            draining.add(name)
            action = self._plan_removed(server, observed.sessions.get(name, 0), now)
            if action is not None:
                actions.append(action)

        # Forget what no longer applies; the memory stays bounded by the servers HAProxy holds.
        for name in [n for n in self._drain_started if n not in owned or n in wanted]:
            del self._drain_started[name]
        for name in [n for n in self._recreate_started
                     if n not in wanted or n not in owned or not owned[n].in_maintenance]:
            del self._recreate_started[name]
        pending_names = {m.server_name for m in pending}
        for name in [n for n in self._pending_since if n not in pending_names]:
            del self._pending_since[name]

        self._last_up = frozenset(m.server_name for m in up) | frozenset(
            a.server for a in actions if a.becomes_up)
        retry_after = self._retry_after(now)
        if any(a.kind is ActionKind.CUT for a in actions):  # delete what was cut once its streams closed
            retry_after = min(retry_after or self.checks.fastinter, self.checks.fastinter)
        return Plan(tuple(actions), frozenset(up), frozenset(down), frozenset(pending), frozenset(draining),
                    reloaded, retry_after)

    def _plan_desired(self, member: Member, server: ServerState | None, sessions: int, now: float,
                      restore: bool = False, missing: bool = False) -> tuple[Action | None, str]:
        """(action, state) for a desired member; state is "up", "down" or "pending" (before the action).
        `restore`: the member was UP before HAProxy was reloaded; re-added, it is enabled at once.
        `missing`: DNS no longer lists it (kept for the grace): out of HAProxy's own balancing."""
        name = member.server_name
        srv = self._srv(name)
        if server is None:
            if restore:
                return Action(ActionKind.ADD, name, (*self._add(member), f"enable server {srv}"), member,
                              becomes_up=True, detail="UP before the reload"), "pending"
            return Action(ActionKind.ADD, name, self._add(member), member), "pending"
        if not _same_address(server, member):
            cmds = (() if server.in_maintenance else (f"disable server {srv}",)) + (
                f"shutdown sessions server {srv}", f"del server {srv}") + self._add(member)
            detail = f"address was {server.addr}:{server.port}"
            return Action(ActionKind.REPAIR, name, cmds, member, detail=detail), "pending"
        if server.in_maintenance:
            if server.checks_paused:
                return self._plan_recreate(member, sessions, now), "pending"
            if not server.checks_enabled:
                return Action(ActionKind.ENABLE_HEALTH, name, (f"enable health {srv}",), member), "pending"
            if server.check_passed(self.checks.rise):
                return Action(ActionKind.ENABLE, name, (f"enable server {srv}",), member, becomes_up=True), "pending"
            return None, "pending"
        healthy = server.op_state in (OpState.RUNNING, OpState.STARTING)
        if server.draining:
            cmds = (f"set server {srv} state ready",)
            if not server.checks_enabled:
                cmds += (f"enable health {srv}",)
            return Action(ActionKind.READY, name, cmds, member, becomes_up=healthy), "pending" if healthy else "down"
        state = "up" if server.is_up else "down"
        if _marked_down(server) and sessions > 0 and server.since_change >= CUT_AFTER_DOWN:
            return Action(ActionKind.CUT, name, (f"shutdown sessions server {srv}",), member,
                          detail=f"marked DOWN, {sessions} sessions cut"), state
        if not server.checks_enabled:
            return Action(ActionKind.ENABLE_HEALTH, name, (f"enable health {srv}",), member), state
        if missing and server.weight != 0:
            return Action(ActionKind.UNBALANCE, name, (f"set server {srv} weight 0",), member), state
        if not missing and server.weight == 0:
            return Action(ActionKind.REBALANCE, name, (f"set server {srv} weight 1",), member), state
        return None, state

    def _plan_recreate(self, member: Member, sessions: int, now: float) -> Action | None:
        """A desired member's server in maintenance with paused checks: delete it and add it afresh,
        once its leftover sessions ended (or are cut after `drain_timeout`)."""
        name = member.server_name
        srv = self._srv(name)
        started = self._recreate_started.setdefault(name, now)
        detail = "was in maintenance with checks paused"
        if sessions <= 0:
            return Action(ActionKind.RECREATE, name, (f"del server {srv}", *self._add(member)), member, detail=detail)
        if now - started >= self.drain_timeout:
            return Action(ActionKind.CUT, name, (f"shutdown sessions server {srv}",), member,
                          detail=f"{detail}; drain timeout, {sessions} sessions cut")
        return None

    def _plan_removed(self, server: ServerState, sessions: int, now: float) -> Action | None:
        name = server.name
        srv = self._srv(name)
        if not server.in_maintenance and not server.draining:
            self._drain_started[name] = now
            return Action(ActionKind.DRAIN, name, (f"set server {srv} state drain",))
        started = self._drain_started.setdefault(name, now)
        timed_out = now - started >= self.drain_timeout
        disable = () if server.in_maintenance else (f"disable server {srv}",)
        if sessions <= 0 and (server.in_maintenance or now > started):
            return Action(ActionKind.DELETE, name, (*disable, f"del server {srv}"))
        if timed_out:
            return Action(ActionKind.CUT, name, (*disable, f"shutdown sessions server {srv}"),
                          detail=f"drain timeout, {sessions} sessions cut")
        if _marked_down(server) and sessions > 0 and server.since_change >= CUT_AFTER_DOWN:
            return Action(ActionKind.CUT, name, (f"shutdown sessions server {srv}",),
                          detail=f"draining and marked DOWN, {sessions} sessions cut")
        return None

    def _retry_after(self, now: float) -> float | None:
        """How soon another refresh would likely find a just-added member's checks passed."""
        window = 2 * self.checks.first_pass + self.checks.inter
        young = [since for since in self._pending_since.values() if now - since < window]
        if not young:
            return None
        return max(self.checks.fastinter, min(since + self.checks.first_pass - now for since in young))


# --------------------------------------------------------------------------- the cookie map


def cookie_entries(members: Iterable[Member], cookie_value: Callable[[Member], str]
                   ) -> tuple[dict[str, str], list[str]]:
    """({cookie value → server name}, notes on members left out).

    A value that could not be a cookie (or would split a CLI command) is left out, and so is a
    value that already names another member (the smaller member address wins, on every replica).
    """
    want: dict[str, str] = {}
    skipped: list[str] = []
    for member in sorted(members):
        value = cookie_value(member)
        if not _COOKIE_VALUE.match(value):
            skipped.append(f"{member}: cookie value {value[:40]!r} is not a valid cookie value")
        elif value in want:
            skipped.append(f"{member}: cookie value {value!r} already names {want[value]}")
        else:
            want[value] = member.server_name
    return want, skipped


def plan_cookie_map(map_file: str, want: Mapping[str, str], entries: Sequence[MapEntry]
                    ) -> tuple[list[str], list[str]]:
    """(deletes, adds) that make the map hold exactly `want`: one entry per key, nothing else.

    Entries are deleted by reference (`#<ref>`), so duplicates and odd keys go too.
    """
    kept: set[str] = set()
    deletes: list[str] = []
    for entry in entries:
        if want.get(entry.key) == entry.value and entry.key not in kept:
            kept.add(entry.key)
        else:
            deletes.append(f"del map {map_file} #{entry.ref}")
    adds = [f"add map {map_file} {key} {value}" for key, value in sorted(want.items()) if key not in kept]
    return deletes, adds


__all__ = [
    "Action",
    "ActionKind",
    "CheckSettings",
    "Observation",
    "Plan",
    "Reconciler",
    "cookie_entries",
    "member_from_server_name",
    "owned_members",
    "plan_cookie_map",
    "server_keywords",
]
