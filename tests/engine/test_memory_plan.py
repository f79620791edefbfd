"""The memory planner against reality: a real training step of small models (hidden 256) in a
child process, its peak resident memory measured, and the plan within 10 % of it — for BERT,
GPT-2, Llama, T5 and an MoE; LoRA, adapters and prefixes; several batch × sequence; gradient
checkpointing on and off; fp32, bf16 and nf4 (bitsandbytes on CPU). Then properties no formula
can fake, and the silent wrong answers of the old planner."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import transformers

from engine import (
    ActivationTrace,
    ConfigError,
    LoraModel,
    TrainingSetup,
    computing_in,
    load_backbone,
    plan_memory,
    trace_activations,
    weight_bytes,
)
from engine.memory_trace import layer_modules
from tests.engine.peak_child import CLASSES, build, config_for

# (arch, method, batch, sequence, checkpointing, format, attention kernel); "sdpa" is planned as
# fused ("flash") attention, "eager" as eager. 18 setups.
GRID = [
    ("bert", "lora", 8, 256, False, "fp32", "eager"),
    ("bert", "adapter", 8, 256, True, "fp32", "eager"),
    ("bert", "lora", 16, 128, False, "bf16", "sdpa"),
    ("bert", "prefix", 4, 256, False, "fp32", "eager"),
    ("gpt2", "lora", 8, 256, False, "fp32", "eager"),
    ("gpt2", "prefix", 4, 512, False, "fp32", "sdpa"),
    ("gpt2", "adapter", 8, 128, True, "bf16", "sdpa"),
    ("llama", "lora", 8, 256, False, "fp32", "eager"),
    ("llama", "lora", 8, 256, True, "bf16", "sdpa"),
    ("llama", "lora", 8, 256, False, "nf4", "sdpa"),
    ("llama", "adapter", 4, 512, True, "nf4", "sdpa"),
    ("llama", "prefix", 8, 256, False, "bf16", "eager"),
    ("t5", "lora", 8, 256, False, "fp32", "eager"),
    ("t5", "adapter", 8, 128, True, "fp32", "eager"),
    ("t5", "lora", 4, 256, False, "bf16", "eager"),
    ("mixtral", "lora", 8, 256, False, "fp32", "eager"),
    ("mixtral", "adapter", 8, 256, True, "bf16", "sdpa"),
    ("mixtral", "lora", 4, 256, False, "nf4", "sdpa"),
]
FIELDS = ("arch", "method", "batch", "sequence", "checkpointing", "format", "attention_kernel")


def planned(setup: dict) -> dict:
    """The planner's answer for a setup: weights from the bare model's shapes, the trace of the
    model with its delta, both on the meta device."""
    with torch.device("meta"):
        bare = getattr(transformers, CLASSES[setup["arch"]])(config_for(setup))
    training = TrainingSetup(weight_format=setup["format"], batch=setup["batch"], sequence=setup["sequence"],
                             checkpointing=setup["checkpointing"],
                             attention="eager" if setup["attention_kernel"] == "eager" else "flash")
    model = build({**setup, "checkpointing": False}, "meta")  # the trace turns checkpointing on itself
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trace = trace_activations(model, training.batch, training.sequence, attention=training.attention,
                              checkpointing=training.checkpointing)
    return plan_memory(weight_bytes(bare, training), trainable, trace, training)


def _measure(row: tuple) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.engine.peak_child", json.dumps(dict(zip(FIELDS, row)))],
                          capture_output=True, text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
                          timeout=600)


@pytest.fixture(scope="module")
def measured(request: pytest.FixtureRequest) -> dict[tuple, subprocess.CompletedProcess]:
    """Every selected setup measured, two child processes at a time (each measures its own
    resident memory, so they do not disturb each other)."""
    rows = [item.callspec.params["row"] for item in request.session.items
            if item.originalname == "test_the_plan_is_within_10_percent_of_a_measured_training_step"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(rows, pool.map(_measure, rows)))


@pytest.mark.parametrize("row", GRID, ids=lambda row: "-".join(map(str, row)))
def test_the_plan_is_within_10_percent_of_a_measured_training_step(row, measured):
    setup = dict(zip(FIELDS, row))
    child = measured[row]
    assert child.returncode == 0, child.stderr[-3000:]
    measured = json.loads(child.stdout.strip().splitlines()[-1])["peak_over_idle"]
    plan = planned(setup)
    ratio = plan["total_per_gpu"] / measured
    print(f"{row}: planned {plan['total_per_gpu'] / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB, "
          f"ratio {ratio:.3f}")
    assert 0.9 <= ratio <= 1.1


def _llama(hidden: int = 256) -> torch.nn.Module:
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=500,
                                      max_position_embeddings=4096)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    LoraModel(model, ["attn.q", "attn.v"], lora_r=8)
    return model


def test_activations_grow_linearly_with_tokens_under_fused_attention():
    model = _llama()
    one, two, four = (trace_activations(model, batch, 256).peak for batch in (1, 2, 4))
    assert abs(two / one - 2) <= 0.1 and abs(four / two - 2) <= 0.05
    assert abs(2 * one - two) <= 0.05 * one  # what does not grow with tokens is ~0
    longer = trace_activations(model, 1, 512).peak
    assert abs(longer / one - 2) <= 0.1


def test_no_jump_where_the_sequence_equals_the_hidden_size():
    """The old planner dropped every tensor whose last two sizes equalled the sequence."""
    model = _llama(hidden=256)
    peaks = [trace_activations(model, 2, sequence).peak for sequence in (254, 255, 256, 257, 258)]
    steps = [b - a for a, b in zip(peaks, peaks[1:])]
    assert all(step > 0 for step in steps)
    assert max(steps) - min(steps) <= 0.02 * max(steps)


def _plan_llama_8b_qlora(sequence: int, checkpointing: bool) -> dict:
    """Llama-3-8B in nf4, LoRA r=16 on q, k, v, o, batch 1, fused attention, a 24 GiB GPU."""
    model = load_backbone("catalog:llama-3-8b").model
    setup = TrainingSetup(gpu_bytes=24 * 2**30, weight_format="nf4", batch=1, sequence=sequence,
                          checkpointing=checkpointing)
    weights = weight_bytes(model, setup)
    with computing_in(model, setup.compute_dtype):
        delta = LoraModel(model, ["attn.q", "attn.k", "attn.v", "attn.o"], lora_r=16)
        try:
            trace = trace_activations(model, 1, sequence, checkpointing=checkpointing)
            return plan_memory(weights, delta.num_trainable_parameters(), trace, setup)
        finally:
            delta.detach()


def test_frozen_weights_are_not_counted_as_activations():
    """The old planner counted autograd's references to the 14 GiB of frozen weights again, as
    activations: 17.0 GiB at 512 tokens, 20.0 at 1,024, 26.1 at 2,048 — a 14 GiB part that did
    not grow with tokens. Now what does not grow with tokens is ~0, and QLoRA as its recipes run
    it (gradient checkpointing on) fits a 24 GiB GPU with room to spare."""
    short, long = (_plan_llama_8b_qlora(sequence, False)["activations"] for sequence in (1024, 2048))
    assert abs(long - 2 * short) <= 0.02 * long
    assert long < 24 * 2**30
    checkpointed = _plan_llama_8b_qlora(2048, True)
    assert checkpointed["fits"] and checkpointed["total_per_gpu"] < 12 * 2**30, checkpointed
    assert 5 * 2**30 < checkpointed["weights"] < 6 * 2**30  # 4-bit weights with their scales, the rest in bf16


def test_encoder_decoder_layers_are_counted_on_both_sides():
    model = load_backbone("catalog:t5-base").model
    assert len(layer_modules(model)) == 24  # 12 encoder + 12 decoder blocks, not the largest list
    sharded = plan_memory(24_000, 0, ActivationTrace(peak=0, after_forward=0, layers=24, hidden=768),
                          TrainingSetup(gpus=4, sharding="fsdp"))
    assert sharded["gathered_layer"] == 1_000


def test_formats_optimizers_and_sharding_add_up():
    trace = ActivationTrace(peak=1_000_000, after_forward=800_000, layers=10, hidden=64)
    base = TrainingSetup(gpu_bytes=10**9, batch=2, sequence=100, weight_format="bf16")
    plan = plan_memory(500_000_000, 1_000, trace, base)
    assert plan["trainable_states"] == 1_000 * 16 and plan["activations"] == 1_000_000
    assert plan["total_per_gpu"] == 500_000_000 + 16_000 + 1_000_000 and plan["fits"]
    assert plan_memory(0, 1_000, trace, dataclasses.replace(base, optimizer="sgd"))["trainable_states"] == 8_000
    assert plan_memory(0, 1_000, trace, dataclasses.replace(base, optimizer="adamw8bit"))["trainable_states"] == 10_000
    sharded = plan_memory(800_000_000, 1_000, trace, dataclasses.replace(base, gpus=8, sharding="fsdp"))
    assert sharded["weights"] == 100_000_000 and sharded["gathered_layer"] == 80_000_000
    assert sharded["trainable_states"] == 2_000  # optimizer states are sharded too
    assert not plan_memory(2 * 10**9, 0, trace, base)["fits"]
    assert "÷ 8 GPUs" in sharded["formula"]["trainable_states"] and "÷" not in plan["formula"]["trainable_states"]
    assert sharded["setup"].endswith(", 8 GPUs FSDP")
    assert plan_memory(0, 0, trace, dataclasses.replace(base, gpus=2))["setup"].endswith(", 2 GPUs")
    exactly = plan_memory(10**9 - 1_000_000, 0, trace, base)
    assert exactly["total_per_gpu"] == base.gpu_bytes and exactly["fits"]  # a GPU filled exactly still fits
    assert TrainingSetup().gpu_bytes == 80 * 2**30  # GB means GiB, as on the page
    pair = plan_memory(800, 0, trace, dataclasses.replace(base, gpus=2, sharding="fsdp"))
    assert "÷ 2 GPUs (FSDP full shard) + one layer gathered" in pair["formula"]["weights"]
    assert "÷" not in plan["formula"]["weights"]
    assert "no sequence × sequence scores" in plan["formula"]["activations"]
    eager = plan_memory(0, 0, trace, dataclasses.replace(base, attention="eager"))
    assert "the scores are kept" in eager["formula"]["activations"]
    assert {f: TrainingSetup(weight_format=f).compute_dtype for f in ("fp32", "bf16", "int8", "nf4")} == {
        "fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16, "nf4": torch.bfloat16}
    assert TrainingSetup(gpu_bytes=10**8).gpu_bytes == 10**8  # the smallest GPU accepted, and the largest
    assert TrainingSetup(gpu_bytes=10**14).gpu_bytes == 10**14
    for field, value in (("gpu_bytes", 10**14 + 1), ("batch", 0), ("gpus", 0)):
        with pytest.raises(ConfigError, match=f"{field} must be an integer"):
            TrainingSetup(**{field: value})
    assert TrainingSetup().describe() == "bf16 weights, adamw, batch 1 × 2048 tokens, flash attention"
    parsed = "".join(["fs", "dp"])  # as a JSON body brings it: equal to the literal, not the same object
    assert TrainingSetup(sharding=parsed, gpus=2).describe().endswith(", 2 GPUs FSDP")
    with pytest.raises(ConfigError, match="batch must be an integer"):
        TrainingSetup(batch=True)
    assert sharded["total_per_gpu"] == 100_000_000 + 80_000_000 + 2_000 + 1_000_000
    odd = plan_memory(0, 1_001, trace, dataclasses.replace(base, gpus=8, sharding="fsdp"))["trainable_states"]
    assert odd == 1_001 * 16 // 8 and isinstance(odd, int)
    assert "4-bit/8-bit" in plan_memory(0, 0, trace, dataclasses.replace(base, weight_format="nf4"))["formula"]["weights"]
    assert "4-bit/8-bit" not in plan["formula"]["weights"]
    with pytest.raises(ConfigError, match="gpu_bytes must be an integer from 100,000,000"):
        TrainingSetup(gpu_bytes=10**8 - 1)
    without = plan_memory(500_000_000, 1_000, None, base)
    assert without["activations"] == 0 and not without["activations_included"]
    assert without["setup"] == "bf16 weights, adamw, batch 2 × 100 tokens, flash attention"


def test_weight_formats_on_a_405b_shape():
    model = load_backbone("catalog:llama-3.1-405b").model
    sizes = {f: weight_bytes(model, TrainingSetup(weight_format=f)) for f in ("fp32", "bf16", "int8", "nf4")}
    parameters = sum(p.numel() for p in model.parameters())
    assert sizes["fp32"] == 4 * parameters and sizes["bf16"] == 2 * parameters
    assert sizes["nf4"] < sizes["int8"] < sizes["bf16"]
    assert 0.26 < sizes["nf4"] / sizes["bf16"] < 0.30  # half a byte a weight + scales, embeddings in bf16
    linear = [m for m in model.modules() if type(m) is torch.nn.Linear and m is not model.lm_head]
    weights = sum(m.in_features * m.out_features for m in linear)
    rows = sum(m.out_features for m in linear)
    assert sizes["int8"] == weights + 4 * rows + 2 * (parameters - weights)  # a byte a weight, a scale a row


def test_gpt2_conv1d_weights_are_quantised_in_the_plan():
    model = load_backbone("catalog:gpt2").model
    bf16 = weight_bytes(model, TrainingSetup(weight_format="bf16"))
    assert weight_bytes(model, TrainingSetup(weight_format="nf4")) < 0.55 * bf16  # old: planned at bf16


@pytest.mark.parametrize("field, value, message", [
    ("gpus", 0, "gpus must be an integer from 1 to 4,096"),
    ("weight_format", "fp8", "weight_format must be one of fp32, bf16, int8, nf4"),
    ("sequence", 10**9, "sequence must be an integer from 1 to 16,777,216"),
    ("batch", 4096, "batch × sequence must be at most 16,777,216 tokens; got 33,554,432"),
    ("optimizer", "adam", "optimizer must be one of adamw, adamw8bit, sgd"),
])
def test_a_bad_setup_is_refused_by_name(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainingSetup(**{field: value, "sequence": 8192} if field == "batch" else {field: value})


def test_only_a_weight_free_model_is_traced_and_only_as_long_as_it_reads():
    setup = {"arch": "bert", "method": "lora", "batch": 1, "sequence": 8, "checkpointing": False,
             "format": "fp32", "attention_kernel": "eager"}
    with pytest.raises(ConfigError, match="traced on the meta device"):
        trace_activations(build(setup, "cpu"), 1, 8)
    with pytest.raises(ConfigError, match="sequence 4,096 is longer than BertModel reads"):
        trace_activations(build(setup, "meta"), 1, 4096)
