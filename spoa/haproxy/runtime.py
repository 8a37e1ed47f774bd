"""An asyncio client for HAProxy's admin socket (the runtime API).

Owns: connecting (a UNIX socket path, or TCP `host:port`), one interactive session (`prompt` mode) per
batch of commands, framing answers, timeouts, turning failure answers into `RuntimeAPIError` and
socket trouble into `RuntimeAPIUnavailable`, and telling an optional observer about every command.
Must not: decide what to change (`reconcile` does) or interpret answers beyond the typed helpers
(`answers` does).

Framing: in `prompt` mode HAProxy ends every answer with the prompt `"\\n> "` and keeps the connection
open, so one connection carries a whole refresh's worth of commands. None of the answers we read has
a line starting with `"> "`, so the prompt is unambiguous. Measured on 2.6 (500 `add server`):
a new connection per command 0.049 s, one prompt session with a round trip per command 0.037 s,
the same pipelined 0.034 s: pipelining buys nothing measurable, so commands go one at a time, and a
caller sees each answer before sending the next (stop at the first failure).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from types import TracebackType
from typing import Protocol

from spoa.config import parse_host_port
from spoa.haproxy.answers import (
    MapEntry,
    ServerState,
    answer_failed,
    parse_info,
    parse_map,
    parse_server_sessions,
    parse_servers_state,
    verb_of,
)
from spoa.haproxy.errors import RuntimeAPIError, RuntimeAPIUnavailable

_PROMPT = b"\n> "
MAX_COMMAND_LENGTH = 4096
# The largest payload `payload_command` sends at once: below HAProxy's default 16 kB buffer with room
# for the command line (measured: 800 map lines of ~15 bytes passed on 2.6 and 3.4, 2,000 did not).
MAX_PAYLOAD_BYTES = 12_000


class CommandObserver(Protocol):
    """Told about every command sent (for metrics): its verb, whether it succeeded, how long it took."""

    def command_done(self, verb: str, ok: bool, seconds: float) -> None: ...


class CommandCounts:
    """A ready-made observer: commands sent and failed, by verb (`add server`, `show map`, ...)."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()

    def command_done(self, verb: str, ok: bool, seconds: float) -> None:
        self.sent[verb] += 1
        if not ok:
            self.failed[verb] += 1


def validate_command(command: str) -> str:
    """A command HAProxy reads as exactly one command, or ValueError (a bug in the caller).

    `;` separates commands on HAProxy's CLI in every mode, and a newline ends one.
    """
    if not command.strip():
        raise ValueError("empty command")
    if len(command) > MAX_COMMAND_LENGTH:
        raise ValueError(f"command longer than {MAX_COMMAND_LENGTH} characters: {command[:80]!r}...")
    bad = [c for c in command if c in ";\n\r\0"]
    if bad:
        raise ValueError(f"command contains {bad[0]!r}, which would split it: {command[:200]!r}")
    return command


def validate_map_path(path: str) -> str:
    """A map file path that every map command carries as one argument, or ValueError (a bug or a bad
    setting in the caller): nothing that splits a command, no white space."""
    validate_command(f"show map {path}")
    if any(c.isspace() for c in path):
        raise ValueError(f"map path must not contain white space: {path!r}")
    return path


def _answer_text(raw: bytes) -> str:
    """The answer without the prompt and without the empty line HAProxy puts after most answers."""
    text = raw.decode("utf-8", "replace")
    if text.endswith("\n\n"):
        text = text[:-1]
    return "" if text == "\n" else text


class RuntimeAPI:
    """The admin socket at `address` (`/path/admin.sock` or `host:port`)."""

    def __init__(self, address: str, *, timeout: float = 2.0, observer: CommandObserver | None = None,
                 max_answer_bytes: int = 64 << 20) -> None:
        if not address:
            raise ValueError("empty admin socket address")
        self.address = address
        self.timeout = timeout
        self.observer = observer
        self.max_answer_bytes = max_answer_bytes

    def session(self) -> RuntimeSession:
        """One connection in interactive mode: `async with api.session() as s: await s.command(...)`."""
        return RuntimeSession(self)

    async def command(self, command: str, *, check: bool = True) -> str:
        """Send one command on its own connection and return the answer."""
        async with self.session() as s:
            return await s.command(command, check=check)

    async def payload_command(self, command: str, payload: bytes) -> str:
        """`command <<` followed by a multi-line `payload`, on a connection of its own (not in
        `prompt` mode); raises RuntimeAPIError when the answer means failure.

        Why not in the session: HAProxy 2.6 echoes a `+ ` continuation prompt per payload line in
        `prompt` mode and took ~200-300 ms for a 65,536-line map in 800-line chunks, against ~85 ms
        with a connection per chunk (3.4: ~75 ms either way). The payload must fit HAProxy's buffer
        (tune.bufsize, 16 kB by default, minus the command): a larger one is cut and its remaining
        lines are read as commands (measured on 3.4), so callers send chunks of at most
        `MAX_PAYLOAD_BYTES`. `payload` must not contain an empty line (it would end the payload).
        """
        validate_command(command)
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"payload of {len(payload)} bytes is larger than {MAX_PAYLOAD_BYTES}")
        if b"\n\n" in payload or payload.startswith(b"\n"):
            raise ValueError("payload contains an empty line, which would end it early")
        verb = verb_of(command)
        started = time.perf_counter()
        ok = False
        data = command.encode() + b" <<\n" + payload + (b"" if payload.endswith(b"\n") else b"\n") + b"\n"
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    reader, writer = await self._connect()
                except (OSError, ValueError) as e:
                    raise RuntimeAPIUnavailable(self.address, f"connect failed: {e}") from None
                writer.write(data)
                await writer.drain()
                raw = await reader.read(self.max_answer_bytes)
                buf = bytearray(raw)
                while raw:
                    raw = await reader.read(65536)
                    buf += raw
            answer = _answer_text(bytes(buf))
            ok = not answer_failed(command, answer)
            if not ok:
                raise RuntimeAPIError(command, answer)
            return answer
        except TimeoutError:
            raise RuntimeAPIUnavailable(self.address,
                                        f"no complete answer to {verb!r} within {self.timeout}s") from None
        except OSError as e:
            raise RuntimeAPIUnavailable(self.address, f"{verb!r}: {e}") from None
        finally:
            if writer is not None:
                writer.close()
            if self.observer is not None:
                self.observer.command_done(verb, ok, time.perf_counter() - started)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.address.startswith("/") or self.address.startswith("unix@"):
            return await asyncio.open_unix_connection(self.address.removeprefix("unix@"))
        hp = parse_host_port(self.address)
        return await asyncio.open_connection(hp.host, hp.port)


