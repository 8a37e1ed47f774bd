"""A real-time task for tests/test_realtime.py: one process = one Swarm task, with no state shared.

`python tests/realtime_app.py --bind IP:PORT --name NAME` serves, on one port (aiohttp):
- `/socket.io/`: a python-socketio server (its session ids live in this process only, so a request
  of a session that reaches another task is answered 400 "Session ID unknown"); events `whoami` and
  `echo` answer with the task's name;
- `/ws`: a plain WebSocket (RFC 6455) that greets with the task's name and echoes each text message;
- `/events`: a server-sent events stream: `hello`, then an event every `every` seconds and a
  `: keep-alive` comment every `keepalive` seconds (0: none);
- `/health`: 200 (the agent's CHECK_PATH);
- `/stats`: JSON counters (Socket.IO connects and disconnects, 400 answers on /socket.io/, WebSockets
  and streams opened) that the test reads from each task directly.

With `--server websockets` the task is instead a plain WebSocket server of the `websockets` library
(greets with the task's name and echoes, on any path; `/health` and `/stats` as above, answered from
its `process_request` hook).

A stand-in for an operator's app; never used in production.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import sys
import urllib.request
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import socketio
import websockets.asyncio.server
from aiohttp import WSMsgType, web
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from spoa.local.backends import Backend, spawn_listening


def make_app(name: str, ping_interval: float, ping_timeout: float) -> web.Application:
    counts: collections.Counter[str] = collections.Counter()
    sio = socketio.AsyncServer(async_mode="aiohttp", ping_interval=ping_interval, ping_timeout=ping_timeout,
                               cors_allowed_origins="*")

    @web.middleware
    async def count_bad_sessions(request: web.Request,
                                 handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        response = await handler(request)
        if request.path.startswith("/socket.io") and response.status == 400:
            counts["socketio_400"] += 1
        response.headers["X-Served-By"] = name
        return response

    app = web.Application(middlewares=[count_bad_sessions])
    sio.attach(app)

    @sio.event
    async def connect(sid: str, environ: dict[str, Any]) -> None:
        counts["socketio_connects"] += 1

    @sio.event
    async def disconnect(sid: str, *args: Any) -> None:
        counts["socketio_disconnects"] += 1

    @sio.event
    async def whoami(sid: str) -> str:
        return name

    @sio.event
    async def echo(sid: str, data: Any) -> dict[str, Any]:
        counts["socketio_messages"] += 1
        return {"task": name, "data": data}

    async def ws(request: web.Request) -> web.StreamResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        counts["ws_opened"] += 1
        await sock.send_str(f"hello {name}")
        async for msg in sock:
            if msg.type == WSMsgType.TEXT:
                await sock.send_str(f"{name} {msg.data}")
        counts["ws_closed"] += 1
        return sock

    async def events(request: web.Request) -> web.StreamResponse:
        every = float(request.query.get("every", "1"))
        keepalive = float(request.query.get("keepalive", "0"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        counts["sse_opened"] += 1
        await resp.write(f"event: hello\ndata: {name}\n\n".encode())
        loop = asyncio.get_running_loop()
        next_event = loop.time() + every
        next_comment = loop.time() + keepalive if keepalive else float("inf")
        n = 0
        try:
            while True:
                await asyncio.sleep(max(0.0, min(next_event, next_comment) - loop.time()))
                now = loop.time()
                if now >= next_comment:
                    await resp.write(b": keep-alive\n\n")
                    next_comment = now + keepalive
                if now >= next_event:
                    n += 1
                    await resp.write(f"data: {name} {n}\n\n".encode())
                    next_event = now + every
        except (ConnectionError, asyncio.CancelledError):
            counts["sse_closed"] += 1
            raise

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def stats(request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(dict(counts)), content_type="application/json")

    app.router.add_get("/ws", ws)
    app.router.add_get("/events", events)
    app.router.add_get("/health", health)
    app.router.add_get("/stats", stats)
    return app


async def serve_websockets(host: str, port: int, name: str) -> None:
    """The `websockets` library's own server: no pings of its own (the test's silence is silence)."""
    counts: collections.Counter[str] = collections.Counter()

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/health":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if request.path == "/stats":
            return connection.respond(HTTPStatus.OK, json.dumps(dict(counts)))
        return None

    async def handler(ws: ServerConnection) -> None:
        counts["ws_opened"] += 1
        await ws.send(f"hello {name}")
        async for message in ws:
            await ws.send(f"{name} {message!s}")
        counts["ws_closed"] += 1

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with websockets.asyncio.server.serve(handler, host, port, process_request=process_request,
                                               ping_interval=None, reuse_address=True):
        print(f"listening {host}:{port}", flush=True)
        await stop.wait()


async def serve(host: str, port: int, app: web.Application) -> None:
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening {host}:{port}", flush=True)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bind", required=True, help="IP:PORT")
    parser.add_argument("--name", required=True)
    parser.add_argument("--ping-interval", type=float, default=25.0, help="engine.io's ping interval (s)")
    parser.add_argument("--ping-timeout", type=float, default=20.0, help="engine.io's ping timeout (s)")
    parser.add_argument("--server", choices=("aiohttp", "websockets"), default="aiohttp")
    args = parser.parse_args()
    host, _, port = args.bind.rpartition(":")
    if args.server == "websockets":
        asyncio.run(serve_websockets(host, int(port), args.name))
    else:
        asyncio.run(serve(host, int(port), make_app(args.name, args.ping_interval, args.ping_timeout)))


class RealtimeTask(Backend):
    """This app as one task (a child process), in place of spoa.local.backends' HTTP stand-in."""

    def __init__(self, ip: str, port: int, name: str, ping_interval: float = 25.0, ping_timeout: float = 20.0,
                 server: str = "aiohttp") -> None:
        super().__init__(ip, port, name)
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.server = server

    def start(self, timeout: float = 10.0) -> RealtimeTask:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.proc = spawn_listening(
            [sys.executable, __file__, "--bind", self.address, "--name", self.name,
             "--ping-interval", str(self.ping_interval), "--ping-timeout", str(self.ping_timeout),
             "--server", self.server],
            self.ip, self.port, f"task {self.address}", timeout)
        return self

    def freeze(self) -> None:
        """SIGSTOP: the task answers nothing and closes nothing, as a Swarm task whose network is gone."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
        super().stop()

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(f"http://{self.address}/stats", timeout=5) as resp:
            counts: dict[str, int] = json.loads(resp.read())
        return counts


if __name__ == "__main__":
    main()
