"""The contract between the agent server and whoever decides: the `Handler`.

Owns: the handler type and the simplest handler, `fixed_handler`. Must not: do I/O or block; a
handler runs on the event loop for every NOTIFY (every HTTP request).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

from spoa.protocol import Message, Scope, encode_set_var

Handler: TypeAlias = Callable[[list[Message]], bytes]
"""`handler(messages) -> actions`: the messages of one NOTIFY in, a non-empty pre-encoded actions
payload out (concatenated `encode_set_var` / `encode_unset_var` results; HAProxy wants at least one
action). Synchronous, called on the event loop thread; it must not block. If it raises or returns
an empty or oversized payload, the server answers with its `error_actions` instead."""


def fixed_handler(target: str, *, name: str = "server", scope: Scope = Scope.TRANSACTION) -> Handler:
    """A handler that answers every NOTIFY with `set-var(<scope>.<prefix>.<name>) = target`.

    The payload is encoded once, here; the handler only returns it.
    """
    actions = encode_set_var(scope, name, target)

    def handle(messages: list[Message]) -> bytes:
        return actions

    return handle
