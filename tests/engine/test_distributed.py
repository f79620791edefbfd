"""The same delta trains under DDP and FSDP2 (torchrun, 2 processes, gloo on CPU): the loss falls,
only delta tensors get gradients, and the saved delta equals a single-process run within 1e-10
(float64: what differs is the order of sums, nothing else)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "train_distributed.py"


def run(mode: str, out: Path) -> dict:
    launcher = [] if mode == "single" else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [sys.executable, *launcher, str(SCRIPT), "--mode", mode, "--out", str(out), "--dtype", "float64"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT, env=environment)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return json.loads((out / "run.json").read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return run("single", out), load_file(out / "delta.safetensors")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_distributed_training_matches_a_single_process(mode, single, tmp_path):
    reference_run, reference = single
    result = run(mode, tmp_path)
    assert result["world"] == 2 and result["only_deltas_have_gradients"]
    losses = result["losses"]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] * 0.97, losses
    torch.testing.assert_close(torch.tensor(result["losses"], dtype=torch.float64),
                               torch.tensor(reference_run["losses"], dtype=torch.float64), rtol=0, atol=1e-10)
    saved = load_file(tmp_path / "delta.safetensors")
    assert saved.keys() == reference.keys() and len(saved) == 2 * 7 * 2
    for key in saved:
        assert saved[key].dtype == torch.float64
        torch.testing.assert_close(saved[key], reference[key], rtol=0, atol=1e-10)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["delta_type"] == "lora" and len(config["resolved_modules"]) == 14
