"""Pause Python's cyclic garbage collector while building thousands of small objects.

Building a model or one delta per layer creates objects fast enough to trigger full collections
that walk every live tensor and module; on a 405B meta backbone those pauses cost more than the
work itself. The collector resumes (and runs as usual later) when the block ends.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
