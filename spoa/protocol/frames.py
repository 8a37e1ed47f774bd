"""SPOP frames: metadata, KV lists, messages, actions, and a builder/parser per frame type.

Owns: the layout of doc/SPOE.txt section 3.2 — `<LENGTH:4 BE><TYPE:1><FLAGS:4 BE><STREAM-ID:varint>
<FRAME-ID:varint><PAYLOAD>` — and the payload lists (KV-LIST, LIST-OF-MESSAGES, LIST-OF-ACTIONS).
Builders return complete frames (length prefix included). Parsers take a frame body without its
length prefix and raise only `ProtocolError`. Must not: keep state between frames (that is
`connection.py`), or do I/O.

The routing layer pre-encodes its answers once with `encode_set_var` / `encode_unset_var`; an
actions payload is those byte strings concatenated, and `encode_ack` wraps it per request.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv4Address
from typing import TypeAlias

from spoa.protocol.codec import (
    Value,
    decode_data,
    decode_name,
    decode_varint,
    encode_data,
    encode_name,
    encode_string,
    encode_uint32,
    encode_varint,
)
from spoa.protocol.errors import ProtocolError, Status

FLAG_FIN = 0x1
FLAG_ABORT = 0x2

MIN_FRAME_SIZE = 256
"""doc/SPOE.txt: both peers must accept frames of at least 256 bytes."""
DEFAULT_MAX_FRAME_SIZE = 16380
"""HAProxy's default (tune.bufsize 16384 - 4); frame sizes exclude the 4-byte length prefix."""
MAX_FRAME_SIZE_LIMIT = (1 << 24) - 1
"""The largest max-frame-size this implementation will agree to (HAProxy's own bound)."""

_LENGTH = struct.Struct(">I")
_METADATA_MIN = 7  # type + flags + two 1-byte varints


class FrameType(IntEnum):
    UNSET = 0  # continuation fragment; never valid here (we refuse fragmentation)
    HAPROXY_HELLO = 1
    HAPROXY_DISCONNECT = 2
    NOTIFY = 3
    AGENT_HELLO = 101
    AGENT_DISCONNECT = 102
    ACK = 103


class Scope(IntEnum):
    """Variable scope of set-var / unset-var: proc, sess, txn, req, res."""

    PROCESS = 0
    SESSION = 1
    TRANSACTION = 2
    REQUEST = 3
    RESPONSE = 4


class ActionType(IntEnum):
    SET_VAR = 1
    UNSET_VAR = 2


@dataclass(slots=True)
class Message:
    """One SPOE message of a NOTIFY: its name and its arguments by name.

    Unnamed arguments arrive with the name "" (name every `args` entry in the SPOE config; with
    duplicate names the last one wins). Values follow the table in `codec`.
    """

    name: str
    args: dict[str, Value]


@dataclass(frozen=True, slots=True)
class SetVar:
    scope: Scope
    name: str
    value: Value


@dataclass(frozen=True, slots=True)
class UnsetVar:
    scope: Scope
    name: str


