"""The memory planner: activations traced on meta match a measured peak of a real training step
on CPU (within 20 %), and the per-GPU arithmetic of formats, optimizers, sharding and
checkpointing is exact."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from engine import ConfigError, load_backbone
from engine.memory_plan import (
    ActivationTrace,
    TrainingSetup,
    plan_memory,
    trace_activations,
    weight_bytes,
)
from tests.engine.peak_child import BATCH, SEQUENCE, build


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_traced_activations_match_a_measured_training_peak(kind):
    child = subprocess.run([sys.executable, "-m", "tests.engine.peak_child", kind], capture_output=True, text=True,
                           check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}, timeout=300)
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    setup = TrainingSetup(weight_format="fp32", batch=BATCH, sequence=SEQUENCE, attention="eager")
    trace = trace_activations(build(kind, "meta"), setup)
    plan = plan_memory(0, measured["trainable"], trace, setup)
    planned = plan["activations"] + measured["trainable"] * 4  # the gradients appear during the step
    print(f"{kind}: planned {planned / 2**20:.0f} MiB, measured peak {measured['peak_over_baseline'] / 2**20:.0f} MiB")
    assert abs(planned - measured["peak_over_baseline"]) <= 0.2 * measured["peak_over_baseline"]
    assert trace.layers == 4 and trace.hidden == 256 and trace.score_bytes > 0


def test_formats_optimizers_sharding_and_checkpointing_add_up():
    trace = ActivationTrace(kept_bytes=1_000_000, score_bytes=200_000, layers=10, hidden=64)
    base = TrainingSetup(gpu_bytes=10**9, batch=2, sequence=100, weight_format="bf16", attention="eager")
    plan = plan_memory(500_000_000, 1_000, trace, base)
    assert plan["trainable_states"] == 1_000 * 16 and plan["activations"] == 1_000_000
    assert plan["total_per_gpu"] == 500_000_000 + 16_000 + 1_000_000 and plan["fits"]
    assert plan_memory(500_000_000, 1_000, trace, dataclasses.replace(base, attention="flash"))["activations"] == 800_000
    assert plan_memory(0, 1_000, trace, dataclasses.replace(base, optimizer="sgd"))["trainable_states"] == 8_000
    assert plan_memory(0, 1_000, trace, dataclasses.replace(base, optimizer="adamw8bit"))["trainable_states"] == 10_000
    checkpointed = plan_memory(0, 0, trace, dataclasses.replace(base, checkpointing=True))
    assert checkpointed["activations"] == 10 * 2 * 100 * 64 * 2 + 100_000  # layer inputs + one layer
    sharded = plan_memory(800_000_000, 1_000, trace, dataclasses.replace(base, gpus=8, sharding="fsdp"))
    assert sharded["weights"] == 100_000_000 and sharded["gathered_layer"] == 80_000_000
    assert sharded["trainable_states"] == 2_000
    assert not plan_memory(2 * 10**9, 0, trace, base)["fits"]


def test_weight_formats_on_a_405b_shape():
    model = load_backbone("catalog:llama-3.1-405b").model
    sizes = {f: weight_bytes(model, TrainingSetup(weight_format=f)) for f in ("fp32", "bf16", "int8", "nf4")}
    parameters = sum(p.numel() for p in model.parameters())
    assert sizes["fp32"] == 4 * parameters and sizes["bf16"] == 2 * parameters
    assert sizes["nf4"] < sizes["int8"] < sizes["bf16"]
    assert 0.26 < sizes["nf4"] / sizes["bf16"] < 0.30  # half a byte a weight + scales, embeddings in bf16


@pytest.mark.parametrize("field, value, message", [
    ("gpus", 0, "gpus must be an integer from 1 to 4,096"),
    ("weight_format", "fp8", "weight_format must be one of fp32, bf16, int8, nf4"),
    ("sequence", 10**9, "sequence must be an integer from 1 to 16,777,216"),
    ("batch", 4096, "batch × sequence must be at most 16,777,216 tokens"),
    ("optimizer", "adam", "optimizer must be one of adamw, adamw8bit, sgd"),
])
def test_a_bad_setup_is_refused_by_name(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("×", "×")):
        TrainingSetup(**{field: value, "sequence": 8192} if field == "batch" else {field: value})


def test_only_a_weight_free_model_is_traced_and_only_as_long_as_it_reads():
    with pytest.raises(ConfigError, match="traced on the meta device"):
        trace_activations(build("bert", "cpu"), TrainingSetup(batch=1, sequence=8))
    with pytest.raises(ConfigError, match="sequence 4,096 is longer than BertModel reads"):
        trace_activations(build("bert", "meta"), TrainingSetup(batch=1, sequence=4096))
