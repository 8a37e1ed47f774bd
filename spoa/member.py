"""The member: one task of the service, identified by its address (IP and port).

Owns: the canonical form of an address and the names derived from it (ring key, HAProxy server
name). Every HAProxy replica derives the same names from the same address, so they agree without
shared state. Must not: know about DNS, HAProxy sockets or the ring's layout.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, order=True)
class Member:
    ip: str  # canonical text form (ipaddress.ip_address(...).compressed)
    port: int

    @classmethod
    def parse(cls, ip: str, port: int) -> Member:
        """A member from any textual IP; raises ValueError for anything that is not an IP."""
        addr = ipaddress.ip_address(ip)
        if not 0 < port < 65536:
            raise ValueError(f"port out of range: {port}")
        return cls(addr.compressed, port)

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.ip

    @property
    def address(self) -> str:
        """`10.0.1.5:80` or `[fd00::5]:80`: the form HAProxy's `add server` takes."""
        return f"[{self.ip}]:{self.port}" if self.is_ipv6 else f"{self.ip}:{self.port}"

    @property
    def key(self) -> bytes:
        """The ring key: stable across processes, replicas and restarts."""
        return self.address.encode("ascii")

    @property
    def server_name(self) -> str:
        """HAProxy server name: `10.0.1.5_80`, `fd00--5_80` (server names allow [A-Za-z0-9_.:-])."""
        return f"{self.ip.replace(':', '-')}_{self.port}"

    def __str__(self) -> str:
        return self.address