Action: TypeAlias = SetVar | UnsetVar


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded frame body; `payload` is left for the per-type parsers below."""

    type: int
    flags: int
    stream_id: int
    frame_id: int
    payload: bytes

    @property
    def fin(self) -> bool:
        return bool(self.flags & FLAG_FIN)


# --------------------------------------------------------------------------- frame envelope


def encode_frame(frame_type: int, stream_id: int, frame_id: int, payload: bytes,
                 flags: int = FLAG_FIN) -> bytes:
    """A complete frame, length prefix included."""
    body = (bytes((frame_type,)) + flags.to_bytes(4, "big") + encode_varint(stream_id)
            + encode_varint(frame_id) + payload)
    return _LENGTH.pack(len(body)) + body


def decode_metadata(buf: bytes, pos: int, end: int) -> tuple[int, int, int, int, int]:
    """(type, flags, stream_id, frame_id, payload position) of the frame body in buf[pos:end]."""
    if end - pos < _METADATA_MIN:
        raise ProtocolError(Status.INVALID, f"frame of {end - pos} bytes is shorter than its metadata")
    frame_type = buf[pos]
    flags = (buf[pos + 1] << 24) | (buf[pos + 2] << 16) | (buf[pos + 3] << 8) | buf[pos + 4]
    pos += 5
    stream_id = buf[pos]
    if stream_id < 240:
        pos += 1
    else:
        stream_id, pos = decode_varint(buf, pos, end)
    if pos >= end:
        raise ProtocolError(Status.INVALID, "truncated frame-id")
    frame_id = buf[pos]
    if frame_id < 240:
        pos += 1
    else:
        frame_id, pos = decode_varint(buf, pos, end)
    return frame_type, flags, stream_id, frame_id, pos


def decode_frame(body: bytes) -> Frame:
    """A frame body (without its 4-byte length prefix)."""
    frame_type, flags, stream_id, frame_id, pos = decode_metadata(body, 0, len(body))
    return Frame(frame_type, flags, stream_id, frame_id, body[pos:])


def split_frames(data: bytes, max_frame_size: int = MAX_FRAME_SIZE_LIMIT) -> tuple[list[bytes], bytes]:
    """Cut a byte stream into frame bodies; return (bodies, incomplete rest). For clients/tests."""
    bodies = []
    pos, size = 0, len(data)
    while size - pos >= 4:
        length = _LENGTH.unpack_from(data, pos)[0]
        if length > max_frame_size:
            raise ProtocolError(Status.TOO_BIG, f"frame of {length} bytes exceeds {max_frame_size}")
        if size - pos - 4 < length:
            break
        bodies.append(data[pos + 4 : pos + 4 + length])
        pos += 4 + length
    return bodies, data[pos:]


# --------------------------------------------------------------------------- KV lists


def encode_kv_list(items: Mapping[str, Value] | Iterable[tuple[str, Value]]) -> bytes:
    pairs = items.items() if isinstance(items, Mapping) else items
    return b"".join(encode_name(k) + encode_data(v) for k, v in pairs)


def decode_kv_list(buf: bytes, pos: int = 0, end: int | None = None) -> dict[str, Value]:
    end = len(buf) if end is None else end
    out: dict[str, Value] = {}
    while pos < end:
        key, pos = decode_name(buf, pos, end)
        out[key], pos = decode_data(buf, pos, end)
    return out


# --------------------------------------------------------------------------- messages


def encode_message(name: str, args: Mapping[str, Value] | Iterable[tuple[str, Value]]) -> bytes:
    pairs = list(args.items() if isinstance(args, Mapping) else args)
    if len(pairs) > 255:
        raise ValueError(f"a message carries at most 255 arguments, got {len(pairs)}")
    return encode_name(name) + bytes((len(pairs),)) + encode_kv_list(pairs)


def decode_messages(buf: bytes, pos: int = 0, end: int | None = None) -> list[Message]:
    """LIST-OF-MESSAGES in buf[pos:end]. The per-request hot path: names, STRING, NULL, BOOL and
    IPV4 are decoded inline; anything else (and any name that is not valid UTF-8) goes through
    the generic decoders, with the same results."""
    end = len(buf) if end is None else end
    messages: list[Message] = []
    while pos < end:
        n = buf[pos]
        stop = pos + 1 + n
        if n < 240 and stop < end:
            try:
                name = buf[pos + 1 : stop].decode()
            except UnicodeDecodeError:
                name = buf[pos + 1 : stop].decode("utf-8", "surrogateescape")
            pos = stop
        else:
            name, pos = decode_name(buf, pos, end)
            if pos >= end:
                raise ProtocolError(Status.INVALID, f"message {name!r} has no argument count")
        nargs = buf[pos]
        pos += 1
        args: dict[str, Value] = {}
        for _ in range(nargs):
            # arg name: a short length-prefixed buffer, followed by at least the value's type byte
            if pos >= end:
                raise ProtocolError(Status.INVALID, f"message {name!r}: truncated argument")
            n = buf[pos]
            stop = pos + 1 + n
            if n < 240 and stop < end:
                try:
                    key = buf[pos + 1 : stop].decode()
                except UnicodeDecodeError:
                    key = buf[pos + 1 : stop].decode("utf-8", "surrogateescape")
                pos = stop
            else:
                key, pos = decode_name(buf, pos, end)
                if pos >= end:
                    raise ProtocolError(Status.INVALID, f"message {name!r}: argument {key!r} has no value")
            tag = buf[pos]
            if tag == 8:  # STRING
                n = buf[pos + 1] if pos + 1 < end else 255
                stop = pos + 2 + n
                if n < 240 and stop <= end:
                    args[key] = buf[pos + 2 : stop]
                    pos = stop
                    continue
            elif tag == 0:  # NULL: a missing sample
                args[key] = None
                pos += 1
                continue
            elif tag == 6:  # IPV4: the client's address
                stop = pos + 5
                if stop <= end:
                    args[key] = _ipv4(buf[pos + 1 : stop])
                    pos = stop
                    continue
            elif tag == 1 or tag == 0x11:  # BOOL false / true
                args[key] = tag == 0x11
                pos += 1
                continue
            args[key], pos = decode_data(buf, pos, end)
        messages.append(Message(name, args))
    return messages


_new_ipv4 = IPv4Address.__new__
_int_from_bytes = int.from_bytes


def _ipv4(packed: bytes) -> IPv4Address:
    """`IPv4Address(packed)` at half the cost: the 4 bytes are known to be there, so the checks of
    the constructor are skipped (`_ip` is the address as an int, as the constructor stores it)."""
    address = _new_ipv4(IPv4Address)
    address._ip = _int_from_bytes(packed, "big")  # type: ignore[attr-defined]
    return address


# --------------------------------------------------------------------------- actions


def encode_set_var(scope: Scope, name: str, value: Value) -> bytes:
    """One set-var action. Pre-encode once; concatenate actions to form an ACK payload."""
    return bytes((ActionType.SET_VAR, 3, Scope(scope))) + encode_name(name) + encode_data(value)


def encode_unset_var(scope: Scope, name: str) -> bytes:
    return bytes((ActionType.UNSET_VAR, 2, Scope(scope))) + encode_name(name)


def decode_actions(buf: bytes, pos: int = 0, end: int | None = None) -> list[Action]:
    end = len(buf) if end is None else end
    actions: list[Action] = []
    while pos < end:
        if end - pos < 3:
            raise ProtocolError(Status.INVALID, "truncated action")
        kind, nargs, raw_scope = buf[pos], buf[pos + 1], buf[pos + 2]
        pos += 3
        if raw_scope > Scope.RESPONSE:
            raise ProtocolError(Status.INVALID, f"unknown variable scope {raw_scope}")
        scope = Scope(raw_scope)
        if kind == ActionType.SET_VAR and nargs == 3:
            name, pos = decode_name(buf, pos, end)
            value, pos = decode_data(buf, pos, end)
            actions.append(SetVar(scope, name, value))
        elif kind == ActionType.UNSET_VAR and nargs == 2:
            name, pos = decode_name(buf, pos, end)
            actions.append(UnsetVar(scope, name))
        else:
            raise ProtocolError(Status.INVALID, f"unknown action type {kind} with {nargs} arguments")
    return actions


# --------------------------------------------------------------------------- frame builders


def encode_haproxy_hello(supported_versions: str = "2.0", max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                         capabilities: str = "pipelining", healthcheck: bool | None = None,
                         engine_id: str | None = None) -> bytes:
    """HAPROXY-HELLO as HAProxy builds it (for tests, benches and test clients)."""
    payload = (encode_name("supported-versions") + encode_string(supported_versions)
               + encode_name("max-frame-size") + encode_uint32(max_frame_size)
               + encode_name("capabilities") + encode_string(capabilities))
    if healthcheck is not None:
        payload += encode_kv_list({"healthcheck": healthcheck})
    if engine_id is not None:
        payload += encode_kv_list({"engine-id": engine_id})
    return encode_frame(FrameType.HAPROXY_HELLO, 0, 0, payload)


def encode_agent_hello(version: str, max_frame_size: int, capabilities: str) -> bytes:
    payload = (encode_name("version") + encode_string(version)
               + encode_name("max-frame-size") + encode_uint32(max_frame_size)
               + encode_name("capabilities") + encode_string(capabilities))
    return encode_frame(FrameType.AGENT_HELLO, 0, 0, payload)


def _disconnect_payload(status: int, message: str) -> bytes:
    return (encode_name("status-code") + encode_uint32(status)
            + encode_name("message") + encode_string(message))


def decode_disconnect(buf: bytes, pos: int = 0, end: int | None = None) -> tuple[int, str]:
    """(status-code, message) of a DISCONNECT payload, from either side; a missing or mistyped field
    reads as UNKNOWN / "" (a peer saying goodbye badly is still saying goodbye)."""
    kv = decode_kv_list(buf, pos, end)
    status = kv.get("status-code")
    message = kv.get("message")
    return (status if type(status) is int else int(Status.UNKNOWN),
            message.decode("utf-8", "replace") if isinstance(message, bytes) else "")


def encode_agent_disconnect(status: int, message: str) -> bytes:
    return encode_frame(FrameType.AGENT_DISCONNECT, 0, 0, _disconnect_payload(status, message))


def encode_haproxy_disconnect(status: int, message: str) -> bytes:
    return encode_frame(FrameType.HAPROXY_DISCONNECT, 0, 0, _disconnect_payload(status, message))


def encode_notify(stream_id: int, frame_id: int, messages: bytes) -> bytes:
    """NOTIFY around a LIST-OF-MESSAGES payload (concatenated `encode_message` results)."""
    return encode_frame(FrameType.NOTIFY, stream_id, frame_id, messages)


_SMALL = tuple(bytes((i,)) for i in range(240))
_ACK_HEAD = bytes((FrameType.ACK,)) + FLAG_FIN.to_bytes(4, "big")
_pack_length = _LENGTH.pack


def encode_ack(stream_id: int, frame_id: int, actions: bytes) -> bytes:
    """ACK with the NOTIFY's ids around a pre-encoded actions payload. Per request: kept lean."""
    ids = ((_SMALL[stream_id] if 0 <= stream_id < 240 else encode_varint(stream_id))
           + (_SMALL[frame_id] if 0 <= frame_id < 240 else encode_varint(frame_id)))
    return _pack_length(5 + len(ids) + len(actions)) + _ACK_HEAD + ids + actions
