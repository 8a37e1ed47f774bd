"""spoa.agent: the asyncio SPOP server, against a raw SPOP client and against real HAProxy 2.6.

Real parts only: loopback sockets on ports picked by the kernel, Debian's `haproxy` binary with a
small SPOE config written here (agent backend `mode tcp` + `option spop-check`), a tiny asyncio
HTTP backend, and for the kill/restart test the agent in its own process.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from polling import poll

from spoa.agent import (
    DEFAULT_ERROR_ACTIONS,
    AgentObserver,
    AgentServer,
    install_signal_handlers,
    new_event_loop,
    uses_uvloop,
)
from spoa.config import HostPort
from spoa.haproxy.process import haproxy_binary
from spoa.protocol import (
    Frame,
    FrameType,
    Message,
    Scope,
    SetVar,
    Status,
    decode_actions,
    decode_disconnect,
    decode_frame,
    decode_kv_list,
    encode_frame,
    encode_haproxy_disconnect,
    encode_haproxy_hello,
    encode_message,
    encode_notify,
    encode_set_var,
    split_frames,
)

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = HostPort("127.0.0.1", 0)
DEADLINE = 10.0


def echo_handler(messages: list[Message]) -> bytes:
    """Answers each request with its own X-Req-Id (or "none"): cross-talk would show."""
    value = messages[0].args.get("id") if messages else None
    return encode_set_var(Scope.TRANSACTION, "server", value if isinstance(value, bytes) else b"none")


# --------------------------------------------------------------------------- a raw SPOP client


class SpopClient:
    """Plays HAProxy's side of SPOP over a real socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buf = b""

    @classmethod
    async def connect(cls, address: HostPort) -> SpopClient:
        reader, writer = await asyncio.open_connection(address.host, address.port)
        return cls(reader, writer)

    async def hello(self, **kwargs: object) -> dict[str, object]:
        self.writer.write(encode_haproxy_hello(**kwargs))  # type: ignore[arg-type]
        (frame,) = await self.frames(1)
        assert frame.type == FrameType.AGENT_HELLO
        return dict(decode_kv_list(frame.payload))

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def frames(self, n: int, timeout: float = DEADLINE) -> list[Frame]:
        out: list[Frame] = []
        async with asyncio.timeout(timeout):
            while len(out) < n:
                bodies, self.buf = split_frames(self.buf)
                out += [decode_frame(b) for b in bodies]
                if len(out) >= n:
                    break
                chunk = await self.reader.read(65536)
                if not chunk:
                    raise EOFError(f"connection closed after {len(out)} of {n} frames")
                self.buf += chunk
        return out

    async def until_eof(self, timeout: float = DEADLINE) -> list[Frame]:
        async with asyncio.timeout(timeout):
            while chunk := await self.reader.read(65536):
                self.buf += chunk
        bodies, self.buf = split_frames(self.buf)
        return [decode_frame(b) for b in bodies]

    async def disconnect_status(self) -> tuple[int, str]:
        frames = await self.until_eof()
        assert frames and frames[-1].type == FrameType.AGENT_DISCONNECT, frames
        return decode_disconnect(frames[-1].payload)

    def close(self) -> None:
        self.writer.close()


@dataclass
class Recorder(AgentObserver):
    opened: int = 0
    closed: int = 0
    frames: dict[FrameType, int] = field(default_factory=dict)
    errors: list[tuple[Status, str, str]] = field(default_factory=list)
    decisions: int = 0
    handler_errors: int = 0

    def connection_opened(self, peer: str) -> None:
        self.opened += 1

    def connection_closed(self, peer: str) -> None:
        self.closed += 1

    def frames_received(self, frame_type: FrameType, count: int) -> None:
        self.frames[frame_type] = self.frames.get(frame_type, 0) + count

    def protocol_error(self, status: Status, message: str, peer: str) -> None:
        self.errors.append((status, message, peer))

    def decision(self, seconds: float) -> None:
        assert 0 <= seconds < 1
        self.decisions += 1

    def handler_error(self, error: Exception) -> None:
        self.handler_errors += 1


