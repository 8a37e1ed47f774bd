"""haproxy-swarm: sticky, reload-free HAProxy routing to the members of a DNS-discovered service.

Layers, along the request path: protocol (SPOP, sans-I/O) → agent (asyncio server) → routing
(sticky key → decision) → ring (consistent hash) ← discovery (DNS → members), plus haproxy (runtime
API), metrics, config and cli.
"""

__version__ = "0.1.0"
