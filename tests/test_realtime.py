"""Real-time apps behind `haproxy-swarm run` (issue 22), with their own clients and servers.

The tasks are real Socket.IO servers (python-socketio on aiohttp, tests/realtime_app.py), one process
each with no state shared: a Socket.IO session works only while every request of it reaches the task
that created it, so stickiness is the only thing that makes them work. The clients are real:
python-socketio's client (polling, then the upgrade to a WebSocket; a cookie jar as a browser keeps
one), the `websockets` library's client on a plain WebSocket (it sends back the cookie the upgrade
set, as a browser would), and a server-sent events stream that reconnects as EventSource does.

One run, phase after phase, while the clients exchange messages (every figure is printed):
1. 50 Socket.IO clients connect and upgrade: 0 "Session ID unknown" answers, 0 reconnects; the first
   visit that is a WebSocket upgrade gets its sticky cookie.
2. Scale 3 -> 5: nobody is disconnected; new clients reach the new tasks.
3. Scale 5 -> 3, the removed tasks frozen (SIGSTOP: a Swarm task whose network is gone answers and
   closes nothing) with DRAIN_TIMEOUT at its default 30 s: only their clients are cut (HAProxy's
   health check marks the server DOWN, the agent cuts its sessions at its next step), and reconnect
   within a few seconds onto a live task; nobody else is disturbed; 0 errors afterwards.
4. Silence longer than the HTTP timeouts: HTTP_TIMEOUT is 5 s here (30 s by default) and nothing
   is sent for 12 s (no engine.io pings either: ping_interval 60 s): 0 disconnects, because
   TUNNEL_TIMEOUT governs a WebSocket. The SSE stream survives on its keep-alive comments, and a
   stream without them is cut after HTTP_TIMEOUT (so the 5 s are real).
5. The agent killed (`run` restarts it): no connection dropped, no message lost; new clients meanwhile
   connect and upgrade.
6. An HAProxy reload (SIGHUP to `run`): the old process closes its connections after HARD_STOP_AFTER
   (3 s here) and every client comes back to the same task by its cookie.

A second, shorter run has the `websockets` library on both ends (the tasks are its server), and adds
a task that dies but stays in DNS.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import socketio
import websockets
from polling import poll
from realtime_app import RealtimeTask

from spoa.local.ports import free_port
from spoa.local.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

HTTP_TIMEOUT = 5.0
HARD_STOP_AFTER = 3.0
SILENCE = 12.0
SSE_EVERY = 13.0  # the stream's data events: rarer than HTTP_TIMEOUT; its keep-alive comments fill in
SSE_KEEPALIVE = 2.0
TALK_EVERY = 1.0


def now() -> float:
    return time.monotonic()


@dataclass
class Tally:
    """What one client saw: connections, who answered, messages."""

    name: str
    connects: list[float] = field(default_factory=list)
    disconnects: list[float] = field(default_factory=list)
    connect_errors: int = 0
    sent: int = 0
    answered: int = 0
    lost: list[float] = field(default_factory=list)
    answers: list[tuple[float, str]] = field(default_factory=list)  # (when, task)
    wrong: int = 0  # an answer from another task than the connection's

    @property
    def task(self) -> str | None:
        return self.answers[-1][1] if self.answers else None

    def tasks_since(self, t: float) -> set[str]:
        return {task for when, task in self.answers if when >= t}

    def counts(self) -> tuple[int, int, int, int]:
        return len(self.connects), len(self.disconnects), self.answered, len(self.lost)


class SioUser:
    """A python-socketio client with its own cookie jar, exchanging an `echo` every TALK_EVERY."""

    def __init__(self, name: str, url: str) -> None:
        self.url = url
        self.tally = Tally(name)
        self.session: aiohttp.ClientSession | None = None
        self.sio: socketio.AsyncClient | None = None
        self.conn_task: str | None = None  # the task of the current connection (first echo after it)

    async def connect(self) -> None:
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        sio = socketio.AsyncClient(reconnection_delay=0.5, reconnection_delay_max=2, randomization_factor=0.5,
                                   http_session=self.session, handle_sigint=False, request_timeout=10)
        self.sio = sio
        t = self.tally

        @sio.event
        async def connect() -> None:
            t.connects.append(now())
            self.conn_task = None

        @sio.event
        async def disconnect(*args: Any) -> None:
            t.disconnects.append(now())

        @sio.event
        async def connect_error(data: Any) -> None:
            t.connect_errors += 1

        await sio.connect(self.url, wait_timeout=10)

    @property
    def upgraded(self) -> bool:
        return self.sio is not None and self.sio.connected and self.sio.transport() == "websocket"

    async def exchange(self) -> None:
        assert self.sio is not None
        t = self.tally
        if not self.sio.connected:
            return
        t.sent += 1
        try:
            answer = await self.sio.call("echo", t.sent, timeout=5)
        except Exception:
            t.lost.append(now())
            return
        t.answered += 1
        task = answer["task"]
        if self.conn_task is None:
            self.conn_task = task
        elif task != self.conn_task:
            t.wrong += 1
        t.answers.append((now(), task))

    async def close(self) -> None:
        if self.sio is not None:
            with contextlib.suppress(Exception):
                await self.sio.disconnect()
        if self.session is not None:
            await self.session.close()


class WsUser:
    """A `websockets` client on /ws; it sends back the cookie of the upgrade and reconnects when cut."""

    def __init__(self, name: str, url: str) -> None:
        self.url = url
        self.tally = Tally(name)
        self.cookie: str | None = None
        self.cookie_on_first_upgrade = False
        self.ws: Any = None
        self.conn_task: str | None = None

    async def run(self, talking: asyncio.Event, stop: asyncio.Event) -> None:
        t = self.tally
        while not stop.is_set():
            headers = {"Cookie": self.cookie} if self.cookie else None
            try:
                async with websockets.connect(self.url, additional_headers=headers, ping_interval=None,
                                              open_timeout=10, close_timeout=1) as ws:
                    assert ws.response is not None
                    set_cookie = ws.response.headers.get("Set-Cookie")
                    if set_cookie:
                        if self.cookie is None:
                            self.cookie_on_first_upgrade = True
                        self.cookie = set_cookie.split(";", 1)[0]
                    hello = await asyncio.wait_for(ws.recv(), 5)
                    self.conn_task = str(hello).split()[1]
                    t.connects.append(now())
                    t.answers.append((now(), self.conn_task))
                    await self._talk(ws, talking, stop)
            except (OSError, TimeoutError, websockets.exceptions.WebSocketException):
                pass  # a cut (or a refused attempt): counted below, as a browser app would reconnect
            if stop.is_set():
                return
            t.disconnects.append(now())
            await asyncio.sleep(0.5)

    async def _talk(self, ws: Any, talking: asyncio.Event, stop: asyncio.Event) -> None:
        t = self.tally
        closed = asyncio.ensure_future(ws.wait_closed())
        try:
            while not stop.is_set():
                if talking.is_set():
                    t.sent += 1
                    await ws.send(str(t.sent))
                    try:
                        reply = str(await asyncio.wait_for(ws.recv(), 5))
                    except TimeoutError:
                        t.lost.append(now())
                        return
                    t.answered += 1
                    task = reply.split()[0]
                    t.wrong += task != self.conn_task
                    t.answers.append((now(), task))
                    await asyncio.wait({closed, asyncio.ensure_future(stop.wait())}, timeout=TALK_EVERY,
                                       return_when=asyncio.FIRST_COMPLETED)
                else:
                    waiters = {asyncio.ensure_future(talking.wait()), asyncio.ensure_future(stop.wait())}
                    await asyncio.wait({closed, *waiters}, return_when=asyncio.FIRST_COMPLETED)
                    for w in waiters:
                        w.cancel()
                if closed.done():
                    return
        finally:
            closed.cancel()


class SseUser:
    """One server-sent events stream (aiohttp, with a cookie jar), reconnecting as EventSource does."""

    def __init__(self, name: str, url: str) -> None:
        self.url = url
        self.tally = Tally(name)
        self.events: list[tuple[float, str]] = []
        self.comments: list[float] = []

    async def run(self, stop: asyncio.Event, session: aiohttp.ClientSession, once: bool = False) -> None:
        t = self.tally
        while not stop.is_set():
            try:
                async with session.get(self.url) as resp:
                    t.connects.append(now())
                    async for raw in resp.content:
                        line = raw.decode().rstrip("\n")
                        if line.startswith(":"):
                            self.comments.append(now())
                        elif line.startswith("data: "):
                            task = line[6:].split()[0]
                            self.events.append((now(), line[6:]))
                            t.answers.append((now(), task))
            except (aiohttp.ClientError, TimeoutError):
                pass
            if stop.is_set():
                return
            t.disconnects.append(now())
            if once:
                return
            await asyncio.sleep(0.5)


def task_stats(tasks: list[RealtimeTask]) -> Counter[str]:
    total: Counter[str] = Counter()
    for task in tasks:
        total.update(task.stats())
    return total


@pytest.fixture
def tasks() -> Iterator[list[RealtimeTask]]:
    port = free_port("127.0.0.2")
    # engine.io's pings every 60 s: the silence below must be silence.
    made = [RealtimeTask(f"127.0.0.{i + 2}", port, f"task-{i + 1}", ping_interval=60, ping_timeout=30)
            for i in range(5)]
    try:
        yield made
    finally:
        for task in made:
            task.stop()


def summary(users: list[Any], since: float) -> dict[str, int]:
    """Connects, disconnects, answered and lost messages of `users` since `since`."""
    out = Counter[str]()
    for u in users:
        t = u.tally
        out["connects"] += sum(1 for x in t.connects if x >= since)
        out["disconnects"] += sum(1 for x in t.disconnects if x >= since)
        out["answered"] += sum(1 for x, _ in t.answers if x >= since)
        out["lost"] += sum(1 for x in t.lost if x >= since)
    return dict(out)


async def test_socketio_websocket_and_sse_across_scale_events_silence_agent_death_and_reload(
        tasks: list[RealtimeTask]) -> None:
    env = {"STICKY_KEY": "cookie:SWARMID", "CHECK_PATH": "/health", "HTTP_TIMEOUT": str(HTTP_TIMEOUT),
           "HARD_STOP_AFTER": str(HARD_STOP_AFTER), "DRAIN_TIMEOUT": "30"}
    stack = Stack(tasks=tasks, env=env)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, lambda: stack.start(members=(0, 1, 2)))
    base = f"http://127.0.0.1:{stack.traffic_port}"
    talking, stop = asyncio.Event(), asyncio.Event()
    talking.set()
    sio_users: list[SioUser] = []
    ws_users = [WsUser(f"ws-{i}", f"ws://127.0.0.1:{stack.traffic_port}/ws") for i in range(10)]
    sse = SseUser("sse", f"{base}/events?every={SSE_EVERY}&keepalive={SSE_KEEPALIVE}")
    sse_session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                        timeout=aiohttp.ClientTimeout(total=None, sock_read=None))
    background: list[asyncio.Task[None]] = []
    figures: list[str] = []

    def report(line: str) -> None:
        figures.append(line)
        print(line, flush=True)

    async def talk_loop(user: SioUser) -> None:
        await asyncio.sleep(TALK_EVERY * (int(user.tally.name.split("-")[1]) % 10) / 10)  # spread out
        while not stop.is_set():
            if talking.is_set():
                await user.exchange()
            await asyncio.sleep(TALK_EVERY)

    async def add_sio_users(n: int) -> list[SioUser]:
        new = [SioUser(f"sio-{len(sio_users) + i}", base) for i in range(n)]
        sio_users.extend(new)
        await asyncio.gather(*(u.connect() for u in new))
        await poll(lambda: all(u.upgraded for u in new), f"{n} Socket.IO clients upgraded", 20)
        for u in new:
            background.append(asyncio.create_task(talk_loop(u)))
        await poll(lambda: all(u.tally.answers for u in new), "every new client answered once", 15)
        return new

    def every_user() -> list[Any]:
        return [*sio_users, *ws_users, sse]

    try:
        # 1. Connect and upgrade.
        t0 = now()
        background += [asyncio.create_task(u.run(talking, stop)) for u in ws_users]
        background.append(asyncio.create_task(sse.run(stop, sse_session)))
        first = await add_sio_users(50)
        await poll(lambda: all(u.tally.answers for u in ws_users) and bool(sse.tally.connects),
                   "plain WebSockets and the stream opened", 15)
        placed = Counter(u.tally.task for u in first)
        s = task_stats(tasks[:3])
        report(f"connect: 50 Socket.IO clients in {now() - t0:.1f}s, upgraded "
               f"{sum(u.upgraded for u in first)}, on {dict(sorted(placed.items()))}; 400 answers "
               f"{s['socketio_400']}, reconnects {sum(len(u.tally.connects) - 1 for u in first)}, "
               f"connect errors {sum(u.tally.connect_errors for u in first)}; plain WebSockets "
               f"{len(ws_users)} on {dict(Counter(u.conn_task for u in ws_users))}, cookie on the first "
               f"upgrade {sum(u.cookie_on_first_upgrade for u in ws_users)}")
        assert s["socketio_400"] == 0
        assert all(len(u.tally.connects) == 1 and not u.tally.disconnects for u in first)
        assert sum(u.tally.connect_errors for u in first) == 0
        assert set(placed) == {"task-1", "task-2", "task-3"}, placed  # spread: stickiness is needed
        assert all(u.cookie_on_first_upgrade for u in ws_users)
        assert all(len(u.tally.connects) == 1 for u in ws_users)

        # 2. Scale 3 -> 5.
        t1 = now()
        await loop.run_in_executor(None, lambda: stack.scale((0, 1, 2, 3, 4)))
        newcomers = await add_sio_users(20)
        await asyncio.sleep(2 * TALK_EVERY)  # everybody talks across the change
        on_new = Counter(u.tally.task for u in newcomers)
        up = summary(every_user(), t1)
        report(f"scale 3->5: {up}; 20 new clients on {dict(sorted(on_new.items()))}")
        assert up["disconnects"] == 0 and up["lost"] == 0, up
        assert on_new["task-4"] > 0 and on_new["task-5"] > 0, on_new

        # 3. Scale 5 -> 3: task-2 and task-4 leave, frozen (no FIN, no RST), DRAIN_TIMEOUT 30 s.
        removed = {"task-2", "task-4"}
        before = {u.tally.name: u.tally.task for u in every_user()}
        hit = {name for name, task in before.items() if task in removed}
        before_stats = task_stats([tasks[1], tasks[3]])
        t2 = now()
        tasks[1].freeze()
        tasks[3].freeze()
        stack.scale((0, 2, 4), wait=False, stop_removed=False)

        def moved_back() -> bool:
            return all(any(x > t2 for x in u.tally.connects) and u.tally.task not in removed
                       and u.tally.answers[-1][0] > t2 for u in every_user() if u.tally.name in hit)

        await poll(moved_back, "the removed tasks' clients are back on live tasks", 20)
        took = [min(x for x in u.tally.connects if x > t2) - t2 for u in every_user() if u.tally.name in hit]
        await asyncio.sleep(2 * TALK_EVERY)
        down = summary(every_user(), t2)
        undisturbed = [u for u in every_user() if u.tally.name not in hit]
        in_flight = sum(1 for u in every_user() if u.tally.name in hit for x in u.tally.lost if x > t2)
        report(f"scale 5->3 (task-2, task-4 frozen): {len(hit)} clients were on them, back on a live task "
               f"after {min(took):.1f}-{max(took):.1f}s (median {statistics.median(took):.1f}s); {down}; "
               f"lost in flight on the frozen tasks {in_flight}")
        assert max(took) < 12, took
        assert all(not any(x > t2 for x in u.tally.disconnects) for u in undisturbed)
        assert all(not any(x > t2 for x in u.tally.lost) for u in undisturbed)
        await loop.run_in_executor(None, lambda: stack.wait_up((0, 2, 4)))
        tasks[1].stop()
        tasks[3].stop()
        live = [tasks[0], tasks[2], tasks[4]]
        t3 = now()
        await asyncio.sleep(2 * TALK_EVERY)
        after = summary(every_user(), t3)
        assert after["lost"] == 0 and after["disconnects"] == 0, after
        assert all(u.tally.task not in removed for u in every_user()), "everybody on a live task"

        # 4. Silence longer than HTTP_TIMEOUT: only TUNNEL_TIMEOUT applies to the WebSockets.
        talking.clear()
        bare = SseUser("sse-no-keepalive", f"{base}/events?every=60&keepalive=0")
        bare_run = asyncio.create_task(bare.run(stop, sse_session, once=True))
        t4 = now()
        await asyncio.sleep(SILENCE)
        quiet = summary([*sio_users, *ws_users], t4)
        sse_quiet = summary([sse], t4)
        comments = sum(1 for x in sse.comments if x >= t4)
        await asyncio.wait_for(bare_run, 5)
        bare_closed = bare.tally.disconnects[0] - bare.tally.connects[0]
        talking.set()
        t5 = now()
        await poll(lambda: all(u.tally.answers[-1][0] > t5 for u in [*sio_users, *ws_users]),
                   "everybody answers after the silence", 10)
        report(f"silence {SILENCE:.0f}s (HTTP_TIMEOUT {HTTP_TIMEOUT:.0f}s): disconnects {quiet['disconnects']} "
               f"of {len(sio_users) + len(ws_users)} WebSockets; SSE: disconnects {sse_quiet['disconnects']}, "
               f"{comments} keep-alive comments; a stream without keep-alive closed after {bare_closed:.1f}s")
        assert quiet["disconnects"] == 0 and sse_quiet["disconnects"] == 0, (quiet, sse_quiet)
        assert HTTP_TIMEOUT - 0.5 <= bare_closed <= HTTP_TIMEOUT + 3, bare_closed
        assert summary(every_user(), t5)["lost"] == 0

        # 5. The agent killed: `run` restarts it; HAProxy alone carries every connection meanwhile.
        agent = stack.agent_pid()
        assert agent is not None
        t6 = now()
        os.kill(agent, signal.SIGKILL)
        latecomers = await add_sio_users(5)
        await poll(lambda: stack.agent_pid() not in (None, agent), "run restarts the agent", 15)
        await poll(lambda: stack.readyz()[0] == 200, "the new agent is ready", 15)
        await asyncio.sleep(2 * TALK_EVERY)
        dead = summary(every_user(), t6)
        report(f"agent killed: {dead} (5 new clients connected meanwhile, upgraded "
               f"{sum(u.upgraded for u in latecomers)})")
        assert dead["disconnects"] == 0 and dead["lost"] == 0, dead
        assert all(len(u.tally.connects) == 1 for u in latecomers)

        # 6. Reload: the old process closes what it holds after HARD_STOP_AFTER; same task after it.
        before = {u.tally.name: u.tally.task for u in every_user()}
        bad_before = task_stats(live)["socketio_400"]
        assert stack.proc is not None
        t7 = now()
        os.kill(stack.proc.pid, signal.SIGHUP)

        def reconnected() -> bool:
            return now() - t7 > HARD_STOP_AFTER + 1 and all(
                any(x > t7 for x in u.tally.connects) and u.tally.answers[-1][0] > t7
                for u in every_user() if u.tally.disconnects and u.tally.disconnects[-1] > t7)

        await poll(reconnected, "everybody the reload cut is back", HARD_STOP_AFTER + 15)
        await poll(lambda: all(u.tally.answers[-1][0] > now() - 3 for u in every_user() if u is not sse),
                   "everybody answers after the reload", 15)
        cut = [u for u in every_user() if any(x > t7 for x in u.tally.disconnects)]
        back = [min(x for x in u.tally.connects if x > t7) - t7 for u in cut]
        same = sum(1 for u in every_user() if u.tally.task == before[u.tally.name])
        reload = summary(every_user(), t7)
        bad = task_stats(live)["socketio_400"] - bad_before
        report(f"reload (HARD_STOP_AFTER {HARD_STOP_AFTER:.0f}s): {len(cut)} of {len(every_user())} "
               f"connections cut, back after {min(back, default=0):.1f}-{max(back, default=0):.1f}s; on the same "
               f"task {same} of {len(every_user())}; {reload}; 400 answers {bad}")
        assert max(back, default=0) <= HARD_STOP_AFTER + 5, back
        assert same == len(every_user())
        assert bad == 0

        total = summary(every_user(), 0)
        s = task_stats(live)
        report(f"total: {len(sio_users)} Socket.IO + {len(ws_users)} WebSocket clients + 1 SSE stream; {total}; "
               f"400 answers {s['socketio_400'] + before_stats['socketio_400']}; answers from another task "
               f"than the connection's {sum(u.tally.wrong for u in every_user())}")
        assert sum(u.tally.wrong for u in every_user()) == 0
    finally:
        stop.set()
        for job in background:
            job.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await asyncio.gather(*(u.close() for u in sio_users), return_exceptions=True)
        await sse_session.close()
        await loop.run_in_executor(None, stack.stop)
        print("\n".join(figures))


@pytest.fixture
def ws_tasks() -> Iterator[list[RealtimeTask]]:
    port = free_port("127.0.0.2")
    made = [RealtimeTask(f"127.0.0.{i + 2}", port, f"task-{i + 1}", server="websockets") for i in range(4)]
    try:
        yield made
    finally:
        for task in made:
            task.stop()


async def test_plain_websockets_with_the_websockets_librarys_client_and_server(ws_tasks: list[RealtimeTask]) -> None:
    """The `websockets` library on both ends (no pings of its own): the first upgrade gets the cookie;
    scale 3 -> 4 disturbs nobody; silence longer than HTTP_TIMEOUT (3 s here) closes nothing; a reload
    brings everybody back to their task after HARD_STOP_AFTER (2 s here); a task that dies but stays
    in DNS (frozen) has its clients cut and back on live tasks within seconds, nobody else disturbed."""
    http_timeout, hard_stop, silence = 3.0, 2.0, 6.0
    env = {"STICKY_KEY": "cookie:SWARMID", "CHECK_PATH": "/health", "HTTP_TIMEOUT": str(http_timeout),
           "HARD_STOP_AFTER": str(hard_stop), "DRAIN_TIMEOUT": "30"}
    stack = Stack(tasks=ws_tasks, env=env)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, lambda: stack.start(members=(0, 1, 2)))
    url = f"ws://127.0.0.1:{stack.traffic_port}/"
    talking, stop = asyncio.Event(), asyncio.Event()
    talking.set()
    users: list[WsUser] = []
    jobs: list[asyncio.Task[None]] = []
    figures: list[str] = []

    def report(line: str) -> None:
        figures.append(line)
        print(line, flush=True)

    async def add(n: int) -> list[WsUser]:
        new = [WsUser(f"ws-{len(users) + i}", url) for i in range(n)]
        users.extend(new)
        jobs.extend(asyncio.create_task(u.run(talking, stop)) for u in new)
        await poll(lambda: all(len(u.tally.answers) >= 2 for u in new), f"{n} WebSockets answer", 15)
        return new

    try:
        first = await add(24)
        placed = Counter(u.conn_task for u in first)
        report(f"connect: 24 WebSockets on {dict(sorted(placed.items()))}, cookie on the first upgrade "
               f"{sum(u.cookie_on_first_upgrade for u in first)} of 24")
        assert set(placed) == {"task-1", "task-2", "task-3"}, placed
        assert all(u.cookie_on_first_upgrade and len(u.tally.connects) == 1 for u in first)

        t1 = now()
        await loop.run_in_executor(None, lambda: stack.scale((0, 1, 2, 3)))
        new = await add(8)
        up = summary(first, t1)
        on_new = Counter(u.conn_task for u in new)
        report(f"scale 3->4: {up}; 8 new on {dict(sorted(on_new.items()))}")
        assert up["disconnects"] == 0 and up["lost"] == 0, up
        assert on_new["task-4"] > 0, on_new

        talking.clear()
        t2 = now()
        await asyncio.sleep(silence)
        quiet = summary(users, t2)
        talking.set()
        t3 = now()
        await poll(lambda: all(u.tally.answers[-1][0] > t3 for u in users), "everybody answers after the silence")
        report(f"silence {silence:.0f}s (HTTP_TIMEOUT {http_timeout:.0f}s): disconnects {quiet['disconnects']} "
               f"of {len(users)}")
        assert quiet["disconnects"] == 0, quiet

        before = {u.tally.name: u.conn_task for u in users}
        assert stack.proc is not None
        t4 = now()
        os.kill(stack.proc.pid, signal.SIGHUP)
        await poll(lambda: now() - t4 > hard_stop + 1 and all(
            u.tally.connects[-1] > t4 and u.tally.answers[-1][0] > u.tally.connects[-1] for u in users
            if any(x > t4 for x in u.tally.disconnects)), "everybody the reload cut is back", hard_stop + 15)
        cut = [u for u in users if any(x > t4 for x in u.tally.disconnects)]
        back = [min(x for x in u.tally.connects if x > t4) - t4 for u in cut]
        same = sum(u.conn_task == before[u.tally.name] for u in users)
        report(f"reload (HARD_STOP_AFTER {hard_stop:.0f}s): {len(cut)} of {len(users)} cut, back after "
               f"{min(back, default=0):.1f}-{max(back, default=0):.1f}s, on the same task {same}; "
               f"{summary(users, t4)}")
        assert max(back, default=0) <= hard_stop + 5, back
        assert same == len(users)

        hit = {u.tally.name for u in users if u.conn_task == "task-2"}
        talking.clear()  # nobody waits for an answer: only a cut by HAProxy makes a client reconnect
        t5 = now()
        ws_tasks[1].freeze()  # dies, still in DNS: only HAProxy's health check sees it
        await poll(lambda: all(any(x > t5 for x in u.tally.connects) and u.conn_task != "task-2"
                               for u in users if u.tally.name in hit), "task-2's clients are back on live tasks", 20)
        took = [min(x for x in u.tally.connects if x > t5) - t5 for u in users if u.tally.name in hit]
        talking.set()
        t6 = now()
        await poll(lambda: all(u.tally.answers[-1][0] > t6 for u in users), "everybody answers again")
        await asyncio.sleep(2 * TALK_EVERY)
        others = summary([u for u in users if u.tally.name not in hit], t5)
        report(f"task-2 frozen (still in DNS): its {len(hit)} clients back on a live task after "
               f"{min(took):.1f}-{max(took):.1f}s; everybody else {others}")
        assert max(took) < 12, took
        assert others["disconnects"] == 0 and others["lost"] == 0, others
        assert sum(u.tally.wrong for u in users) == 0
    finally:
        stop.set()
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        await loop.run_in_executor(None, stack.stop)
        print("\n".join(figures))
