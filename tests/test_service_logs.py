"""A service's log lines name their service: its discovery's (`spoa.discovery`) and its HAProxy
writer's (`spoa.app`), as a prefix with several services and as JSON fields (spoa.logs.ServiceLog).

The unit part formats records as the agent does; the end-to-end part runs `haproxy-swarm run` with
two services and LOG_FORMAT=json (real HAProxy, dnsmasq, backends), scales one, and reads every line.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from polling import wait_for

from spoa.local.services import Services
from spoa.logs import JSONFormatter, ServiceLog

SERVICES = [("shop", "shop.example.com", ""), ("www", None, "")]


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO, io.StringIO]]:
    logger = logging.getLogger("test.service-logs")
    text, doc = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(text), logging.StreamHandler(doc)]
    handlers[0].setFormatter(logging.Formatter("%(name)s: %(message)s"))
    handlers[1].setFormatter(JSONFormatter())
    logger.handlers[:] = handlers
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, text, doc
    logger.handlers[:] = []


def test_several_services_prefix_the_name_and_add_fields(
        captured: tuple[logging.Logger, io.StringIO, io.StringIO]) -> None:
    logger, text, doc = captured
    ServiceLog(logger, "tasks.shop:8080", "shop").info("DNS %s: %d members", "tasks.shop:8080", 2,
                                                        extra={"members": 2})
    assert text.getvalue() == "test.service-logs: shop: DNS tasks.shop:8080: 2 members\n"
    record = json.loads(doc.getvalue())
    assert record["message"] == "shop: DNS tasks.shop:8080: 2 members"
    assert (record["service"], record["service_name"], record["members"]) == ("tasks.shop:8080", "shop", 2)


def test_the_one_service_of_the_seeds_setup_keeps_its_lines_and_gains_the_field(
        captured: tuple[logging.Logger, io.StringIO, io.StringIO]) -> None:
    logger, text, doc = captured
    ServiceLog(logger, "tasks.backend:80").warning("HAProxy be_app: added 10.0.1.7_80")
    assert text.getvalue() == "test.service-logs: HAProxy be_app: added 10.0.1.7_80\n"
    record = json.loads(doc.getvalue())
    assert record["service"] == "tasks.backend:80" and "service_name" not in record


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_every_discovery_and_writer_line_of_a_running_instance_names_its_service() -> None:
    with Services(SERVICES, n_slots=3, env={"LOG_FORMAT": "json"}) as stack:
        stack.scale_service("shop", [0, 1, 2])
        wait_for(lambda: "added 127.0.10.4" in Path(stack.log_path).read_text(), "the scale-up is logged")
        records = [json.loads(line) for line in Path(stack.log_path).read_text().splitlines()]
    targets = {name: f"tasks.{name}:{stack.backend_port}" for name, _, _ in SERVICES}
    discovery = [r for r in records if r["logger"] == "spoa.discovery"]
    writer = [r for r in records if r["logger"] == "spoa.app" and " HAProxy be_" in r["message"]]
    assert {r["service_name"] for r in discovery} == {r["service_name"] for r in writer} == set(targets)
    for record in discovery + writer:
        name = record["service_name"]
        assert record["message"].startswith(f"{name}: "), record
        assert record["service"] == targets[name], record
    # The writer's lines of a service are about its own backend.
    assert all(f"HAProxy be_{r['service_name']}:" in r["message"] for r in writer), writer
    assert any("added 127.0.10.4" in r["message"] and r["service_name"] == "shop" for r in discovery), discovery
