"""Sticky users for the Swarm test, run inside a client container on the stack's overlay network.

Owns: a crowd of users, as many as the users file says (the test adds some after each change), each
its own cookie jar, one request at a time, a fresh connection per request, sending GET / to the
HAProxy replicas of a stack, and one JSON line per request in an output file. The replicas are the
addresses Swarm's DNS gives for `tasks.<haproxy service>` (from a container on the stack's network),
or those a file lists (`--replicas-file`: each node's published port, run on the machine itself),
read again every half second; a user
alternates between them request by request, so two replicas each answer every user. A connection
that is refused (a replica stopping, still in DNS) is retried at once on another replica, as a load
balancer in front would; the record says so (`retried_from`). Must not: hide a failure (anything but
a 200 with an X-Served-By is failed, including timeouts) or run unbounded (it stops when the stop
file appears or after --duration seconds).

Standard library only: it runs under the project image's python3, mounted read-only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import threading
import time

# A user waits this long for an answer (a browser waits longer): a slow answer is told apart from none.
TIMEOUT = 15.0


class Replicas:
    """The HAProxy task addresses, from Swarm's DNS (tasks.<service>)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.addresses: list[str] = []
        self.lock = threading.Lock()

    def refresh(self) -> None:
        try:
            infos = socket.getaddrinfo(self.name, None, socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            return  # keep the last answer
        addresses = sorted({str(info[4][0]) for info in infos})
        if addresses:
            with self.lock:
                self.addresses = addresses

    def pick(self, n: int, avoid: str | None = None) -> str | None:
        with self.lock:
            choices = [a for a in self.addresses if a != avoid] or list(self.addresses)
        return choices[n % len(choices)] if choices else None


class ReplicasFile(Replicas):
    """The HAProxy replicas' addresses from a file, one a line (the test rewrites it as nodes go
    and come back, as a load balancer's health check in front would)."""

    def refresh(self) -> None:
        try:
            with open(self.name, encoding="utf-8") as f:
                addresses = sorted({line.strip() for line in f if line.strip()})
        except OSError:
            return  # keep the last answer
        if addresses:
            with self.lock:
                self.addresses = addresses


class Writer:
    def __init__(self, path: str) -> None:
        self.file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed at exit
        self.lock = threading.Lock()

    def write(self, record: dict[str, object]) -> None:
        line = json.dumps(record, separators=(",", ":"))
        with self.lock:
            self.file.write(line + "\n")


def get(address: str, port: int, cookies: dict[str, str], timeout: float) -> dict[str, object]:
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        headers = {"Connection": "close"}
        if cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        conn.request("GET", "/", headers=headers)
        resp = conn.getresponse()
        resp.read()
        set_cookie = resp.getheader("Set-Cookie")
        if set_cookie:
            name, _, rest = set_cookie.partition("=")
            cookies[name.strip()] = rest.split(";", 1)[0].strip()
        return {"status": resp.status, "served_by": resp.getheader("X-Served-By"), "cookie_set": bool(set_cookie)}
    finally:
        conn.close()


def user(name: str, replicas: Replicas, port: int, think: float, writer: Writer, stop: threading.Event) -> None:
    cookies: dict[str, str] = {}
    n = 0
    while not stop.is_set():
        n += 1
        address = replicas.pick(n)
        record: dict[str, object] = {"t": time.time(), "user": name, "replica": address, "retried_from": None}
        for attempt in range(2):
            if address is None:
                record.update(status=0, served_by=None, cookie_set=False, error="no replica in DNS")
                break
            try:
                record.update(get(address, port, cookies, timeout=TIMEOUT), error="")
                break
            except ConnectionRefusedError as e:
                if attempt == 0:  # nothing was sent: another replica takes it
                    record["retried_from"] = address
                    address = replicas.pick(n, avoid=address)
                    record["replica"] = address
                    continue
                record.update(status=0, served_by=None, cookie_set=False, error=repr(e))
            except (OSError, http.client.HTTPException) as e:
                record.update(status=0, served_by=None, cookie_set=False, error=repr(e))
                break
        record["latency"] = round(time.time() - float(record["t"]), 4)  # type: ignore[arg-type]
        writer.write(record)
        stop.wait(think)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--replicas-dns", help="tasks.<haproxy service>")
    where.add_argument("--replicas-file", help="a file of replica addresses, one a line")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--users-file", required=True, help="holds how many users there should be")
    parser.add_argument("--max-users", type=int, default=500)
    parser.add_argument("--think", type=float, default=0.5, help="seconds between a user's requests")
    parser.add_argument("--out", required=True)
    parser.add_argument("--stop-file", required=True)
    parser.add_argument("--duration", type=float, default=900.0)
    args = parser.parse_args()

    replicas = Replicas(args.replicas_dns) if args.replicas_dns else ReplicasFile(args.replicas_file)
    writer = Writer(args.out)
    stop = threading.Event()
    deadline = time.monotonic() + args.duration
    while not replicas.addresses and time.monotonic() < deadline:
        replicas.refresh()
        time.sleep(0.2)
    threads: list[threading.Thread] = []

    def start_user() -> None:
        t = threading.Thread(target=user, args=(f"u{len(threads):03d}", replicas, args.port, args.think, writer, stop),
                             daemon=True)
        threads.append(t)
        t.start()

    while not os.path.exists(args.stop_file) and time.monotonic() < deadline:
        replicas.refresh()
        try:
            wanted = min(int(open(args.users_file).read()), args.max_users)  # noqa: SIM115
        except (OSError, ValueError):
            wanted = 0
        while len(threads) < wanted:
            start_user()
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=10)


if __name__ == "__main__":
    main()
