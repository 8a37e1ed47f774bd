"""Polling with a deadline: how the tests wait for something to become true (never a bare sleep)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable


def wait_for(check: Callable[[], bool], what: str, timeout: float = 15.0, interval: float = 0.02) -> float:
    """Poll `check` until it is true; return how long that took. Fails naming `what` after `timeout`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        time.sleep(interval)
    return time.monotonic() - start


async def poll(check: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = 15.0,
               interval: float = 0.01) -> float:
    """`wait_for` on the event loop: `check` may be a plain or an async predicate."""
    start = time.monotonic()
    while True:
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(interval)
