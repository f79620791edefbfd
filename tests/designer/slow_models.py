"""Backbone factories for the start-up and crash tests: one that waits for the test to release
it, one that fails, one that is tiny and instant (loaded as ``python:tests.designer.slow_models:…``
sources)."""

import threading

from torch import nn

RELEASE = threading.Event()


def waits_for_release() -> nn.Module:
    if not RELEASE.wait(timeout=30):
        raise TimeoutError("the test never released the slow backbone")
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))


def fails() -> nn.Module:
    raise RuntimeError("the checkpoint on disk is truncated")


def tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
