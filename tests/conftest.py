"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")


def wait_for(condition: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.05) -> T:
    """Poll ``condition`` until it returns something truthy or ``timeout`` passes.

    Tests wait on conditions with a deadline; they never sleep a fixed time to synchronise.
    """
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")


@overload
async def eventually(
    condition: Callable[[], Awaitable[T | None]], timeout: float = ..., interval: float = ...
) -> T: ...


@overload
async def eventually(condition: Callable[[], T | None], timeout: float = ..., interval: float = ...) -> T: ...


async def eventually(condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    """:func:`wait_for` inside an event loop: ``condition`` may be a coroutine function, and the
    loop runs (the clients under test with it) between polls."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        value = condition()
        last = await value if inspect.isawaitable(value) else value
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")