@contextlib.asynccontextmanager
async def running(handler: Callable[[list[Message]], bytes] = echo_handler,
                  **options: object) -> AsyncIterator[AgentServer]:
    server = AgentServer(LOOPBACK, handler, **options)  # type: ignore[arg-type]
    await server.start()
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()


Connect = Callable[[HostPort], Awaitable[SpopClient]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Open raw SPOP clients; every one is closed at teardown."""
    opened: list[SpopClient] = []

    async def open_client(address: HostPort) -> SpopClient:
        client = await SpopClient.connect(address)
        opened.append(client)
        return client

    yield open_client
    for client in opened:
        client.close()
        with contextlib.suppress(OSError):
            await client.writer.wait_closed()


def notify(sid: int, fid: int, request_id: bytes | None) -> bytes:
    return encode_notify(sid, fid, encode_message("route", {"id": request_id}))


def ack_values(frames: list[Frame]) -> dict[tuple[int, int], object]:
    out: dict[tuple[int, int], object] = {}
    for f in frames:
        assert f.type == FrameType.ACK and f.fin
        (action,) = decode_actions(f.payload)
        assert isinstance(action, SetVar) and action.scope == Scope.TRANSACTION and action.name == "server"
        out[(f.stream_id, f.frame_id)] = action.value
    return out


# --------------------------------------------------------------------------- server, raw client


async def test_pipelined_notifies_on_many_connections_each_get_their_own_ack(connect: Connect) -> None:
    async with running(observer=Recorder()) as server:
        clients = [await connect(server.address) for _ in range(5)]
        for client in clients:
            assert (await client.hello())["capabilities"] == b"pipelining"
        for c, client in enumerate(clients):
            # 20 in flight per connection, stream-id 0 included, as HAProxy 2.6 does
            client.send(b"".join(notify(0 if i == 0 else 1000 * c + i, i + 1, f"{c}-{i}".encode())
                                 for i in range(20)))
        for c, client in enumerate(clients):
            got = ack_values(await client.frames(20))
            assert got == {(0 if i == 0 else 1000 * c + i, i + 1): f"{c}-{i}".encode() for i in range(20)}
        observer = server.observer
        assert isinstance(observer, Recorder)
        assert observer.frames[FrameType.NOTIFY] == 100 and observer.decisions == 100
        assert observer.frames[FrameType.HAPROXY_HELLO] == 5 and observer.opened == 5
        for client in clients:
            client.close()
        await poll(lambda: observer.closed == 5, "connections to be reported closed", DEADLINE)


def test_the_same_exchange_runs_on_uvloop() -> None:
    async def exchange() -> bool:
        async with running() as server:
            client = await SpopClient.connect(server.address)
            try:
                await client.hello()
                client.send(b"".join(notify(7, i, str(i).encode()) for i in range(20)))
                assert ack_values(await client.frames(20)) == {(7, i): str(i).encode() for i in range(20)}
            finally:
                client.close()
                await client.writer.wait_closed()
        return uses_uvloop(asyncio.get_running_loop())

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        assert runner.run(exchange()) is True


async def test_healthcheck_hello_is_answered_then_closed(connect: Connect) -> None:
    async with running() as server:
        client = await connect(server.address)
        client.send(encode_haproxy_hello(capabilities="", healthcheck=True))
        frames = await client.until_eof()
        assert [f.type for f in frames] == [FrameType.AGENT_HELLO]


async def test_malformed_frame_closes_that_connection_only_with_its_status(connect: Connect) -> None:
    recorder = Recorder()
    async with running(observer=recorder) as server:
        good, bad = await connect(server.address), await connect(server.address)
        await good.hello()
        await bad.hello()
        bad.send(encode_frame(FrameType.NOTIFY, 1, 1, encode_message("m", {}), flags=0))
        status, message = await bad.disconnect_status()
        assert status == Status.FRAGMENTATION_NOT_SUPPORTED and "fragment" in message
        assert [e[0] for e in recorder.errors] == [Status.FRAGMENTATION_NOT_SUPPORTED]
        good.send(notify(1, 1, b"still here"))
        assert ack_values(await good.frames(1)) == {(1, 1): b"still here"}


async def test_haproxy_disconnect_answers_earlier_notifies_then_disconnects(connect: Connect) -> None:
    async with running() as server:
        client = await connect(server.address)
        await client.hello()
        client.send(notify(3, 1, b"x") + encode_haproxy_disconnect(0, "bye"))
        frames = await client.until_eof()
        assert [f.type for f in frames] == [FrameType.ACK, FrameType.AGENT_DISCONNECT]


async def test_failing_handler_is_answered_with_error_actions(connect: Connect) -> None:
    def broken(messages: list[Message]) -> bytes:
        raise RuntimeError("boom")

    recorder = Recorder()
    async with running(broken, observer=recorder) as server:
        client = await connect(server.address)
        await client.hello()
        client.send(notify(1, 1, b"a") + notify(1, 2, b"b"))
        frames = await client.frames(2)
        assert [(f.stream_id, f.frame_id, f.payload) for f in frames] == [
            (1, 1, DEFAULT_ERROR_ACTIONS), (1, 2, DEFAULT_ERROR_ACTIONS)]
        assert recorder.handler_errors == 2


async def test_empty_answer_from_the_handler_is_replaced_by_error_actions(connect: Connect) -> None:
    async with running(lambda messages: b"") as server:
        client = await connect(server.address)
        await client.hello()
        client.send(notify(1, 1, b"a"))
        (frame,) = await client.frames(1)
        assert frame.payload == DEFAULT_ERROR_ACTIONS


async def test_partial_frame_past_the_read_deadline_is_closed_with_timeout(connect: Connect) -> None:
    async with running(read_timeout=0.2) as server:
        client = await connect(server.address)
        await client.hello()
        client.send(notify(1, 1, b"slow")[:9])
        started = time.monotonic()
        assert (await client.disconnect_status())[0] == Status.TIMEOUT
        assert 0.15 < time.monotonic() - started < 3


async def test_missing_hello_is_closed_with_timeout(connect: Connect) -> None:
    async with running(read_timeout=0.2) as server:
        client = await connect(server.address)
        status, message = await client.disconnect_status()
        assert status == Status.TIMEOUT and "HELLO" in message


async def test_connection_limit_closes_the_least_recently_active_idle_connection(connect: Connect) -> None:
    async with running(max_connections=2) as server:
        old, recent = await connect(server.address), await connect(server.address)
        await old.hello()
        await recent.hello()
        recent.send(notify(1, 1, b"r"))
        await recent.frames(1)
        newest = await connect(server.address)
        assert (await newest.hello())["version"] == b"2.0"
        assert (await old.disconnect_status())[0] == Status.NORMAL
        for client, value in ((recent, b"r2"), (newest, b"n")):
            client.send(notify(2, 2, value))
            assert ack_values(await client.frames(1)) == {(2, 2): value}
        assert server.connections == 2


async def test_connection_limit_refuses_the_newcomer_when_nobody_is_idle(connect: Connect) -> None:
    async with running(max_connections=1) as server:
        busy = await connect(server.address)
        await busy.hello()
        assert server.idle_connections == 1
        busy.send(notify(1, 1, b"x")[:6])  # a partial frame: not idle
        await poll(lambda: server.idle_connections == 0, "the partial frame to arrive", DEADLINE)
        refused = await connect(server.address)
        assert (await refused.disconnect_status())[0] == Status.RESOURCE_ERROR


async def test_graceful_close_disconnects_everyone_and_stops_accepting(connect: Connect) -> None:
    server = AgentServer(LOOPBACK, echo_handler)
    await server.start()
    address = server.address
    clients = [await connect(address) for _ in range(3)]
    for client in clients:
        await client.hello()
    clients[0].send(notify(9, 9, b"in flight"))
    assert ack_values(await clients[0].frames(1)) == {(9, 9): b"in flight"}
    server.close()
    for client in clients:
        status, message = await client.disconnect_status()
        assert status == Status.NORMAL and "shutting down" in message
    async with asyncio.timeout(DEADLINE):
        await server.wait_closed()
    assert server.connections == 0
    with pytest.raises(OSError):
        await asyncio.open_connection(address.host, address.port)


async def test_sigterm_handler_triggers_graceful_close(connect: Connect) -> None:
    async with running() as server:
        client = await connect(server.address)
        await client.hello()
        remove = install_signal_handlers(server.close)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            assert (await client.disconnect_status())[0] == Status.NORMAL
            async with asyncio.timeout(DEADLINE):
                await server.wait_closed()
        finally:
            remove()


# --------------------------------------------------------------------------- real HAProxy 2.6

HAPROXY = haproxy_binary()
needs_haproxy = pytest.mark.skipif(not os.access(HAPROXY, os.X_OK), reason="haproxy is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def http_backend() -> asyncio.Server:
    """A keep-alive HTTP/1.1 backend answering 200 "ok"."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def http_get(port: int, request_id: str | None = None) -> tuple[int, dict[str, str]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        extra = f"X-Req-Id: {request_id}\r\n" if request_id is not None else ""
        writer.write(f"GET /?id={request_id} HTTP/1.1\r\nHost: test\r\n{extra}Connection: close\r\n\r\n".encode())
        async with asyncio.timeout(DEADLINE):
            response = await reader.read()
    finally:
        writer.close()
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
    return int(head[0].split()[1]), headers


@dataclass
class Haproxy:
    process: subprocess.Popen[bytes]
    frontend: int
    admin: Path

    async def command(self, command: str) -> str:
        reader, writer = await asyncio.open_unix_connection(str(self.admin))
        try:
            writer.write(command.encode() + b"\n")
            async with asyncio.timeout(DEADLINE):
                return (await reader.read()).decode()
        finally:
            writer.close()

    async def agent_check(self) -> tuple[str, str]:
        """(status, check_status) of the agent server in `show stat`."""
        text = await self.command("show stat")
        for row in csv.DictReader(io.StringIO(text.lstrip("# "))):
            if row["pxname"] == "agents" and row["svname"] == "agent1":
                return row["status"], row["check_status"]
        raise AssertionError(f"agent server not in show stat:\n{text}")


def write_config(tmp: Path, frontend: int, backend: int, agent: int) -> Path:
    (tmp / "spoe.conf").write_text("""\
[sticky]
spoe-agent sticky-agent
    messages route
    option var-prefix sticky
    timeout hello 500ms
    timeout idle 30s
    timeout processing 500ms
    use-backend agents
spoe-message route
    args id=req.hdr(X-Req-Id) src=src
    event on-frontend-http-request
""")
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(f"""\
global
    stats socket {tmp}/admin.sock mode 600 level admin
    maxconn 2000
defaults
    mode http
    timeout connect 1s
    timeout client 10s
    timeout server 10s
frontend fe
    bind 127.0.0.1:{frontend}
    filter spoe engine sticky config {tmp}/spoe.conf
    http-response set-header X-Target %[var(txn.sticky.server)] if {{ var(txn.sticky.server) -m found }}
    http-response set-header X-Target fallback unless {{ var(txn.sticky.server) -m found }}
    default_backend be_app
backend be_app
    server app1 127.0.0.1:{backend}
backend agents
    mode tcp
    option spop-check
    timeout connect 500ms
    timeout server 30s
    # A slow HELLO (the agent shares its loop with 200 clients here) gets 1 s, not just `inter`.
    timeout check 1s
    server agent1 127.0.0.1:{agent} check inter 200ms fall 2 rise 1 on-marked-down shutdown-sessions
""")
    return cfg


@contextlib.contextmanager
def haproxy_process(tmp: Path, backend: int, agent: int) -> Iterator[Haproxy]:
    assert HAPROXY is not None
    frontend = free_port()
    cfg = write_config(tmp, frontend, backend, agent)
    check = subprocess.run([HAPROXY, "-c", "-q", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    with open(tmp / "haproxy.log", "wb") as log:
        process = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=log)
    try:
        yield Haproxy(process, frontend, tmp / "admin.sock")
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def wait_ready(haproxy: Haproxy) -> None:
    async def up() -> bool:
        if haproxy.process.poll() is not None:
            pytest.fail(f"haproxy exited with {haproxy.process.returncode}")
        try:
            return await haproxy.agent_check() == ("UP", "L7OK")
        except OSError:
            return False

    await poll(up, "haproxy's spop-check of the agent to pass", DEADLINE)


@needs_haproxy
async def test_real_haproxy_hello_health_checks_and_variable(tmp_path: Path) -> None:
    recorder = Recorder()
    backend = await http_backend()
    async with running(observer=recorder) as agent:
        try:
            with haproxy_process(tmp_path, backend.sockets[0].getsockname()[1], agent.address.port) as haproxy:
                await wait_ready(haproxy)  # spop-check health checks pass: UP / L7OK
                status, headers = await http_get(haproxy.frontend, "hello-42")
                assert status == 200 and headers["x-target"] == "hello-42"
                status, headers = await http_get(haproxy.frontend, None)  # missing header → NULL
                assert status == 200 and headers["x-target"] == "none"
                assert recorder.frames[FrameType.HAPROXY_HELLO] >= 2  # health checks + the engine
                assert recorder.frames[FrameType.NOTIFY] >= 2
                assert recorder.errors == []
        finally:
            backend.close()
            await backend.wait_closed()


@needs_haproxy
async def test_real_haproxy_200_concurrent_requests_each_get_their_own_answer(tmp_path: Path) -> None:
    backend = await http_backend()
    async with running() as agent:
        try:
            with haproxy_process(tmp_path, backend.sockets[0].getsockname()[1], agent.address.port) as haproxy:
                await wait_ready(haproxy)
                ids = [f"req-{i}-{os.urandom(4).hex()}" for i in range(200)]
                results = await asyncio.gather(*(http_get(haproxy.frontend, i) for i in ids))
                assert [status for status, _ in results] == [200] * 200
                assert [headers.get("x-target") for _, headers in results] == ids
        finally:
            backend.close()
            await backend.wait_closed()


AGENT_PROCESS = """
import sys
from spoa.agent import run, serve
from spoa.config import HostPort
from spoa.protocol import Scope, encode_set_var

def echo(messages):
    value = messages[0].args.get("id") if messages else None
    return encode_set_var(Scope.TRANSACTION, "server", value if isinstance(value, bytes) else b"none")

run(serve(HostPort("127.0.0.1", int(sys.argv[1])), echo))
"""


def start_agent_process(port: int, tmp: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(tmp / "agent.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-c", AGENT_PROCESS, str(port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=log)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


@needs_haproxy
async def test_real_haproxy_falls_back_when_the_agent_dies_and_recovers_on_restart(tmp_path: Path) -> None:
    backend = await http_backend()
    port = free_port()
    agent = start_agent_process(port, tmp_path)
    try:
        with haproxy_process(tmp_path, backend.sockets[0].getsockname()[1], port) as haproxy:
            await wait_ready(haproxy)
            assert (await http_get(haproxy.frontend, "a1"))[1]["x-target"] == "a1"

            agent.kill()  # SIGKILL: no DISCONNECT, connections reset
            agent.wait()
            for i in range(20):  # every request is still served, from HAProxy's fallback
                status, headers = await http_get(haproxy.frontend, f"down-{i}")
                assert status == 200 and headers["x-target"] in ("fallback", f"down-{i}")
            await poll(lambda: _has_target(haproxy.frontend, "fallback"), "the fallback answer", DEADLINE, 0.05)

            agent = start_agent_process(port, tmp_path)

            async def answered_by_agent() -> bool:
                status, headers = await http_get(haproxy.frontend, "back")
                assert status == 200
                return headers["x-target"] == "back"

            await poll(answered_by_agent, "the restarted agent's answers", DEADLINE, 0.05)

            agent.send_signal(signal.SIGTERM)  # graceful: exits 0
            assert agent.wait(DEADLINE) == 0
            status, headers = await http_get(haproxy.frontend, "after")
            assert status == 200
    finally:
        stop(agent)
        backend.close()
        await backend.wait_closed()


async def _has_target(port: int, target: str) -> bool:
    status, headers = await http_get(port, "probe")
    return status == 200 and headers["x-target"] == target
