"""Child process of the planner-vs-reality tests: one real training step of a small model on CPU
(hidden 256) in a given setup, its peak resident memory sampled every millisecond, minus what
the idle process holds. Run with MALLOC_MMAP_THRESHOLD_ fixed so freed tensors go back to the
system and the resident size follows the live tensors.

``python -m tests.engine.peak_child '{"arch": "bert", "method": "lora", ...}'`` prints one JSON line.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import tempfile
import threading
import time
from typing import Any

import torch
import transformers
from torch import nn

import engine

VOCAB = 1000
SHAPES: dict[str, dict[str, Any]] = {
    "bert": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024,
             "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1},
    "gpt2": {"n_embd": 256, "n_layer": 4, "n_head": 4, "n_positions": 1024},
    "llama": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 768},
    "t5": {"d_model": 256, "d_ff": 1024, "d_kv": 64, "num_layers": 3, "num_heads": 4, "decoder_start_token_id": 0},
    "mixtral": {"hidden_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                "intermediate_size": 512, "num_local_experts": 4, "num_experts_per_tok": 2},
}
CLASSES = {"bert": "BertModel", "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "t5": "T5Model",
           "mixtral": "MixtralModel"}
METHODS: dict[str, dict[str, Any]] = {
    "lora": {"delta_type": "lora", "modified_modules": ["attn.q", "attn.v"], "lora_r": 8, "lora_dropout": 0.1},
    "adapter": {"delta_type": "adapter"},
    "prefix": {"delta_type": "prefix", "reparameterize": False, "prefix_token_num": 8},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "nf4": torch.bfloat16, "int8": torch.bfloat16}


def config_for(setup: dict[str, Any], scale: float = 1.0) -> Any:
    shape = dict(SHAPES[setup["arch"]])
    if scale != 1.0:  # a small twin that loads the same kernels for the warm-up
        for key in ("hidden_size", "n_embd", "d_model", "intermediate_size", "d_ff"):
            if key in shape:
                shape[key] = max(32, int(shape[key] * scale))
        if "d_kv" in shape:
            shape["d_kv"] = 8
    if setup["attention_kernel"] == "sdpa":
        # PyTorch's CPU SDPA falls back to the math kernel (which keeps the scores) under attention
        # dropout; the fused kernels GPUs run keep none either way
        shape.update({key: 0.0 for key in ("attention_probs_dropout_prob", "attn_pdrop", "attention_dropout")
                      if setup["arch"] in ("bert", "gpt2", "llama", "mixtral")})
    config = transformers.AutoConfig.for_model(setup["arch"], vocab_size=VOCAB, **shape)
    config._attn_implementation = setup["attention_kernel"]
    return config


def build(setup: dict[str, Any], device: str, scale: float = 1.0) -> nn.Module:
    """The model of ``setup`` with its delta attached and the backbone frozen (meta: for the plan)."""
    config = config_for(setup, scale)
    model_class = getattr(transformers, CLASSES[setup["arch"]])
    torch.manual_seed(0)
    if setup["format"] in ("nf4", "int8") and device != "meta":
        model = _quantised(model_class, config, setup["format"])
    else:
        with torch.device(device):
            model = model_class(config).to(DTYPES[setup["format"]])
    delta = engine.AutoDeltaModel.from_config(engine.AutoDeltaConfig.from_dict(METHODS[setup["method"]]), model)
    delta.freeze_module()
    if setup["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _quantised(model_class: Any, config: Any, quantization: str) -> nn.Module:
    """QLoRA's loading: Linear/Conv1D weights quantised by bitsandbytes, the rest in bfloat16."""
    from engine.quantization import bnb_config, keep_differentiable

    with tempfile.TemporaryDirectory() as directory:
        model_class(config).save_pretrained(directory)
        model = model_class.from_pretrained(directory, quantization_config=bnb_config(quantization, torch.bfloat16),
                                            dtype=torch.bfloat16, device_map="cpu")
    keep_differentiable(model)
    return model


def inputs_for(model: nn.Module, setup: dict[str, Any]) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (setup["batch"], setup["sequence"]))
    inputs = {"input_ids": ids}
    if setup["arch"] == "t5":
        inputs["decoder_input_ids"] = ids
    if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        inputs["labels"] = ids
    return inputs


def _resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def train_step(model: nn.Module, inputs: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    output = model(**inputs, use_cache=False) if hasattr(model.config, "use_cache") else model(**inputs)
    loss = output.loss if getattr(output, "loss", None) is not None else output.last_hidden_state.float().sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(setup: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(0)
    warm = build(setup, "cpu", scale=0.125)  # loads every kernel the real step will use
    warm_optimizer = torch.optim.AdamW([p for p in warm.parameters() if p.requires_grad])
    for _ in range(2):
        train_step(warm, inputs_for(warm, {**setup, "batch": 1, "sequence": 8}), warm_optimizer)
    del warm, warm_optimizer
    _release()
    idle = _resident()
    model = build(setup, "cpu")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable)
    inputs = inputs_for(model, setup)
    train_step(model, inputs, optimizer)  # the optimizer's states exist from here on
    _release()
    peak = [_resident()]
    running = [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], _resident())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    train_step(model, inputs, optimizer)
    running[0] = False
    sampler.join()
    return {"peak_over_idle": peak[0] - idle, "trainable": sum(p.numel() for p in trainable)}


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(measure(json.loads(sys.argv[1]))))
