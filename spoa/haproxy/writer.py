"""The agent's hand on HAProxy: one `step(desired, now)` per refresh writes the members as servers.

Owns: one refresh's conversation with the admin socket - observe (`show info`, `show servers state`,
`show stat` while something drains, `show map`), plan (`reconcile`), act - and the report of what it
did and which members HAProxy reports UP (the health view routing decisions use). Must not: raise
on socket trouble (HAProxy restarting is normal: the report says so and the next step retries),
sleep, or read the clock (`now` comes from the caller).

Order within a step, so a sticky cookie never names a server that cannot take its request:
1. the cookie map is made equal to {cookie value → server} for the members already UP (entries of
   members that are DOWN, draining or gone are deleted first);
2. the server actions run (add, enable, drain, delete...), each stopping at its first failure;
3. members enabled in this step get their cookie entries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from spoa.config import Settings
from spoa.haproxy.answers import MapEntry, info_pid
from spoa.haproxy.errors import RuntimeAPIError, RuntimeAPIUnavailable
from spoa.haproxy.reconcile import (
    Action,
    ActionKind,
    CheckSettings,
    Observation,
    Plan,
    Reconciler,
    cookie_entries,
    plan_cookie_map,
)
from spoa.haproxy.runtime import CommandObserver, RuntimeAPI, RuntimeSession, validate_map_path
from spoa.haproxy.table import write_atomically
from spoa.member import Member

CookieValue = Callable[[Member], str]


@dataclass(frozen=True, slots=True)
class ActionResult:
    action: Action
    ok: bool
    error: str = ""  # the failing command and HAProxy's answer


@dataclass(frozen=True, slots=True)
class StepReport:
    """What one step saw and did. `up` is what routing decisions may use."""

    reachable: bool  # False: the admin socket was unavailable (HAProxy restarting?)
    up: frozenset[Member]
    down: frozenset[Member] = frozenset()
    pending: frozenset[Member] = frozenset()  # in maintenance until their first check passes
    draining: frozenset[str] = frozenset()  # servers of removed members that still exist after the step
    results: tuple[ActionResult, ...] = ()
    events: tuple[str, ...] = ()  # for logs: "added 10.0.1.5_80", "deleted 10.0.1.7_80", ...
    errors: tuple[str, ...] = ()
    reloaded: bool = False
    retry_after: float | None = None  # stepping again this soon would likely enable a pending member

    def done(self, kind: ActionKind) -> frozenset[str]:
        """Servers for which an action of `kind` succeeded in this step."""
        return frozenset(r.action.server for r in self.results if r.ok and r.action.kind is kind)

    def __str__(self) -> str:
        parts = list(self.events) + [f"error: {e}" for e in self.errors]
        summary = (f"{len(self.up)} up, {len(self.pending)} pending, {len(self.down)} down, "
                   f"{len(self.draining)} draining")
        return "; ".join([*parts, summary])


class HAProxyWriter:
    """Keeps one backend's servers (and the sticky-cookie map) equal to the desired members."""

    def __init__(self, api: RuntimeAPI, reconciler: Reconciler, *, cookie_map: str | None = None,
                 cookie_value: CookieValue | None = None) -> None:
        if (cookie_map is None) != (cookie_value is None):
            raise ValueError("cookie_map and cookie_value go together")
        if cookie_map is not None:
            validate_map_path(cookie_map)
        self.api = api
        self.reconciler = reconciler
        self.cookie_map = cookie_map
        self.cookie_value = cookie_value
        self._up: frozenset[Member] = frozenset()
        self._cookie_file: dict[str, str] | None = None  # what the cookie map's file holds (None: unknown)
        self._lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, *, cookie_value: CookieValue | None = None,
                      checks: CheckSettings | None = None, observer: CommandObserver | None = None,
                      timeout: float = 2.0) -> HAProxyWriter:
        """The writer `haproxy-swarm agent` runs: admin socket, backend, drain timeout and cookie map
        from the settings. Without `cookie_value` the cookie map is left alone."""
        api = RuntimeAPI(settings.admin_socket, timeout=timeout, observer=observer)
        reconciler = Reconciler(settings.haproxy_backend, drain_timeout=settings.drain_timeout, checks=checks)
        return cls(api, reconciler, cookie_map=settings.cookie_map if cookie_value else None,
                   cookie_value=cookie_value)

    @property
    def up(self) -> frozenset[Member]:
        """Members HAProxy reported UP at the last step (the health view)."""
        return self._up

    async def held(self) -> frozenset[Member] | None:
        """The members HAProxy holds servers for (see `Reconciler.held`); None when it cannot say."""
        async with self._lock:
            try:
                async with self.api.session() as s:
                    servers = await s.servers_state(self.reconciler.backend)
            except (RuntimeAPIUnavailable, RuntimeAPIError):
                return None
            return self.reconciler.held(servers)

    async def step(self, desired: frozenset[Member], now: float,
                   missing: frozenset[Member] = frozenset()) -> StepReport:
        """Observe, plan and act once. Never raises for socket trouble or refused commands.
        `missing`: desired members DNS no longer lists (kept for the grace; see `Reconciler.plan`)."""
        async with self._lock:
            log = _StepLog()
            try:
                async with self.api.session() as session:
                    return await self._step(session, desired, now, log, missing)
            except RuntimeAPIUnavailable as e:
                # HAProxy is restarting or gone. Keep the last health view (restricted to members still
                # wanted): a server name HAProxy does not know makes `use-server` fall back, no harm.
                self._up = self._up & desired
                return log.report(reachable=False, up=self._up, error=f"socket unavailable: {e.reason}")

    async def _step(self, s: RuntimeSession, desired: frozenset[Member], now: float, log: _StepLog,
                    missing: frozenset[Member]) -> StepReport:
        backend = self.reconciler.backend
        try:
            pid = info_pid(await s.info())
            servers = await s.servers_state(backend)
            sessions = (await s.server_sessions(backend)
                        if self.reconciler.wants_sessions(desired, servers) else {})
        except RuntimeAPIError as e:
            self._up = self._up & desired
            return log.report(reachable=True, up=self._up, error=f"cannot read HAProxy's state: {e}")
        # A cookie map HAProxy does not know (another config?) must not stop the servers being written.
        cookies = self.cookie_map is not None and self.cookie_value is not None
        entries: list[MapEntry] = []
        if self.cookie_map is not None:
            try:
                entries = await s.show_map(self.cookie_map)
            except RuntimeAPIError as e:
                cookies = False
                log.errors.append(f"cookie map left alone: {e}")

        plan = self.reconciler.plan(desired, Observation(servers, sessions, pid), now, missing)
        log.plan = plan
        if plan.reloaded:
            log.events.append(f"HAProxy reloaded or restarted (new pid {pid})")

        # 1. The cookie map follows the members that are UP right now.
        want_before: dict[str, str] = {}
        if cookies and self.cookie_map is not None and self.cookie_value is not None:
            want_before, skipped = cookie_entries(plan.up, self.cookie_value)
            log.errors.extend(skipped)
            deletes, adds = plan_cookie_map(self.cookie_map, want_before, entries)
            await self._map_commands(s, deletes + adds, log)

        # 2. Server actions.
        up = set(plan.up)
        for action in plan.actions:
            result = await self._run(s, action)
            log.results.append(result)
            if result.ok:
                log.events.append(str(action))
                if action.becomes_up and action.member is not None:
                    up.add(action.member)
            else:
                log.errors.append(f"{action.kind.value} {action.server}: {result.error}")
        re_added = sum(1 for r in log.results if r.ok and r.action.kind is ActionKind.ADD)
        if plan.reloaded and re_added:
            log.events.append(f"repaired after reload: {re_added} servers re-added")

        # 3. Cookies of members enabled in this step.
        if cookies and self.cookie_map is not None and self.cookie_value is not None:
            want_after, _ = cookie_entries(up, self.cookie_value)
            adds = [f"add map {self.cookie_map} {k} {v}" for k, v in sorted(want_after.items())
                    if k not in want_before]
            await self._map_commands(s, adds, log)
            self._write_cookie_file(want_after, log)

        self._up = frozenset(up)
        return log.report(reachable=True, up=self._up)

    def _write_cookie_file(self, entries: Mapping[str, str], log: _StepLog) -> None:
        """The cookie map's file too, when its entries changed: a reload then starts from the cookies
        HAProxy routes by now, instead of asking the agent for each until it has written them back."""
        if self.cookie_map is None or entries == self._cookie_file:
            return
        try:
            write_atomically(self.cookie_map, "".join(f"{k} {v}\n" for k, v in sorted(entries.items())).encode())
        except OSError as e:
            log.errors.append(f"cookie map file {self.cookie_map}: {e}")
            return
        self._cookie_file = dict(entries)

    async def _run(self, s: RuntimeSession, action: Action) -> ActionResult:
        for command in action.commands:
            try:
                await s.command(command)
            except RuntimeAPIError as e:
                return ActionResult(action, False, f"{command!r}: {e.answer.strip()[:200]}")
        return ActionResult(action, True)

    async def _map_commands(self, s: RuntimeSession, commands: list[str], log: _StepLog) -> None:
        added = deleted = 0
        for command in commands:
            try:
                await s.command(command)
            except RuntimeAPIError as e:
                log.errors.append(f"cookie map: {command!r}: {e.answer.strip()[:200]}")
                continue
            if command.startswith("add "):
                added += 1
            else:
                deleted += 1
        if added or deleted:
            log.events.append(f"cookie map: {added} added, {deleted} deleted")


class _StepLog:
    """What a step did so far; kept when the socket goes away half-way."""

    def __init__(self) -> None:
        self.plan: Plan | None = None
        self.results: list[ActionResult] = []
        self.events: list[str] = []
        self.errors: list[str] = []

    def report(self, *, reachable: bool, up: frozenset[Member], error: str | None = None) -> StepReport:
        if error is not None:
            self.errors.append(error)
        plan = self.plan
        return StepReport(
            reachable=reachable,
            up=up,
            down=plan.down if plan else frozenset(),
            pending=plan.pending - up if plan else frozenset(),
            draining=plan.draining - {r.action.server for r in self.results
                                      if r.ok and r.action.kind is ActionKind.DELETE} if plan else frozenset(),
            results=tuple(self.results),
            events=tuple(self.events),
            errors=tuple(self.errors),
            reloaded=plan.reloaded if plan else False,
            retry_after=plan.retry_after if plan else None,
        )


__all__ = ["ActionResult", "CookieValue", "HAProxyWriter", "StepReport"]
