"""SPOP wire encoding of the smallest pieces: varints, names and typed data.

Owns: the byte layout of doc/SPOE.txt section 3.1 (HAProxy's "peers" varint, the ten data
types) and how each maps to a Python value. Every decoder takes `(buf, pos, end)`, reads nothing at
or past `end`, and raises `ProtocolError` (never IndexError, struct.error, UnicodeDecodeError ...)
on bytes that do not fit. Must not: know about frames, connections or I/O.

Decoded values (`Value`), chosen to be cheap on the per-request path:

| SPOP type                | Python value                                                    |
|--------------------------|-----------------------------------------------------------------|
| NULL                     | `None` (HAProxy sends a missing sample as NULL)                 |
| BOOL                     | `bool`                                                          |
| INT32/INT64              | `int` (two's complement over 64 bits, as HAProxy casts)         |
| UINT32/UINT64            | `int`                                                           |
| IPV4 / IPV6              | `ipaddress.IPv4Address` / `ipaddress.IPv6Address`               |
| STRING                   | `bytes`, undecoded: it may hold any client bytes; keys hash as bytes |
| BINARY                   | `Binary` (a `bytes` subclass, so it can be told from a STRING)  |

Names (message names, argument names, KV names, variable names) are decoded as UTF-8 with
`surrogateescape`, so any byte sequence gives a `str` and never raises.
"""

from __future__ import annotations

from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address
from typing import TypeAlias

from spoa.protocol.errors import ProtocolError, Status

MAX_VARINT = (1 << 64) - 1
_MAX_VARINT_BYTES = 10  # 4 bits + 9 x 7 bits ≥ 64 bits


class DataType(IntEnum):
    NULL = 0
    BOOL = 1
    INT32 = 2
    UINT32 = 3
    INT64 = 4
    UINT64 = 5
    IPV4 = 6
    IPV6 = 7
    STRING = 8
    BINARY = 9


_BOOL_TRUE_FLAG = 0x10  # first bit of the FLAGS nibble


class Binary(bytes):
    """A BINARY datum. Plain `bytes` encode and decode as STRING."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Binary({bytes(self)!r})"


Value: TypeAlias = bool | int | bytes | str | IPv4Address | IPv6Address | None
"""What `encode_data` accepts; decoding yields the same minus `str` (STRING decodes to bytes)."""


# --------------------------------------------------------------------------- varint

_SMALL_VARINTS: tuple[bytes, ...] = tuple(bytes((i,)) for i in range(240))


def encode_varint(value: int) -> bytes:
    """HAProxy's varint: < 240 in one byte, else 240|low nibble then 7-bit groups (MSB = more)."""
    if 0 <= value < 240:
        return _SMALL_VARINTS[value]
    if not 0 <= value <= MAX_VARINT:
        raise ValueError(f"varint out of range [0, 2**64): {value}")
    out = bytearray(((value & 0xFF) | 240,))
    value = (value - 240) >> 4
    while value >= 128:
        out.append((value & 0xFF) | 128)
        value = (value - 128) >> 7
    out.append(value)
    return bytes(out)


def decode_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """Decode one varint at `pos`; return (value, position after it)."""
    if pos >= end:
        raise ProtocolError(Status.INVALID, "truncated varint")
    value = buf[pos]
    pos += 1
    if value < 240:
        return value, pos
    shift = 4
    limit = pos + _MAX_VARINT_BYTES - 1
    while True:
        if pos >= end:
            raise ProtocolError(Status.INVALID, "truncated varint")
        if pos >= limit:
            raise ProtocolError(Status.INVALID, "varint longer than 10 bytes")
        byte = buf[pos]
        pos += 1
        value += byte << shift
        if byte < 128:
            break
        shift += 7
    if value > MAX_VARINT:
        raise ProtocolError(Status.INVALID, "varint larger than 64 bits")
    return value, pos


# --------------------------------------------------------------------------- names (raw buffers)


def encode_bytes(data: bytes) -> bytes:
    """A length-prefixed buffer: how names and STRING/BINARY payloads are laid out."""
    return encode_varint(len(data)) + data


def encode_name(name: str) -> bytes:
    return encode_bytes(name.encode("utf-8", "surrogateescape"))


def decode_bytes(buf: bytes, pos: int, end: int) -> tuple[bytes, int]:
    """A length-prefixed buffer; its length must stay within `end`."""
    if pos >= end:
        raise ProtocolError(Status.INVALID, "truncated length")
    n = buf[pos]
    if n < 240:
        pos += 1
    else:
        n, pos = decode_varint(buf, pos, end)
    stop = pos + n
    if stop > end:
        raise ProtocolError(Status.INVALID, f"length {n} runs past the end of the frame")
    return buf[pos:stop], stop


