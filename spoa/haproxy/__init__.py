"""HAProxy servers via the runtime API: the agent writes its members into the service's backend.

Layers, each in its own module:
- `answers`: what the admin socket answers, as typed rows; which answers mean failure (sans-I/O).
- `runtime`: the asyncio client for the admin socket (UNIX path or host:port), sessions, timeouts.
- `reconcile`: desired members + observed servers + `now` → commands (sans-I/O), the health view.
- `writer`: `HAProxyWriter.step(desired, now)`, run every refresh; never raises on socket trouble.
- `errors`: `RuntimeAPIError(command, answer)`, `MalformedAnswer`, `RuntimeAPIUnavailable`.

docs/runtime-api.md lists the commands, their order and what was measured on HAProxy 2.6.
"""

from spoa.haproxy.errors import MalformedAnswer, RuntimeAPIError, RuntimeAPIUnavailable
from spoa.haproxy.reconcile import ActionKind, CheckSettings, Reconciler
from spoa.haproxy.runtime import CommandCounts, CommandObserver, RuntimeAPI
from spoa.haproxy.writer import HAProxyWriter, StepReport

__all__ = [
    "ActionKind",
    "CheckSettings",
    "CommandCounts",
    "CommandObserver",
    "HAProxyWriter",
    "MalformedAnswer",
    "Reconciler",
    "RuntimeAPI",
    "RuntimeAPIError",
    "RuntimeAPIUnavailable",
    "StepReport",
]
