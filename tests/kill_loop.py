"""Kill a writing process at random moments, for the crash-safety tests of checkpoints and
autosaves (not collected by pytest: a helper)."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest


def killed_writers(target: Callable[..., None], args: Sequence[Any], preload: list[str], times: int,
                   max_delay: float, seed: int = 0) -> Iterator[int]:
    """Run ``target(*args, done)`` in a fresh child ``times`` times; each child counts its
    completed writes in ``done``. Once it has completed one, let it run up to ``max_delay``
    seconds more, SIGKILL it, and yield the last completed count.

    Children fork from a forkserver that preloaded ``preload``: cheap to start, and safe, since
    forking a multi-threaded test process can deadlock the child.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(preload)
    done = context.Value("q", 0)
    rng = random.Random(seed)
    for _ in range(times):
        child = context.Process(target=target, args=(*args, done))
        child.start()
        started, deadline = done.value, time.monotonic() + 120
        while done.value == started:
            if time.monotonic() > deadline or not child.is_alive():
                child.kill()
                pytest.fail(f"the writing process never completed a write (exit code {child.exitcode})")
            time.sleep(0.001)
        time.sleep(rng.uniform(0, max_delay))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        yield done.value