def decode_name(buf: bytes, pos: int, end: int) -> tuple[str, int]:
    raw, pos = decode_bytes(buf, pos, end)
    return raw.decode("utf-8", "surrogateescape"), pos


# --------------------------------------------------------------------------- typed data

_NULL = b"\x00"
_FALSE = b"\x01"
_TRUE = bytes((DataType.BOOL | _BOOL_TRUE_FLAG,))
_INT32 = b"\x02"
_UINT32 = b"\x03"
_INT64 = b"\x04"
_UINT64 = b"\x05"
_IPV4 = b"\x06"
_IPV6 = b"\x07"
_STRING = b"\x08"
_BINARY = b"\x09"
_U64 = 1 << 64


def encode_null() -> bytes:
    return _NULL


def encode_bool(value: bool) -> bytes:
    return _TRUE if value else _FALSE


def _check_range(value: int, lo: int, hi: int, kind: str) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"{kind} out of range [{lo}, {hi}]: {value}")


def encode_int32(value: int) -> bytes:
    _check_range(value, -(1 << 31), (1 << 31) - 1, "INT32")
    return _INT32 + encode_varint(value % _U64)


def encode_uint32(value: int) -> bytes:
    _check_range(value, 0, (1 << 32) - 1, "UINT32")
    return _UINT32 + encode_varint(value)


def encode_int64(value: int) -> bytes:
    _check_range(value, -(1 << 63), (1 << 63) - 1, "INT64")
    return _INT64 + encode_varint(value % _U64)


def encode_uint64(value: int) -> bytes:
    _check_range(value, 0, MAX_VARINT, "UINT64")
    return _UINT64 + encode_varint(value)


def encode_ipv4(value: IPv4Address) -> bytes:
    return _IPV4 + value.packed


def encode_ipv6(value: IPv6Address) -> bytes:
    return _IPV6 + value.packed


def encode_string(value: str | bytes) -> bytes:
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
    return _STRING + encode_varint(len(raw)) + raw


def encode_binary(value: bytes) -> bytes:
    return _BINARY + encode_varint(len(value)) + bytes(value)


def encode_data(value: Value) -> bytes:
    """Typed data for a Python value: None→NULL, bool→BOOL, int→INT64 (UINT64 when ≥ 2**63),
    str/bytes→STRING, Binary→BINARY, IPv4Address→IPV4, IPv6Address→IPV6."""
    if value is None:
        return _NULL
    if isinstance(value, bool):
        return _TRUE if value else _FALSE
    if isinstance(value, int):
        return encode_int64(value) if value < (1 << 63) else encode_uint64(value)
    if isinstance(value, Binary):
        return encode_binary(value)
    if isinstance(value, (bytes, str)):
        return encode_string(value)
    if isinstance(value, IPv4Address):
        return encode_ipv4(value)
    if isinstance(value, IPv6Address):
        return encode_ipv6(value)
    raise TypeError(f"no SPOP data type for {type(value).__name__}")


def _signed(value: int) -> int:
    return value - _U64 if value >= (1 << 63) else value


def decode_data(buf: bytes, pos: int, end: int) -> tuple[Value, int]:
    """Decode one typed datum at `pos`; return (value, position after it). See the module table."""
    if pos >= end:
        raise ProtocolError(Status.INVALID, "truncated typed data")
    tag = buf[pos]
    kind = tag & 0x0F
    pos += 1
    if kind == 8:  # STRING, the common case
        return decode_bytes(buf, pos, end)
    if kind == 0:
        return None, pos
    if kind == 1:
        return bool(tag & _BOOL_TRUE_FLAG), pos
    if kind <= 5:
        value, pos = decode_varint(buf, pos, end)
        return (_signed(value) if kind in (2, 4) else value), pos
    if kind == 6:
        if pos + 4 > end:
            raise ProtocolError(Status.INVALID, "truncated IPV4")
        return IPv4Address(buf[pos : pos + 4]), pos + 4
    if kind == 7:
        if pos + 16 > end:
            raise ProtocolError(Status.INVALID, "truncated IPV6")
        return IPv6Address(buf[pos : pos + 16]), pos + 16
    if kind == 9:
        raw, pos = decode_bytes(buf, pos, end)
        return Binary(raw), pos
    raise ProtocolError(Status.INVALID, f"unknown data type {kind}")
