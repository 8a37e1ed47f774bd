"""Test selection by the HAProxy under test (HAPROXY_BIN): tests marked `acme` need HAProxy's ACME
client (3.4 has it, 2.6 has not). On a HAProxy without it they are deselected, not skipped: pytest
reports them as deselected, and tests/test_acme.py proves 2.6's clear start-up error instead."""

from __future__ import annotations

import pytest

from spoa.acme import has_acme_client
from spoa.haproxy.process import haproxy_binary


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any(item.get_closest_marker("acme") for item in items):
        return
    capable, version = has_acme_client(haproxy_binary())
    if capable:
        return
    deselected = [item for item in items if item.get_closest_marker("acme")]
    items[:] = [item for item in items if not item.get_closest_marker("acme")]
    config.hook.pytest_deselected(items=deselected)
    print(f"\nHAProxy {version} has no ACME client: {len(deselected)} ACME tests deselected")
