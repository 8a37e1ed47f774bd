"""Polling with a deadline: how the tests wait for something to become true (never a bare sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(check: Callable[[], bool], what: str, timeout: float = 15.0) -> float:
    """Poll `check` until it is true; return how long that took. Fails naming `what` after `timeout`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        time.sleep(0.02)
    return time.monotonic() - start
