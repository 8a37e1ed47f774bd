"""The SPOE agent: the asyncio glue between HAProxy's SPOP connections and a decision handler.

Owns: sockets, the event loop, connection limits, deadlines and shutdown (`server`), the handler
contract (`handler`), loop/signal helpers (`loop`). Must not: parse SPOP (that is
`spoa.protocol`) or decide routes (that is `spoa.routing`).
"""

from spoa.agent.handler import Handler, fixed_handler
from spoa.agent.loop import install_signal_handlers, new_event_loop, run, uses_uvloop
from spoa.agent.server import DEFAULT_ERROR_ACTIONS, AgentObserver, AgentServer, serve

__all__ = [
    "DEFAULT_ERROR_ACTIONS",
    "AgentObserver",
    "AgentServer",
    "Handler",
    "fixed_handler",
    "install_signal_handlers",
    "new_event_loop",
    "run",
    "serve",
    "uses_uvloop",
]
