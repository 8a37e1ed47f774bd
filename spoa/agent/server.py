"""The asyncio SPOP server: accepts HAProxy's connections and moves bytes to and from the protocol.

Owns: listening, one `spoa.protocol.Connection` per transport, calling the handler once per NOTIFY
and writing every answer of one read in one `transport.write`, the connection limit (the least
recently active idle connection is closed first), the read deadline of partial frames
(slow-loris), back-pressure, and graceful shutdown. Must not: parse bytes itself, decide routes,
log or allocate more than needed on the per-request path, or hold global state.

The handler is synchronous, so every NOTIFY decoded from a read is answered before the next read:
nothing is ever in flight between reads, and graceful shutdown only has to send AGENT-DISCONNECT.
A server made with a `deferred` handler instead (the look-ups of services found on demand, which
wait for DNS and HAProxy) answers each NOTIFY when its coroutine returns, in any order, on the
connection it came from, as SPOP allows; never on the routing path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from spoa.agent.handler import Handler
from spoa.config import HostPort
from spoa.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    Connection,
    Disconnected,
    FrameType,
    Hello,
    Message,
    Notify,
    Scope,
    State,
    Status,
    encode_set_var,
)

log = logging.getLogger("spoa.agent")
_clock = time.perf_counter

DEFAULT_ERROR_ACTIONS = encode_set_var(Scope.TRANSACTION, "agent_error", True)
"""Answered when the handler fails: `txn.<prefix>.agent_error = true`, and no target."""

_HANDLER_LOG_INTERVAL = 10.0


class AgentObserver:
    """Hooks for metrics. Every method is a no-op here: subclass and override what you need.

    Called on the event loop thread; they must be fast and must not block. When the server has no
    observer (the default) none of this costs anything on the per-request path.
    """

    def connection_opened(self, peer: str) -> None:
        """A connection from HAProxy was accepted."""

    def connection_closed(self, peer: str) -> None:
        """A connection ended, for whatever reason."""

    def frames_received(self, frame_type: FrameType, count: int) -> None:
        """`count` frames of `frame_type` were received (NOTIFYs are counted per read)."""

    def protocol_error(self, status: Status, message: str, peer: str) -> None:
        """A connection was closed with AGENT-DISCONNECT(status, message) because of bad input
        (or TIMEOUT for an overdue HELLO or partial frame)."""

    def decision(self, seconds: float) -> None:
        """One NOTIFY was decided and its ACK built in `seconds`."""

    def decision_batch(self, seconds: float, count: int) -> None:
        """The `count` NOTIFYs of one read were decided and their ACKs built in `seconds` in all
        (the server reads the clock once per read, not per NOTIFY). By default: `count` calls of
        `decision` with the mean; override it to record a batch at once."""
        each = seconds / count
        for _ in range(count):
            self.decision(each)

    def handler_error(self, error: Exception) -> None:
        """The handler raised or returned an unusable payload; `error_actions` were sent."""


class _SpopProtocol(asyncio.Protocol):
    """One HAProxy connection: bytes in → `Connection` → handler → one write out."""

    __slots__ = ("conn", "last_active", "paused", "peer", "server", "timer", "transport")

    def __init__(self, server: AgentServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.conn: Connection | None = None
        self.peer = "?"
        self.last_active = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.paused = False  # we stopped reading: HAProxy is not reading our ACKs

    # -- lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        server = self.server
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
        now = server.loop.time()
        self.last_active = now
        self.conn = Connection(now, max_frame_size=server.max_frame_size, read_timeout=server.read_timeout)
        server.admit(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.server.forget(self)

    def pause_writing(self) -> None:
        """HAProxy is not reading our ACKs (the write buffer passed its high-water mark): stop
        reading its NOTIFYs, so what waits stays in the kernel's buffers, not in our memory."""
        self.paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        """The write buffer drained: read again. A partial frame left unread meanwhile waited on us,
        so its read deadline starts again now."""
        self.paused = False
        if self.transport is not None and not self.transport.is_closing():
            if self.conn is not None:
                self.conn.restart_read_deadline(self.server.loop.time())
                if self.timer is None:
                    self._arm()
            self.transport.resume_reading()

    # -- the per-request path

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        transport = self.transport
        assert conn is not None and transport is not None
        server = self.server
        now = server.loop.time()
        self.last_active = now
        try:
            events = conn.receive_data(data, now)
        except Exception as exc:  # a bug, not bad input: lose this connection only
            log.exception("internal error decoding SPOP from %s", self.peer)
            conn.close(Status.UNKNOWN, f"agent internal error: {type(exc).__name__}")
            events = []
        if conn.closed:
            self._answer_and_close(events)
            return
        head = conn.data_to_send()  # an AGENT-HELLO goes before any ACK
        out = [head] if head else []
        self._answer(events, out)
        if out:
            transport.write(out[0] if len(out) == 1 else b"".join(out))
        if conn.buffered and self.timer is None:
            self._arm()

    def _answer(self, events: list[Notify | Hello | Disconnected], out: list[bytes]) -> None:
        """Append one ACK per NOTIFY to `out`. With an observer: one clock reading before and one
        after the NOTIFYs of a read (`AgentObserver.decision_batch`), not two per NOTIFY."""
        conn = self.conn
        assert conn is not None
        server = self.server
        if server.deferred is not None:
            self._defer(events)
            return
        handler = server.handler
        ack = conn.ack_ids
        append = out.append
        observer = server.observer
        if observer is None:
            for event in events:
                if type(event) is Notify:
                    try:
                        append(ack(event.ids, handler(event.messages)))
                    except Exception as exc:
                        append(server.failed_ack(conn, event, exc))
            return
        notifies = 0
        started = _clock()
        for event in events:
            if type(event) is Notify:
                notifies += 1
                try:
                    append(ack(event.ids, handler(event.messages)))
                except Exception as exc:
                    append(server.failed_ack(conn, event, exc))
            else:
                observer.frames_received(
                    FrameType.HAPROXY_HELLO if type(event) is Hello else FrameType.HAPROXY_DISCONNECT, 1)
        if notifies:
            observer.decision_batch(_clock() - started, notifies)
            observer.frames_received(FrameType.NOTIFY, notifies)

    def _defer(self, events: list[Notify | Hello | Disconnected]) -> None:
        """A `deferred` server: one task per NOTIFY, whose ACK is written when it is done."""
        server = self.server
        assert server.deferred is not None
        for event in events:
            if type(event) is Notify:
                task = server.loop.create_task(self._ack_later(event, server.deferred(event.messages)))
                server.pending.add(task)
                task.add_done_callback(server.pending.discard)

    async def _ack_later(self, event: Notify, answer: Awaitable[bytes]) -> None:
        conn = self.conn
        assert conn is not None
        try:
            frame = conn.ack_ids(event.ids, await answer)
        except Exception as exc:
            frame = self.server.failed_ack(conn, event, exc)
        transport = self.transport
        if transport is not None and not transport.is_closing() and conn.state is not State.CLOSED:
            transport.write(frame)

    def _answer_and_close(self, events: list[Notify | Hello | Disconnected]) -> None:
        """The read left the connection CLOSED: ACK what was decoded, then the closing frame."""
        conn = self.conn
        transport = self.transport
        assert conn is not None and transport is not None
        out: list[bytes] = []
        self._answer(events, out)
        out.append(conn.data_to_send())  # AGENT-DISCONNECT, or a health check's AGENT-HELLO
        transport.write(b"".join(out))
        self._finish()

    # -- timers and teardown

    def _arm(self) -> None:
        """Arm the read deadline lazily: deadlines only move later, so an armed timer is never
        late; when it fires, `handle_timer` checks the current deadline and re-arms if needed."""
        conn = self.conn
        assert conn is not None
        deadline = conn.get_timer()
        if deadline is not None and self.timer is None:
            self.timer = self.server.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        conn = self.conn
        transport = self.transport
        if conn is None or transport is None or transport.is_closing() or self.paused:
            return  # while paused, nothing is overdue: resume_writing restarts the deadline
        conn.handle_timer(self.server.loop.time())
        if conn.closed:
            transport.write(conn.data_to_send())
            self._finish()
        else:
            self._arm()

    def _finish(self) -> None:
        """The connection is CLOSED: report why, and close the transport once the bytes are out."""
        conn = self.conn
        transport = self.transport
        assert conn is not None and transport is not None
        if conn.error is not None:
            self.server.log_protocol_error(self.peer, conn.error)
            if self.server.observer is not None:
                self.server.observer.protocol_error(conn.error.status, conn.error.message, self.peer)
        transport.close()

    def shut(self, status: Status, message: str) -> None:
        """Send AGENT-DISCONNECT(status, message) and close (shutdown, connection limit)."""
        conn = self.conn
        transport = self.transport
        if conn is None or transport is None or transport.is_closing():
            return
        conn.close(status, message)
        transport.write(conn.data_to_send())
        transport.close()

    @property
    def idle(self) -> bool:
        """Ready and holding no partial frame: nothing is lost by closing it."""
        return self.conn is not None and self.conn.state is State.READY and not self.conn.buffered


