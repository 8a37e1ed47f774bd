"""Sticky decisions: sticky key chain → member → the actions of the ACK.

Owns: reading the key chain from a NOTIFY's arguments, the agent-issued sticky cookie (values derived
from the member's address and a secret, so every replica agrees), the choice of a target among the
members HAProxy reports UP, and the pre-encoded ACK actions for each target. Must not: do I/O, log,
or keep per-key state: the ring decides, so memory stays flat whatever the clients send.

Security: whatever the client sends, the answer names a current, UP member or makes no decision.
A cookie value only ever selects through a dict of current members' cookie values; a key is only
ever hashed onto the ring.
"""

from spoa.routing.sticky import SOURCES, Decision, Router, cookie_value

__all__ = ["SOURCES", "Decision", "Router", "cookie_value"]
