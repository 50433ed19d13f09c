"""Waiting in tests on a condition outside trio's view (a fake server's state, telemetry, a sink), with a deadline.

`until` checks the condition every ``every`` seconds and fails the test,
naming what it waited for, once ``timeout`` has passed: never a sleep that
hopes the condition came true meanwhile.
"""

from __future__ import annotations

from typing import Callable

import trio


async def until(condition: Callable[[], object], what: str = "", *, timeout: float = 10.0, every: float = 0.02) -> None:
    """Return once ``condition()`` is true; fail the test if it is not within ``timeout`` seconds."""
    try:
        with trio.fail_after(timeout):
            while not condition():
                await trio.sleep(every)
    except trio.TooSlowError:
        raise AssertionError(f"not within {timeout:g}s: {what or getattr(condition, '__name__', 'the condition')}") from None