class AgentServer:
    """The SPOE agent's listener. Start it inside a running event loop, next to other tasks.

    `start()` binds and accepts; `close()` stops accepting and ends every connection with
    AGENT-DISCONNECT(0); `wait_closed()` returns once every connection is gone.
    """

    def __init__(self, listen: HostPort, handler: Handler, *,
                 max_connections: int = 1000,
                 read_timeout: float | None = 5.0,
                 max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 error_actions: bytes = DEFAULT_ERROR_ACTIONS,
                 observer: AgentObserver | None = None,
                 shutdown_timeout: float = 5.0,
                 backlog: int = 1024,
                 deferred: Callable[[list[Message]], Awaitable[bytes]] | None = None) -> None:
        """`max_connections`: when a new connection would exceed it, the least recently active
        idle connection is closed (or, if none is idle, the new one is refused).
        `read_timeout`: seconds allowed for the HELLO and for the rest of a partial frame.
        `max_frame_size`: ours, offered in the HELLO negotiation (HAProxy's default is 16380).
        `error_actions`: the ACK payload when the handler fails (must be non-empty).
        `shutdown_timeout`: seconds `wait_closed` gives connections to flush before aborting them.
        `deferred`: answer each NOTIFY with this coroutine's result instead of `handler`'s."""
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        if not error_actions:
            raise ValueError("error_actions must hold at least one action")
        self.listen = listen
        self.handler = handler
        self.max_connections = max_connections
        self.read_timeout = read_timeout
        self.max_frame_size = max_frame_size
        self.error_actions = error_actions
        self.observer = observer
        self.shutdown_timeout = shutdown_timeout
        self.backlog = backlog
        self.deferred = deferred
        self.pending: set[asyncio.Task[None]] = set()  # deferred answers not written yet
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._protocols: dict[_SpopProtocol, None] = {}
        self._closing = False
        self._close_requested: asyncio.Event | None = None
        self._all_gone: asyncio.Event | None = None
        self._last_handler_log = -_HANDLER_LOG_INTERVAL
        self._last_error_log = -_HANDLER_LOG_INTERVAL
        self._errors_not_logged = 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "AgentServer.start() was not called"
        return self._loop

    @property
    def address(self) -> HostPort:
        """The bound address (the real port when `listen.port` is 0)."""
        if self._server is None or not self._server.sockets:
            return self.listen
        host, port = self._server.sockets[0].getsockname()[:2]
        return HostPort(host, port)

    @property
    def connections(self) -> int:
        return len(self._protocols)

    @property
    def idle_connections(self) -> int:
        """Connections past their HELLO holding no partial frame (the ones the limit may close)."""
        return sum(1 for p in self._protocols if p.idle)

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("AgentServer already started")
        self._loop = asyncio.get_running_loop()
        self._close_requested = asyncio.Event()
        self._all_gone = asyncio.Event()
        self._all_gone.set()
        self._server = await self._loop.create_server(
            lambda: _SpopProtocol(self), self.listen.host, self.listen.port,
            reuse_address=True, backlog=self.backlog)
        log.info("SPOE agent listening on %s", self.address)

    def close(self) -> None:
        """Graceful shutdown: stop accepting, AGENT-DISCONNECT(0) to every connection, close."""
        if self._closing:
            return
        self._closing = True
        if self._close_requested is not None:
            self._close_requested.set()
        if self._server is not None:
            self._server.close()
        for task in list(self.pending):
            task.cancel()
        for protocol in list(self._protocols):
            protocol.shut(Status.NORMAL, "agent shutting down")

    async def wait_closed(self) -> None:
        """Wait until `close()` was called and every connection is gone (aborting stragglers
        after `shutdown_timeout`)."""
        assert self._close_requested is not None and self._all_gone is not None, \
            "AgentServer.start() was not called"
        await self._close_requested.wait()
        if self._server is not None:
            await self._server.wait_closed()
        if self._protocols:
            try:
                await asyncio.wait_for(self._all_gone.wait(), self.shutdown_timeout)
            except TimeoutError:
                for protocol in list(self._protocols):
                    if protocol.transport is not None:
                        protocol.transport.abort()
                self._protocols.clear()

    # -- used by the connections

    def admit(self, protocol: _SpopProtocol) -> None:
        if self._closing:
            protocol.shut(Status.NORMAL, "agent shutting down")
            return
        if len(self._protocols) >= self.max_connections:
            idle = [p for p in self._protocols if p.idle]
            if not idle:
                log.warning("connection limit %d reached and no connection is idle: refusing %s",
                            self.max_connections, protocol.peer)
                protocol.shut(Status.RESOURCE_ERROR, "too many connections")
                return
            victim = min(idle, key=lambda p: p.last_active)
            log.info("connection limit %d reached: closing the least recently active %s",
                     self.max_connections, victim.peer)
            self.forget(victim)
            victim.shut(Status.NORMAL, "connection limit reached")
        self._protocols[protocol] = None
        if self._all_gone is not None:
            self._all_gone.clear()
        if self.observer is not None:
            self.observer.connection_opened(protocol.peer)
        protocol._arm()  # the HELLO deadline

    def forget(self, protocol: _SpopProtocol) -> None:
        if protocol in self._protocols:
            del self._protocols[protocol]
            if self.observer is not None:
                self.observer.connection_closed(protocol.peer)
        if not self._protocols and self._all_gone is not None:
            self._all_gone.set()

    def log_protocol_error(self, peer: str, error: object) -> None:
        """Log a connection closed for bad input, at most once every 10 s: a hostile peer must not
        control the log's volume (metrics count every one)."""
        now = self.loop.time()
        if now - self._last_error_log < _HANDLER_LOG_INTERVAL:
            self._errors_not_logged += 1
            return
        more = f" ({self._errors_not_logged} more since the last such line)" if self._errors_not_logged else ""
        log.warning("SPOP connection from %s closed: %s%s", peer, error, more)
        self._last_error_log = now
        self._errors_not_logged = 0

    def failed_ack(self, conn: Connection, event: Notify, error: Exception) -> bytes:
        """The ACK sent when the handler raised or returned an unusable payload."""
        if self.observer is not None:
            self.observer.handler_error(error)
        now = self.loop.time()
        if now - self._last_handler_log >= _HANDLER_LOG_INTERVAL:
            self._last_handler_log = now
            log.error("SPOE handler failed (answering with error_actions; logged at most every %.0f s)",
                      _HANDLER_LOG_INTERVAL, exc_info=error)
        return conn.ack(event.stream_id, event.frame_id, self.error_actions)


async def serve(listen: HostPort, handler: Handler, *, signals: bool = True, **options: Any) -> None:
    """Run an `AgentServer` until SIGTERM/SIGINT (when `signals`) or cancellation, then shut down
    gracefully. `options` are `AgentServer`'s keyword arguments."""
    from spoa.agent.loop import install_signal_handlers

    server = AgentServer(listen, handler, **options)
    await server.start()
    remove: Callable[[], None] = install_signal_handlers(server.close) if signals else (lambda: None)
    try:
        await server.wait_closed()
    finally:
        remove()
        server.close()
        await server.wait_closed()
