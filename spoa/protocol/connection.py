"""The per-connection SPOP state machine, sans I/O: bytes in, events and bytes out.

Owns: framing of the byte stream, the HELLO negotiation, which frame is allowed in which state,
the AGENT-HELLO / AGENT-DISCONNECT answers, and the read deadline (time is a parameter, as in
aioquic). Must not: touch sockets, call the handler, sleep or log.

States: AWAITING_HELLO → READY → CLOSED. A health-check HELLO is answered and then CLOSED;
HAPROXY-DISCONNECT is answered with AGENT-DISCONNECT(0) and CLOSED; any `ProtocolError` is
answered with AGENT-DISCONNECT(status, message) and CLOSED. Once CLOSED, input is ignored and the
caller should write `data_to_send()` and close the transport.

Write order, for the caller (see `spoa.agent.server`):
- while the connection stays open, write `data_to_send()` (an AGENT-HELLO) before the ACKs of
  the NOTIFYs returned by the same `receive_data` call;
- when `receive_data` left it CLOSED, write those ACKs first and `data_to_send()` (the
  AGENT-DISCONNECT) last: NOTIFYs decoded before the error or the HAPROXY-DISCONNECT are still
  answered. (If the same call also answered the HELLO, no NOTIFY is returned, so the order holds.)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import Enum

from spoa.protocol.codec import Value, decode_varint
from spoa.protocol.errors import ProtocolError, Status
from spoa.protocol.frames import (
    DEFAULT_MAX_FRAME_SIZE,
    FLAG_FIN,
    MAX_FRAME_SIZE_LIMIT,
    MIN_FRAME_SIZE,
    FrameType,
    Message,
    decode_disconnect,
    decode_kv_list,
    decode_messages,
    decode_metadata,
    encode_ack,
    encode_agent_disconnect,
    encode_agent_hello,
)

SPOP_VERSION = "2.0"
_SPOP_MAJOR = 2
_unpack_length = struct.Struct(">I").unpack_from
_unpack_head = struct.Struct(">IBI").unpack_from  # length, type, flags
_pack_length = struct.Struct(">I").pack
_ACK_HEAD = bytes((FrameType.ACK,)) + FLAG_FIN.to_bytes(4, "big")


class State(Enum):
    AWAITING_HELLO = "awaiting-hello"
    READY = "ready"
    CLOSED = "closed"


@dataclass(slots=True)
class Notify:
    """A NOTIFY to answer with exactly one ACK carrying the same (stream_id, frame_id).

    `ids` holds the two ids as they were on the wire (both varints): `Connection.ack_ids` puts them
    back into the ACK as they are, without encoding them again.
    """

    stream_id: int
    frame_id: int
    messages: list[Message]
    ids: bytes = field(default=b"", compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Hello:
    """HAProxy's HELLO was accepted; these are the negotiated terms."""

    max_frame_size: int
    pipelining: bool
    healthcheck: bool
    engine_id: str | None


@dataclass(frozen=True, slots=True)
class Disconnected:
    """HAProxy sent HAPROXY-DISCONNECT with this status and message."""

    status: int
    message: str


Event = Notify | Hello | Disconnected


def _parse_versions(raw: bytes) -> list[tuple[int, int]]:
    versions = []
    for item in raw.split(b","):
        major, sep, minor = item.strip().partition(b".")
        if sep and major.isdigit() and minor.isdigit() and len(major) < 6 and len(minor) < 6:
            versions.append((int(major), int(minor)))
    return versions


