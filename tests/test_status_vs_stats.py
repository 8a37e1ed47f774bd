"""`haproxy-swarm status` and the stats page agree on every task's state.

Real parts: `haproxy-swarm run` with two services (the shipped haproxy.cfg, real dnsmasq, real
backends), the real `status` command as an operator runs it (a subprocess, text and --json), and the
stats page's CSV export over HTTP on STATS_BIND (what the page shows, row for row). The services are
put in the states an operator meets: tasks UP; a task that died while DNS still lists it (DOWN); a
task listed by DNS whose app does not listen yet (pending: in maintenance until a first check passes).

Both are read back to back, the stats page before and after `status`: a pair is compared only when
the page did not change in between (a health check may land between two reads), and a pair must come
within the deadline. Then every task of every service's backend has the same state and check result
in both, and the same set of tasks (the DNS fallback's `dnsN` slots aside: `status` leaves them out).
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spoa.local.services import Services

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

REPO = Path(__file__).resolve().parent.parent
SERVICES = [("shop", "shop.example.com", ""), ("www", None, "")]
Row = tuple[str, str]  # (state, check result)


@pytest.fixture(scope="module")
def stack() -> Iterator[Services]:
    with Services(SERVICES, n_slots=3) as s:
        shop = s.services["shop"]
        shop.tasks[1].stop()  # dies while DNS lists it: DOWN
        shop.members = [0, 1, 2]  # slot 2 listed, its app not listening: pending
        s._publish_dns()
        yield s


def stats_page(stack: Services) -> dict[tuple[str, str], Row]:
    """(backend, server) -> (status, check status) of every task on the stats page's CSV."""
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.stats_port}/;csv;norefresh", timeout=5) as resp:
        rows = csv.DictReader(io.StringIO(resp.read().decode().lstrip("# ")))
        return {(r["pxname"], r["svname"]): (r["status"], r["check_status"].lstrip("* ")) for r in rows
                if r["pxname"] in ("be_shop", "be_www") and r["svname"] not in ("FRONTEND", "BACKEND")
                and not r["svname"].startswith("dns")}


def status(stack: Services, *extra: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "spoa", "status", "--metrics", f"127.0.0.1:{stack.metrics_port}",
         "--haproxy-socket", stack.socket, *extra],
        cwd=REPO, capture_output=True, text=True, timeout=15, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def agreeing_reads(stack: Services, deadline: float = 30.0) -> tuple[dict[tuple[str, str], Row], dict[str, Any], str]:
    """(the stats page, status --json, status) read while the page did not change, with the three
    states present: UP, DOWN and MAINT."""
    start = time.monotonic()
    last = None
    while time.monotonic() - start < deadline:
        before = stats_page(stack)
        doc = json.loads(status(stack, "--json"))
        text = status(stack)
        after = stats_page(stack)
        states = {state for state, _ in after.values()}
        last = (before, after)
        if before == after and {"UP", "DOWN", "MAINT"} <= states:
            return after, doc, text
        time.sleep(0.2)  # pacing between attempts: the condition is polled, with a deadline
    raise AssertionError(f"the stats page never held still with UP, DOWN and MAINT tasks: {last}")


def test_status_and_the_stats_page_agree_on_every_task(stack: Services) -> None:
    page, doc, text = agreeing_reads(stack)
    assert doc["errors"] == [], doc["errors"]
    told = {(svc["backend"], m["server"]): (m["haproxy"], m["check"])
            for svc in doc["services"] for m in svc["members"] if m["haproxy"] != "absent"}
    assert told == page, f"status says {told}, the stats page {page}"
    # The states are the ones the scenario set up.
    shop = stack.services["shop"].tasks
    name = {i: shop[i].address.replace(":", "_") for i in range(3)}
    assert page[("be_shop", name[0])][0] == "UP"
    assert page[("be_shop", name[1])] == ("DOWN", "L4CON")
    assert page[("be_shop", name[2])] == ("MAINT", "L4CON")
    assert {state for (backend, _), (state, _) in page.items() if backend == "be_www"} == {"UP"}
    # The table an operator reads says the same: each task's row holds its state and check result.
    for (_, server), (state, check) in page.items():
        [row] = [line for line in text.splitlines() if f" {server} " in line]
        assert f" {state} " in row and f" {check} " in row, (row, state, check)
