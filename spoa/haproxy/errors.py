"""Errors of the HAProxy runtime API, as types.

Owns: the exception classes every layer of `spoa.haproxy` raises and catches. Must not: hold logic.
"""

from __future__ import annotations


class RuntimeAPIError(Exception):
    """HAProxy answered `command`, and the answer means failure.

    HAProxy's CLI reports most failures as plain text (e.g. `No such server.`), so the answer is kept
    verbatim for logs; `spoa.haproxy.answers` decides per command what counts as failure.
    """

    def __init__(self, command: str, answer: str) -> None:
        self.command = command
        self.answer = answer
        super().__init__(f"{command!r} failed: {answer.strip()[:300] or '(empty answer)'}")


class MalformedAnswer(RuntimeAPIError):
    """HAProxy answered `command` with text we cannot parse (wrong socket, unknown version...)."""

    def __init__(self, command: str, answer: str, reason: str) -> None:
        self.reason = reason
        super().__init__(command, answer)
        self.args = (f"{command!r}: unexpected answer ({reason}): {answer.strip()[:200]!r}",)


class RuntimeAPIUnavailable(Exception):
    """The admin socket could not be used: missing, refused, closed mid-answer or timed out.

    Expected while HAProxy restarts; callers report it and try again on the next refresh.
    """

    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(f"HAProxy admin socket {address} unavailable: {reason}")


__all__ = ["MalformedAnswer", "RuntimeAPIError", "RuntimeAPIUnavailable"]