class Connection:
    """One SPOP connection with HAProxy. Not thread-safe; one per transport."""

    __slots__ = ("_buf", "_max_actions", "_out", "_partial_since", "_ready", "error", "hello",
                 "max_frame_size", "our_max_frame_size", "read_timeout", "state")

    def __init__(self, now: float = 0.0, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 read_timeout: float | None = None) -> None:
        """`max_frame_size`: ours, offered in the negotiation. `read_timeout`: seconds allowed
        for the HELLO after `now` (the connection's start) and for the rest of a partial frame."""
        if not MIN_FRAME_SIZE <= max_frame_size <= MAX_FRAME_SIZE_LIMIT:
            raise ValueError(f"max_frame_size must be in [{MIN_FRAME_SIZE}, {MAX_FRAME_SIZE_LIMIT}], "
                             f"got {max_frame_size}")
        self.our_max_frame_size = max_frame_size
        self.max_frame_size = max_frame_size  # until negotiated: our own limit
        self.read_timeout = read_timeout
        self.state = State.AWAITING_HELLO
        self.hello: Hello | None = None
        self.error: ProtocolError | None = None
        self._ready = False
        self._buf = b""
        self._out: list[bytes] = []
        self._partial_since: float | None = now  # the HELLO is awaited like a partial frame
        self._max_actions = max_frame_size - 25  # ACK = type, flags, two varints (≤ 10 each)

    # ------------------------------------------------------------------ reading

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)

    def receive_data(self, data: bytes, now: float = 0.0) -> list[Event]:
        """Feed bytes from HAProxy; return the events of the complete frames among them."""
        if self.state is State.CLOSED:
            return []
        buf = self._buf + data if self._buf else data
        events: list[Event] = []
        pos, size = 0, len(buf)
        limit = self.max_frame_size
        ready = self._ready
        answered_hello = False
        try:
            while size - pos >= 4:
                if ready and size - pos >= 11:
                    # The per-request frame inline: a complete NOTIFY with FIN (flags 1) and its ids
                    # read in place. Anything else, or anything odd, takes the full path below.
                    length, frame_type, flags = _unpack_head(buf, pos)
                    end = pos + 4 + length
                    if frame_type == 3 and flags == 1 and 7 <= length <= limit and end <= size:
                        p = pos + 9
                        stream_id = buf[p]
                        if stream_id < 240:
                            p += 1
                        else:
                            stream_id, p = decode_varint(buf, p, end)
                        if p < end:
                            frame_id = buf[p]
                            if frame_id < 240:
                                p += 1
                            else:
                                frame_id, p = decode_varint(buf, p, end)
                            events.append(Notify(stream_id, frame_id, decode_messages(buf, p, end),
                                                 buf[pos + 9 : p]))
                            pos = end
                            continue
                length = _unpack_length(buf, pos)[0]
                if length > limit:
                    raise ProtocolError(Status.TOO_BIG,
                                        f"frame of {length} bytes exceeds max-frame-size {limit}")
                end = pos + 4 + length
                if end > size:
                    break
                frame_type, flags, stream_id, frame_id, p = decode_metadata(buf, pos + 4, end)
                if frame_type == 3 and ready and flags & FLAG_FIN:
                    events.append(Notify(stream_id, frame_id, decode_messages(buf, p, end), buf[pos + 9 : p]))
                    pos = end
                    continue
                pos = end
                event = self._control_frame(frame_type, flags, buf, p, end)
                if event is not None:
                    events.append(event)
                    if type(event) is Hello:
                        answered_hello = True
                if self.closed:
                    break
                ready = self._ready
                limit = self.max_frame_size
        except ProtocolError as exc:
            self._fail(exc)
            if answered_hello:
                return [e for e in events if type(e) is not Notify]
            return events
        if self.closed:
            self._buf = b""
            return events
        self._buf = buf[pos:] if pos < size else b""
        if ready:
            if not self._buf:
                self._partial_since = None
            elif pos or self._partial_since is None:  # a new partial frame starts now
                self._partial_since = now
        return events

    def _control_frame(self, frame_type: int, flags: int, buf: bytes, pos: int, end: int) -> Event | None:
        """Every frame but a NOTIFY in READY. Returns an event or None (skipped frame)."""
        if not flags & FLAG_FIN or frame_type == FrameType.UNSET:
            raise ProtocolError(Status.FRAGMENTATION_NOT_SUPPORTED,
                                f"fragmented frame (type {frame_type}, flags {flags:#x}); "
                                "this agent does not announce fragmentation")
        if frame_type == FrameType.HAPROXY_DISCONNECT:
            event = Disconnected(*decode_disconnect(buf, pos, end))
            self._close(Status.NORMAL, "bye")
            return event
        if frame_type == FrameType.HAPROXY_HELLO:
            if self.state is not State.AWAITING_HELLO:
                raise ProtocolError(Status.INVALID, "HAPROXY-HELLO received twice")
            return self._hello(decode_kv_list(buf, pos, end))
        if frame_type == FrameType.NOTIFY:
            raise ProtocolError(Status.INVALID, "NOTIFY received before HAPROXY-HELLO")
        if self.state is State.AWAITING_HELLO:
            raise ProtocolError(Status.INVALID, f"frame of type {frame_type} received before HAPROXY-HELLO")
        if frame_type in (FrameType.AGENT_HELLO, FrameType.AGENT_DISCONNECT, FrameType.ACK):
            raise ProtocolError(Status.INVALID, f"agent frame type {frame_type} received from HAProxy")
        return None  # unknown frame type: doc/SPOE.txt allows skipping it

    def _hello(self, kv: dict[str, Value]) -> Hello:
        versions = kv.get("supported-versions")
        if not isinstance(versions, bytes):
            raise ProtocolError(Status.NO_VERSION, "HAPROXY-HELLO has no supported-versions string")
        their_size = kv.get("max-frame-size")
        if type(their_size) is not int:
            raise ProtocolError(Status.NO_FRAME_SIZE, "HAPROXY-HELLO has no max-frame-size integer")
        capabilities = kv.get("capabilities")
        if not isinstance(capabilities, bytes):
            raise ProtocolError(Status.NO_CAPABILITIES, "HAPROXY-HELLO has no capabilities string")
        if not any(major == _SPOP_MAJOR for major, _ in _parse_versions(versions)):
            raise ProtocolError(Status.BAD_VERSION,
                                f"unsupported versions {versions.decode('utf-8', 'replace')!r}; "
                                f"this agent speaks SPOP {SPOP_VERSION}")
        if their_size < MIN_FRAME_SIZE:
            raise ProtocolError(Status.BAD_FRAME_SIZE,
                                f"max-frame-size {their_size} is below the minimum {MIN_FRAME_SIZE}")
        size = min(their_size, self.our_max_frame_size)
        pipelining = b"pipelining" in {c.strip() for c in capabilities.split(b",")}
        engine_id = kv.get("engine-id")
        hello = Hello(size, pipelining, kv.get("healthcheck") is True,
                      engine_id.decode("utf-8", "replace") if isinstance(engine_id, bytes) else None)
        self._out.append(encode_agent_hello(SPOP_VERSION, size, "pipelining" if pipelining else ""))
        self.hello = hello
        self.max_frame_size = size
        self._max_actions = size - 25
        if hello.healthcheck:
            self.state = State.CLOSED
        else:
            self.state = State.READY
            self._ready = True
            self._partial_since = None
        return hello

    # ------------------------------------------------------------------ writing

    def ack(self, stream_id: int, frame_id: int, actions: bytes) -> bytes:
        """The ACK frame for a NOTIFY. `actions` is a non-empty, pre-encoded actions payload
        (HAProxy wants at least one action); raises ValueError if empty or too big for the frame."""
        if not actions or len(actions) > self._max_actions:
            frame = encode_ack(stream_id, frame_id, actions)
            if not actions or len(frame) - 4 > self.max_frame_size:
                raise ValueError(f"ACK actions must be non-empty and fit max-frame-size "
                                 f"{self.max_frame_size}, got {len(actions)} bytes")
            return frame
        return encode_ack(stream_id, frame_id, actions)

    def ack_ids(self, ids: bytes, actions: bytes) -> bytes:
        """The ACK for a NOTIFY from its wire ids (`Notify.ids`): the per-request path. Same checks
        and result as `ack(stream_id, frame_id, actions)`."""
        size = 5 + len(ids) + len(actions)
        if not actions or size > self.max_frame_size:
            raise ValueError(f"ACK actions must be non-empty and fit max-frame-size "
                             f"{self.max_frame_size}, got {len(actions)} bytes")
        return _pack_length(size) + _ACK_HEAD + ids + actions

    def data_to_send(self) -> bytes:
        """AGENT-HELLO / AGENT-DISCONNECT bytes produced since the last call (see the write order)."""
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def close(self, status: Status = Status.NORMAL, message: str = "agent closing") -> None:
        """Queue AGENT-DISCONNECT(status, message) and stop reading (graceful shutdown, limits)."""
        if self.state is not State.CLOSED:
            self._close(status, message)

    def _close(self, status: Status, message: str) -> None:
        self._out.append(encode_agent_disconnect(status, message))
        self.state = State.CLOSED
        self._ready = False
        self._buf = b""
        self._partial_since = None

    def _fail(self, exc: ProtocolError) -> None:
        self.error = exc
        self._close(exc.status, exc.message)

    # ------------------------------------------------------------------ time

    def get_timer(self) -> float | None:
        """When `handle_timer` must run next: the deadline of the HELLO or of a partial frame."""
        if self.read_timeout is None or self._partial_since is None or self.state is State.CLOSED:
            return None
        return self._partial_since + self.read_timeout

    def restart_read_deadline(self, now: float) -> None:
        """Count the pending HELLO or partial frame as started at `now`: for a pause that was ours
        (we stopped reading while the peer did not read our answers), not the peer's slowness."""
        if self._partial_since is not None:
            self._partial_since = now

    def handle_timer(self, now: float) -> None:
        """Close with TIMEOUT if the HELLO or a partial frame is overdue at `now`."""
        deadline = self.get_timer()
        if deadline is not None and now >= deadline:
            what = "HAPROXY-HELLO" if self.state is State.AWAITING_HELLO else "the rest of a frame"
            self._fail(ProtocolError(Status.TIMEOUT, f"no {what} within {self.read_timeout} s"))
