"""A user of the service, for the demo and the tests: its own source IP, its own cookie jar.

Each `User` connects from its own loopback address (127.x.y.z), like distinct clients on the
internet, keeps the sticky cookie it is given and reports which task served each request.
"""

from __future__ import annotations

import http.client
from dataclasses import dataclass, field


@dataclass
class Answer:
    status: int
    served_by: str | None  # the backend's ip:port (X-Served-By), None when no backend answered
    set_cookie: str | None


@dataclass
class User:
    name: str
    source_ip: str = "127.0.0.1"
    headers: dict[str, str] = field(default_factory=dict)
    cookies: dict[str, str] = field(default_factory=dict)
    history: list[str | None] = field(default_factory=list)

    def get(self, host: str, port: int, path: str = "/", timeout: float = 5.0) -> Answer:
        conn = http.client.HTTPConnection(host, port, timeout=timeout, source_address=(self.source_ip, 0))
        try:
            headers = dict(self.headers)
            if self.cookies:
                headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            resp.read()
            set_cookie = resp.getheader("Set-Cookie")
            if set_cookie:
                name, _, rest = set_cookie.partition("=")
                self.cookies[name.strip()] = rest.split(";", 1)[0].strip()
            answer = Answer(resp.status, resp.getheader("X-Served-By"), set_cookie)
        finally:
            conn.close()
        self.history.append(answer.served_by)
        return answer

    @property
    def last(self) -> str | None:
        return self.history[-1] if self.history else None


def users(n: int, prefix: str = "user", network: str = "127.1") -> list[User]:
    """`n` users, each from its own address in 127.1.0.0/16 (any 127/8 address is loopback)."""
    return [User(f"{prefix}-{i}", f"{network}.{i // 250}.{i % 250 + 1}") for i in range(n)]
