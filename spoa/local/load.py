"""Bounded HTTP load on loopback for the tests and chaos runs: many sticky users at a target rate.

Owns: one background thread running an event loop that sends GET requests at a fixed rate (open
loop: the schedule does not slow down when the server does), each from one of many `User`s - each
its own 127.x source address and cookie jar, one request at a time per user, keep-alive optional -
and one `Record` per request (when, who, status, X-Served-By, whether a cookie was set), with a
`Summary` over any time window. Must not: run unbounded (every run ends after `duration` seconds or
`count` requests, whichever comes first, and holds at most `max_in_flight` requests), hide a failure
(anything but a 200 is failed, including connection errors and timeouts), or leave its thread
running (`stop()` joins it; the context manager always stops).

    with Load("127.0.0.1", stack.traffic_port, users=200, rate=200, duration=20) as load:
        ...                                    # inject a fault; load.now() is the records' clock
        summary = load.stop()                  # or load.wait() for the bound to end
    assert summary.failed == 0, summary

A user that keeps no cookie (`cookieless`) is routed by its source address on every request, which
keeps the agent on the request path; users that keep their cookie are routed by HAProxy's cookie
map once they have one. A keep-alive connection that the server closed while idle is retried once
on a fresh connection when not a byte of the answer came back (what browsers do); `Record.retried`
and `Summary.retried` show it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from spoa.local.client import User
from spoa.local.client import users as make_users

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Record:
    """One request. `t` is when it was sent, in seconds on the load's clock (`Load.now()`)."""

    t: float
    user: str
    status: int  # the HTTP status; 0 when no answer came (connection error or timeout)
    served_by: str | None  # X-Served-By: the backend's ip:port, None when no backend answered
    cookie_set: bool  # the answer carried a Set-Cookie
    latency: float  # seconds from sending to the end of the answer (or the error)
    error: str = ""  # the connection error, when status is 0
    retried: bool = False  # a stale keep-alive connection was replaced and the request sent again

    @property
    def failed(self) -> bool:
        return self.status != 200


@dataclass(frozen=True)
class Summary:
    """Requests in a time window: sent, failed (non-200 or no answer), per backend, latencies."""

    sent: int
    failed: int
    per_backend: dict[str, int]
    statuses: dict[int, int]  # 0 = no answer
    errors: dict[str, int]
    cookies_set: int
    retried: int
    missed: int  # scheduled sends skipped: every user busy, max_in_flight reached, or the loop late
    duration: float  # seconds the window covers
    latency_p50: float
    latency_p99: float
    latency_max: float
    users_moved: int  # users whose 200s came from more than one backend in the window
    first_failures: tuple[Record, ...] = field(default=(), repr=False)

    @property
    def ok(self) -> int:
        return self.sent - self.failed

    @property
    def rate(self) -> float:
        return self.sent / self.duration if self.duration > 0 else 0.0

    def __str__(self) -> str:
        backends = ", ".join(f"{k}: {v}" for k, v in sorted(self.per_backend.items()))
        text = (f"{self.sent} sent in {self.duration:.1f}s ({self.rate:.0f}/s), {self.failed} failed, "
                f"{self.missed} missed, {self.retried} retried, {self.cookies_set} cookies set, "
                f"{self.users_moved} users moved; latency p50 {self.latency_p50 * 1000:.1f} ms, "
                f"p99 {self.latency_p99 * 1000:.1f} ms, max {self.latency_max * 1000:.0f} ms; "
                f"per backend {{{backends}}}")
        if self.failed:
            text += f"; statuses {self.statuses}; errors {self.errors}; first failures " + "; ".join(
                f"t={r.t:.2f}s {r.user} {r.status} {r.error}" for r in self.first_failures)
        return text


def summarize(records: Iterable[Record], duration: float, missed: int = 0) -> Summary:
    rows = list(records)
    latencies = sorted(r.latency for r in rows)
    per_backend: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    seen: dict[str, set[str]] = {}
    for r in rows:
        statuses[r.status] += 1
        if r.error:
            errors[r.error] += 1
        if r.status == 200 and r.served_by is not None:
            per_backend[r.served_by] += 1
            seen.setdefault(r.user, set()).add(r.served_by)
    failures = tuple(r for r in rows if r.failed)

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else 0.0

    return Summary(
        sent=len(rows), failed=len(failures), per_backend=dict(per_backend), statuses=dict(statuses),
        errors=dict(errors), cookies_set=sum(r.cookie_set for r in rows), retried=sum(r.retried for r in rows),
        missed=missed, duration=duration, latency_p50=pct(0.5), latency_p99=pct(0.99),
        latency_max=latencies[-1] if latencies else 0.0,
        users_moved=sum(len(s) > 1 for s in seen.values()), first_failures=failures[:5])


