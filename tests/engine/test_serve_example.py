"""examples/serve_multitask.py runs end to end: saved deltas loaded back, mixed batches answered
exactly as one sub-batch per task would be, and the deltas really change the answers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "serve_multitask.py"


def test_the_serving_example_answers_mixed_batches_like_switching():
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--tasks", "3", "--requests", "12", "--batch", "6", "--length", "8"],
        capture_output=True, text=True, timeout=300, check=True)
    assert "3 tasks, 12 requests of 8 tokens, batches of 6" in result.stdout
    assert re.search(r"mixed batches\s+[\d.]+ requests/s", result.stdout)
    difference, effect = map(float, re.search(
        r"two answers: (\S+) \(the deltas change the answers by up to (\S+)\)", result.stdout).groups())
    assert difference <= 1e-5 and effect > 1e-2
