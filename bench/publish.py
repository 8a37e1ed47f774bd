"""Publishing bench (not a test): how long a full decision table (65,536 slots) takes to replace.

One HAProxy (HAPROXY_BIN, the shipped haproxy.cfg's map lookup alone) and the agent's
`TablePublisher`: RUNS full replacements of the slot map (`prepare map`, `add map @ver` in chunks,
`commit map`, the map file rewritten), alternating between two tables of MEMBERS server names so
every publication changes every slot, on the agent's event loop (uvloop, as `haproxy-swarm` runs
it). Prints each time and the median (the target is 100 ms), the HAProxy worker's CPU per
publication (its parsing and purging: the floor of the time) and the load average before and after
(the machine is shared: look at it before trusting a run).

    .venv/bin/python bench/publish.py
    HAPROXY_BIN=/var/cache/haproxy-swarm/haproxy-3.4/sbin/haproxy .venv/bin/python bench/publish.py --runs 20
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from spoa.agent.loop import new_event_loop, run, uses_uvloop
from spoa.haproxy.process import HAProxyProcess, haproxy_binary
from spoa.haproxy.runtime import RuntimeAPI
from spoa.haproxy.table import DecisionTable, TablePublisher
from spoa.local.ports import free_port
from spoa.ring.hashing import TABLE_SIZE

CONFIG = """
global
    stats socket "${HAPROXY_SOCKET}" mode 600 level admin
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend fe
    bind "127.0.0.1:${PORT}"
    http-request return status 200 content-type text/plain lf-string "%[src,crc32,div(65536),map(${SLOT_MAP})]"
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def publish(socket: str, slot_map: str, runs: int, members: int, pid: int) -> tuple[list[float], list[float]]:
    """(wall seconds, HAProxy CPU seconds) of each publication."""
    publisher = TablePublisher(RuntimeAPI(socket), slot_map, None)
    names = [f"10.0.{i // 250}.{i % 250 + 1}_80" for i in range(members + 1)]
    times = []
    cpus = []
    for i in range(runs):
        shift = i % 2  # every slot changes from one publication to the next
        table = DecisionTable(tuple(names[(slot + shift) % members + shift] for slot in range(TABLE_SIZE)))
        before = cpu_seconds(pid)
        report = await publisher.publish(table)
        if not report.ok:
            raise RuntimeError(report.error)
        times.append(report.seconds)
        cpus.append(cpu_seconds(pid) - before)  # includes the file write's wait: HAProxy idles then
    return times, cpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--members", type=int, default=10)
    args = parser.parse_args()
    run_dir = tempfile.mkdtemp(prefix="haproxy-swarm-publish-")
    try:
        slot_map = os.path.join(run_dir, "slots.map")
        Path(slot_map).touch()
        config = Path(run_dir) / "publish.cfg"
        config.write_text(CONFIG)
        socket = os.path.join(run_dir, "admin.sock")
        h = HAProxyProcess({"RUN_DIR": run_dir, "HAPROXY_SOCKET": socket, "PORT": str(free_port()),
                            "SLOT_MAP": slot_map}, config=str(config))
        h.start()
        load_before = os.getloadavg()[0]
        try:
            times, cpus = run(publish(socket, slot_map, args.runs, args.members, h.worker_pid()))
        finally:
            h.stop()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    loop = "uvloop" if uses_uvloop(new_event_loop()) else "asyncio"
    print(f"HAProxy {haproxy_binary()}: {args.runs} full publications of {TABLE_SIZE} slots, "
          f"{args.members} servers, {loop}; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print("ms: " + ", ".join(f"{t * 1000:.0f}" for t in times))
    print(f"median {statistics.median(times) * 1000:.0f} ms, min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f}; "
          f"HAProxy CPU per publication median {statistics.median(cpus) * 1000:.0f} ms (10 ms ticks)")


if __name__ == "__main__":
    main()
