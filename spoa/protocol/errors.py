"""SPOP status codes and the one error type of the protocol layer.

Owns: `Status` (the status codes of doc/SPOE.txt section 3.5, identical on HAProxy 2.6 … 3.4) and
`ProtocolError`. Every malformed, oversized, truncated or out-of-order input raises
`ProtocolError` and nothing else. Must not: log, or know about sockets.
"""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """SPOP status codes, as carried in AGENT-DISCONNECT / HAPROXY-DISCONNECT frames."""

    NORMAL = 0
    IO_ERROR = 1
    TIMEOUT = 2
    TOO_BIG = 3
    INVALID = 4
    NO_VERSION = 5
    NO_FRAME_SIZE = 6
    NO_CAPABILITIES = 7
    BAD_VERSION = 8
    BAD_FRAME_SIZE = 9
    FRAGMENTATION_NOT_SUPPORTED = 10
    INTERLACED_FRAMES = 11
    FRAME_ID_NOT_FOUND = 12
    RESOURCE_ERROR = 13
    UNKNOWN = 99


class ProtocolError(Exception):
    """The peer broke the protocol; the connection must end with AGENT-DISCONNECT(status, message)."""

    __slots__ = ("message", "status")

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return f"SPOP status {int(self.status)} ({self.status.name.lower()}): {self.message}"