class RuntimeSession:
    """An open interactive connection. Not shared between tasks; one command at a time."""

    def __init__(self, api: RuntimeAPI) -> None:
        self.api = api
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._broken: str | None = None

    async def __aenter__(self) -> RuntimeSession:
        try:
            async with asyncio.timeout(self.api.timeout):
                self._reader, self._writer = await self.api._connect()
        except TimeoutError:
            raise RuntimeAPIUnavailable(self.api.address, f"connect timed out after {self.api.timeout}s") from None
        except (OSError, ValueError) as e:
            raise RuntimeAPIUnavailable(self.api.address, f"connect failed: {e}") from None
        try:
            await self._exchange("prompt")
        except BaseException:
            await self.__aexit__(None, None, None)  # `async with` does not exit what failed to enter
            raise
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            if self._broken is None:
                writer.write(b"quit\n")
            writer.close()
            async with asyncio.timeout(1.0):
                await writer.wait_closed()
        except (OSError, TimeoutError):
            pass

    async def _exchange(self, command: str) -> str:
        """Send `command`, return its raw answer text. Socket trouble breaks the session for good."""
        if self._broken is not None:
            raise RuntimeAPIUnavailable(self.api.address, f"session unusable: {self._broken}")
        if self._reader is None or self._writer is None:
            raise RuntimeError("RuntimeSession used outside `async with`")
        buf = bytearray()
        try:
            async with asyncio.timeout(self.api.timeout):
                self._writer.write(command.encode() + b"\n")
                await self._writer.drain()
                while not buf.endswith(_PROMPT):
                    chunk = await self._reader.read(65536)
                    if not chunk:
                        self._broken = "connection closed by HAProxy"
                        raise RuntimeAPIUnavailable(self.api.address,
                                                    f"connection closed while waiting for {verb_of(command)!r}")
                    buf += chunk
                    if len(buf) > self.api.max_answer_bytes:
                        self._broken = "answer too large"
                        raise RuntimeAPIError(command, f"answer larger than {self.api.max_answer_bytes} bytes")
        except TimeoutError:
            self._broken = "timed out"
            raise RuntimeAPIUnavailable(
                self.api.address, f"no complete answer to {verb_of(command)!r} within {self.api.timeout}s") from None
        except OSError as e:
            self._broken = str(e)
            raise RuntimeAPIUnavailable(self.api.address, f"{verb_of(command)!r}: {e}") from None
        return _answer_text(bytes(buf[: -len(_PROMPT) + 1]))

    async def command(self, command: str, *, check: bool = True) -> str:
        """Send one command; return its answer, or raise RuntimeAPIError when the answer means failure
        (with `check=False`, return it anyway; the observer still counts the failure)."""
        validate_command(command)
        verb = verb_of(command)
        started = time.perf_counter()
        ok = False
        try:
            answer = await self._exchange(command)
            ok = not answer_failed(command, answer)
            if check and not ok:
                raise RuntimeAPIError(command, answer)
            return answer
        finally:
            if self.api.observer is not None:
                self.api.observer.command_done(verb, ok, time.perf_counter() - started)

    async def commands(self, commands: Sequence[str]) -> list[str]:
        """Send `commands` in order; stop at the first failure (raised with its command and answer)."""
        return [await self.command(c) for c in commands]

    # ------------------------------------------------------------------ typed reads

    async def servers_state(self, backend: str) -> list[ServerState]:
        command = f"show servers state {backend}"
        return parse_servers_state(await self.command(command), command)

    async def server_sessions(self, backend: str) -> dict[str, int]:
        """Current sessions (+ queued requests) per server of `backend` (`show stat <be> 4 -1`)."""
        command = f"show stat {backend} 4 -1"
        return parse_server_sessions(await self.command(command), backend, command)

    async def show_map(self, map_file: str) -> list[MapEntry]:
        command = f"show map {map_file}"
        return parse_map(await self.command(command), command)

    async def info(self) -> dict[str, str]:
        return parse_info(await self.command("show info"))


__all__ = [
    "MAX_PAYLOAD_BYTES",
    "CommandCounts",
    "CommandObserver",
    "RuntimeAPI",
    "RuntimeSession",
    "validate_command",
]
