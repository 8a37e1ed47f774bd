"""How HAProxy places first visits by load (BALANCE): leastconn against random(2), uneven request costs.

Not a test: prints figures (docs/performance.md, "Placing first visits"). Everything on loopback.

The set-up an operator has: `haproxy-swarm run` with the shipped config and the default chain
(`cookie:SWARMID`), three tasks behind dnsmasq, every user from one address (as behind Swarm's
routing mesh). The tasks answer after a random service time (exponential, mean COST ms), and task 1
is a slower one (SLOW x the mean: a busy node). Users arrive at random (Poisson, RATE new users per
second); each makes REQUESTS requests with its cookie, THINK ms apart. Half-way, a fourth task joins
(a scale-up): how many of the newcomers of the next seconds it takes shows whether it gets a burst.

Printed per BALANCE: users placed on each task, requests and their p50/p99 latency, and the share
of new users the new task took in the first 5 s after it came UP (1/4 is an even share).

    .venv/bin/python bench/placement.py [--seconds 20] [--runs 2]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spoa.local.stack import Stack

COST_MS = 8.0
SLOW = 3.0
RATE = 20.0
REQUESTS = 20
THINK_MS = 100.0


class SlowTask:
    """One task: an HTTP/1.1 server whose every answer takes an exponential service time."""

    def __init__(self, ip: str, port: int, mean_ms: float) -> None:
        self.ip, self.port, self.mean = ip, port, mean_ms / 1000
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.ip, self.port, reuse_address=True)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for handler in self.handlers:
            handler.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        assert me is not None
        self.handlers.add(me)
        me.add_done_callback(self.handlers.discard)
        body = f"{self.ip}:{self.port}\n".encode()
        head = (f"HTTP/1.1 200 OK\r\nX-Served-By: {self.ip}:{self.port}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        try:
            while True:
                request = await reader.readuntil(b"\r\n\r\n")
                if not request:
                    break
                await asyncio.sleep(random.expovariate(1 / self.mean))
                writer.write(head + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


async def user(port: int, latencies: list[float], placed: dict[int, str], uid: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    cookie = ""
    try:
        for _ in range(REQUESTS):
            t0 = time.perf_counter()
            writer.write(f"GET / HTTP/1.1\r\nHost: bench\r\n{cookie}\r\n".encode())
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            fields = {k.lower(): v for k, _, v in (line.partition(": ") for line in head.split("\r\n")[1:])}
            await reader.readexactly(int(fields["content-length"]))
            latencies.append(time.perf_counter() - t0)
            if "set-cookie" in fields:
                cookie = f"Cookie: {fields['set-cookie'].split(';', 1)[0]}\r\n"
                placed[uid] = fields["x-served-by"]
            await asyncio.sleep(random.expovariate(1000 / THINK_MS))
    finally:
        writer.close()


async def one_run(balance: str, seconds: float) -> dict[str, object]:
    stack = Stack(n_slots=4, env={"STICKY_KEY": "cookie:SWARMID", "BALANCE": balance, "LOG_LEVEL": "warning"})
    try:
        tasks = [SlowTask(t.ip, t.port, COST_MS * (SLOW if i == 0 else 1.0)) for i, t in enumerate(stack.tasks)]
        for t in tasks:
            await t.start()
        stack.start([0, 1, 2], wait=False, start_backends=False)
        await asyncio.to_thread(stack.wait_up, [0, 1, 2])
        latencies: list[float] = []
        placed: dict[int, str] = {}
        arrivals: dict[int, float] = {}
        running: list[asyncio.Task[None]] = []
        start = time.monotonic()
        scaled_at: float | None = None
        uid = 0
        while time.monotonic() - start < seconds:
            if scaled_at is None and time.monotonic() - start > seconds / 2:
                stack.scale([0, 1, 2, 3], wait=False, start_backends=False)
                await asyncio.to_thread(stack.wait_up, [0, 1, 2, 3])
                scaled_at = time.monotonic()
            arrivals[uid] = time.monotonic()
            running.append(asyncio.create_task(user(stack.traffic_port, latencies, placed, uid)))
            uid += 1
            await asyncio.sleep(random.expovariate(RATE))
        await asyncio.gather(*running)
        for t in tasks:
            await t.stop()
        new_task = stack.tasks[3].address
        after = [u for u, t in arrivals.items() if scaled_at is not None and scaled_at <= t < scaled_at + 5]
        quantiles = statistics.quantiles(latencies, n=100)
        return {
            "users": Counter(placed.values()),
            "names": {t.address: t.name for t in stack.tasks},
            "p50": quantiles[49] * 1000, "p99": quantiles[98] * 1000,
            "new_share": sum(placed.get(u) == new_task for u in after) / max(1, len(after)),
            "newcomers": len(after),
        }
    finally:
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--balance", default="leastconn,random(2)")
    args = parser.parse_args()
    print(f"tasks: mean service time {COST_MS} ms (task-1: x{SLOW}); {RATE} new users/s, {REQUESTS} requests "
          f"each, think {THINK_MS} ms; task-4 joins half-way")
    for run in range(args.runs):
        for balance in args.balance.split(","):
            r = asyncio.run(one_run(balance, args.seconds))
            names: dict[str, str] = r["names"]  # type: ignore[assignment]
            users: Counter[str] = r["users"]  # type: ignore[assignment]
            spread = ", ".join(f"{names[a]} {n}" for a, n in sorted(users.items(), key=lambda kv: names[kv[0]]))
            print(f"run {run + 1} {balance:<10} users: {spread}; p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms; "
                  f"task-4 took {r['new_share']:.0%} of the {r['newcomers']} newcomers of its first 5 s")


if __name__ == "__main__":
    main()
