"""Free loopback ports for local runs and tests (the kernel picks; we only ask)."""

from __future__ import annotations

import random
import socket

# Below Linux's ephemeral range (32768-60999 by default), so the kernel's own `bind(0)` and outgoing
# connections never take a port of a block picked here after it was picked.
_BLOCK_RANGE = (20000, 32000)


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port that is free on `host` right now (TCP by default)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def free_tcp_udp_port(host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP on `host` (a DNS server listens on both)."""
    for _ in range(50):
        port = free_port(host)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((host, port))
            return port
        except OSError:
            continue
    raise OSError(f"no port free for both TCP and UDP on {host}")


def free_ports(n: int, host: str = "127.0.0.1") -> int:
    """The first of `n` consecutive TCP ports free on `host` right now (several services listen on
    AGENT_LISTEN's port + 0 .. n-1), chosen below the kernel's ephemeral range."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(200):
        base = random.randrange(_BLOCK_RANGE[0], _BLOCK_RANGE[1] - n)
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                s = socket.socket(family, socket.SOCK_STREAM)
                sockets.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise OSError(f"no {n} consecutive free ports on {host}")
