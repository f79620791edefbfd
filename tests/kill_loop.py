"""One round of the crash-safety kill loops (a helper, not collected by pytest)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest


def kill_after_a_write(context: Any, target: Callable[..., None], args: Sequence[Any], done: Any,
                       delay: float) -> int:
    """Start ``target(*args, done)`` in a child of ``context``; once it has counted one more
    completed write in ``done``, let it run ``delay`` seconds, SIGKILL it, and return the count of
    completed writes. A child that never completes a write fails the test. ``done`` must be a
    lock-free shared value (``lock=False``): a child killed while holding a lock would leave it
    held, and the next read here would wait for ever."""
    child = context.Process(target=target, args=(*args, done))
    child.start()
    started, deadline = done.value, time.monotonic() + 120
    while done.value == started:
        if time.monotonic() > deadline or not child.is_alive():
            child.kill()
            pytest.fail(f"the writing process never completed a write (exit code {child.exitcode})")
        time.sleep(0.001)
    time.sleep(delay)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    return done.value
