"""Real HTTP backends for the demo and the tests: each one says which task answered.

Owns: a tiny keep-alive HTTP/1.1 server (`python -m spoa.local.backends --bind IP:PORT --name N`) and
`Backend`, a handle that starts it as a child process, waits until it listens and stops it. Every
response carries `X-Served-By: IP:PORT` and the body `NAME IP:PORT\\n`; a request with `X-Echo: 1` also gets
back the X-Forwarded-For and X-Real-IP headers it arrived with, as `X-Echo-X-Forwarded-For` etc. Must not: be used in
production; it is a stand-in for the operator's application.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from types import TracebackType

from spoa.config import parse_host_port
from spoa.haproxy.process import stop_process


class _HTTPServer(asyncio.Protocol):
    """Answers every request with who served it; understands just enough HTTP/1.1 for keep-alive."""

    def __init__(self, name: str, addr: str) -> None:
        self.body = f"{name} {addr}\n".encode()
        self.response = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Served-By: " + addr.encode()
            + b"\r\nContent-Length: " + str(len(self.body)).encode() + b"\r\n\r\n" + self.body
        )
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def _echo(self, head: bytes) -> bytes:
        """The response with the client-address headers the request carried, for tests that check
        what a task receives (asked for with `X-Echo: 1`; other requests get the fixed response)."""
        seen = [b"X-Echo-" + line for line in head.split(b"\r\n")[1:]
                if line.lower().startswith((b"x-forwarded-for:", b"x-real-ip:"))]
        status, _, rest = self.response.partition(b"\r\n")
        return b"\r\n".join([status, *seen, rest])

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        if len(self.buffer) > 1 << 20:
            self.transport.close()
            return
        out = []
        close = False
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head, self.buffer = self.buffer[:end], self.buffer[end + 4:]
            lower = head.lower()
            # Request bodies are not expected; skip a declared Content-Length to stay in sync.
            idx = lower.find(b"content-length:")
            if idx >= 0:
                line_end = lower.find(b"\r\n", idx)
                length = int(lower[idx + 15: line_end if line_end >= 0 else None].strip() or 0)
                self.buffer = self.buffer[length:]
            out.append(self._echo(head) if b"\r\nx-echo:" in lower else self.response)
            if b"connection: close" in lower or head.startswith(b"GET / HTTP/1.0"):
                close = True
                break
        if out:
            self.transport.write(b"".join(out))
        if close:
            self.transport.close()


async def _serve(host: str, port: int, name: str) -> None:
    loop = asyncio.get_running_loop()
    addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    server = await loop.create_server(lambda: _HTTPServer(name, addr), host, port, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening {addr}", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bind", required=True, help="IP:PORT")
    parser.add_argument("--name", required=True)
    args = parser.parse_args(argv)
    hp = parse_host_port(args.bind)
    asyncio.run(_serve(hp.host, hp.port, args.name))


def spawn_listening(argv: list[str], ip: str, port: int, what: str, timeout: float = 10.0) -> subprocess.Popen[bytes]:
    """Start `argv` in its own session and return once it accepts connections on ip:port; raise
    (naming `what`, with the end of its stderr) when it exits first or does not listen in time."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"{what} exited at start: {err.strip()[-500:]}")
        try:
            with socket.create_connection((ip, port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.02)
    stop_process(proc)
    raise TimeoutError(f"{what} did not listen within {timeout}s")


class Backend:
    """One backend task as a child process. `start()` returns when it accepts connections."""

    def __init__(self, ip: str, port: int, name: str | None = None) -> None:
        self.ip = ip
        self.port = port
        self.name = name or f"task-{ip}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"

    def start(self, timeout: float = 10.0) -> Backend:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.proc = spawn_listening(
            [sys.executable, "-m", "spoa.local.backends", "--bind", self.address, "--name", self.name],
            self.ip, self.port, f"backend {self.address}", timeout)
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        stop_process(proc)
        if proc.stderr:
            proc.stderr.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Backend:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