class _NoAnswer(Exception):
    """The connection ended before the first byte of an answer (a keep-alive retry is safe)."""


class _Response:
    __slots__ = ("cookie", "served_by", "status", "will_close")

    def __init__(self, status: int, served_by: str | None, cookie: str | None, will_close: bool) -> None:
        self.status = status
        self.served_by = served_by
        self.cookie = cookie
        self.will_close = will_close


async def _read_response(reader: asyncio.StreamReader) -> _Response:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            raise _NoAnswer("connection closed before an answer") from None
        raise ConnectionError("connection closed in the middle of the answer's head") from None
    except asyncio.LimitOverrunError:
        raise ConnectionError(f"answer head longer than {MAX_HEADER_BYTES} bytes") from None
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
        raise ConnectionError(f"not an HTTP/1 status line: {lines[0][:80]!r}")
    status = int(rest[:3])
    served_by = cookie = None
    length: int | None = None
    chunked = False
    close = version == "HTTP/1.0"
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            continue
        name = name.strip().lower()
        value = value.strip()
        if name == "x-served-by":
            served_by = value
        elif name == "set-cookie":
            cookie = value if cookie is None else cookie
        elif name == "content-length":
            length = int(value)
        elif name == "transfer-encoding":
            chunked = "chunked" in value.lower()
        elif name == "connection":
            close = "close" in value.lower() or (close and "keep-alive" not in value.lower())
    if chunked:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size > MAX_BODY_BYTES:
                raise ConnectionError(f"chunk of {size} bytes")
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length is not None:
        if length > MAX_BODY_BYTES:
            raise ConnectionError(f"body of {length} bytes")
        await reader.readexactly(length)
    elif status not in (204, 304) and not 100 <= status < 200:
        await reader.read(MAX_BODY_BYTES)  # the body runs to the end of the connection
        close = True
    return _Response(status, served_by, cookie, close)


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class Load:
    """`rate` requests/s spread over `users` until `duration` seconds or `count` requests."""

    def __init__(self, host: str, port: int, users: Sequence[User] | int = 100, *, rate: float = 200.0,
                 duration: float | None = 30.0, count: int | None = None, keep_alive: bool = False,
                 cookieless: float = 0.0, timeout: float = 5.0, path: str = "/", max_in_flight: int = 256,
                 network: str = "127.5", prefix: str = "load") -> None:
        """`users`: User objects (their cookie jars are used and updated) or how many to make, each
        from its own address in `network`.0.0/16. `cookieless`: the share of users that never keep
        a cookie. `timeout`: per request, connect included."""
        if duration is None and count is None:
            raise ValueError("a load needs a bound: duration, count or both")
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.host = host
        self.port = port
        self.users = list(make_users(users, prefix, network) if isinstance(users, int) else users)
        if not self.users:
            raise ValueError("a load needs at least one user")
        n_cookieless = round(cookieless * len(self.users))
        self.cookieless = frozenset(u.name for u in self.users[:n_cookieless])
        self.rate = rate
        self.duration = duration
        self.count = count
        self.keep_alive = keep_alive
        self.timeout = timeout
        self.path = path
        self.max_in_flight = max_in_flight
        self.missed = 0
        self._records: list[Record] = []
        self._lock = threading.Lock()
        self._t0 = 0.0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._ended_at: float | None = None

    # ------------------------------------------------------------------ control (any thread)

    def start(self) -> Load:
        if self._thread is not None:
            raise RuntimeError("a Load runs once")
        self._thread = threading.Thread(target=self._thread_main, name=f"load-{self.port}", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the load thread did not start")
        return self

    def now(self) -> float:
        """Seconds since the load started: the clock of `Record.t`."""
        return time.monotonic() - self._t0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> Summary:
        """Wait until the bound ends (or `timeout` seconds, then stop), and return the summary."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.stop()

    def stop(self, grace: float | None = None) -> Summary:
        """Stop sending, let requests in flight finish (at most `grace` s, the request timeout by
        default; the rest are cancelled, not recorded), join the thread, return the summary."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            loop, stop = self._loop, self._stop
            if loop is not None and stop is not None:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(stop.set)
            thread.join((grace if grace is not None else self.timeout) + 5)
            if thread.is_alive():
                raise RuntimeError("the load thread did not stop")
        if self._error is not None:
            raise RuntimeError(f"the load failed: {self._error!r}") from self._error
        return self.summary()

    def records(self) -> list[Record]:
        with self._lock:
            return list(self._records)

    def summary(self, since: float | None = None, until: float | None = None) -> Summary:
        """Requests sent in [since, until) on the load's clock; the whole run by default."""
        end = self._ended_at if self._ended_at is not None else self.now()
        lo = 0.0 if since is None else since
        hi = end if until is None else min(until, end)
        rows = [r for r in self.records() if lo <= r.t < hi]
        return summarize(rows, max(0.0, hi - lo), self.missed if since is None and until is None else 0)

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self.stop()
        except RuntimeError:
            if et is None:
                raise

    # ------------------------------------------------------------------ the load thread

    def _thread_main(self) -> None:
        from spoa.agent.loop import new_event_loop

        loop = new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as e:  # reported by stop(); the thread must end either way
            self._error = e
            self._started.set()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        idle = list(reversed(self.users))  # pop() from the end: users take turns in order
        conns: dict[str, _Conn] = {}
        in_flight: set[asyncio.Task[None]] = set()
        self._t0 = time.monotonic()
        self._started.set()
        slot = 0  # sends scheduled so far (sent + missed)
        late_limit = max(1, int(self.rate * 0.25))  # more than 250 ms behind: count as missed, do not burst

        async def one(user: User) -> None:
            try:
                record = await self._request(user, conns)
                with self._lock:
                    self._records.append(record)
            finally:
                idle.insert(0, user)  # back of the queue

        try:
            while not self._stop.is_set():
                elapsed = time.monotonic() - self._t0
                if self.duration is not None and elapsed >= self.duration:
                    break
                if self.count is not None and slot >= self.count:
                    break
                due = int(elapsed * self.rate) + 1
                if self.count is not None:
                    due = min(due, self.count)
                if due - slot > late_limit:
                    self.missed += due - slot - late_limit
                    slot = due - late_limit
                while slot < due:
                    slot += 1
                    if idle and len(in_flight) < self.max_in_flight:
                        task = asyncio.ensure_future(one(idle.pop()))
                        in_flight.add(task)
                        task.add_done_callback(in_flight.discard)
                    else:
                        self.missed += 1
                wake = self._t0 + slot / self.rate
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), max(0.0, wake - time.monotonic()))
            self._ended_at = time.monotonic() - self._t0
            if in_flight:
                await asyncio.wait(set(in_flight), timeout=self.timeout + 1)
        finally:
            if self._ended_at is None:
                self._ended_at = time.monotonic() - self._t0
            for task in list(in_flight):
                task.cancel()
            if in_flight:
                await asyncio.wait(set(in_flight), timeout=1)
            for conn in conns.values():
                conn.close()

    def _request_bytes(self, user: User) -> bytes:
        lines = [f"GET {self.path} HTTP/1.1", "User-Agent: haproxy-swarm-load"]
        if "Host" not in user.headers:  # a user's own Host (several services) replaces the default
            lines.append(f"Host: {self.host}:{self.port}")
        lines += [f"{k}: {v}" for k, v in user.headers.items()]
        if user.cookies and user.name not in self.cookieless:
            lines.append("Cookie: " + "; ".join(f"{k}={v}" for k, v in user.cookies.items()))
        if not self.keep_alive:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _connect(self, user: User) -> _Conn:
        reader, writer = await asyncio.open_connection(self.host, self.port, local_addr=(user.source_ip, 0),
                                                       limit=MAX_HEADER_BYTES)
        return _Conn(reader, writer)

    async def _exchange(self, conn: _Conn, request: bytes) -> _Response:
        conn.writer.write(request)
        await conn.writer.drain()
        return await _read_response(conn.reader)

    async def _request(self, user: User, conns: dict[str, _Conn]) -> Record:
        sent = time.monotonic()
        t = sent - self._t0
        request = self._request_bytes(user)
        retried = False
        conn: _Conn | None = None
        try:
            async with asyncio.timeout(self.timeout):
                conn = conns.pop(user.name, None)
                reused = conn is not None
                if conn is None:
                    conn = await self._connect(user)
                try:
                    resp = await self._exchange(conn, request)
                except (_NoAnswer, ConnectionResetError, BrokenPipeError):
                    if not reused:
                        raise
                    conn.close()  # the server closed it while idle: a fresh connection, once
                    retried = True
                    conn = await self._connect(user)
                    resp = await self._exchange(conn, request)
        except (OSError, TimeoutError, _NoAnswer, asyncio.IncompleteReadError, ValueError) as e:
            if conn is not None:
                conn.close()
            error = "timeout" if isinstance(e, TimeoutError) else (str(e) or type(e).__name__)
            user.history.append(None)
            return Record(t, user.name, 0, None, False, time.monotonic() - sent, error[:200], retried)
        if self.keep_alive and not resp.will_close:
            conns[user.name] = conn
        else:
            conn.close()
        if resp.cookie and user.name not in self.cookieless:
            name, _, rest = resp.cookie.partition("=")
            user.cookies[name.strip()] = rest.split(";", 1)[0].strip()
        user.history.append(resp.served_by)
        return Record(t, user.name, resp.status, resp.served_by, resp.cookie is not None,
                      time.monotonic() - sent, "", retried)

