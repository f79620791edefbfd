"""Child process of the memory-plan test: one training step of a tiny model on CPU, its peak
resident memory sampled every millisecond. Run with MALLOC_MMAP_THRESHOLD_ fixed so freed
tensors go back to the system and the resident size follows the live tensors."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import torch
from transformers import AutoConfig, AutoModel

from engine import LoraConfig, LoraModel

SHAPE = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024,
         "vocab_size": 1000, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
BATCH, SEQUENCE = 16, 256


def build(kind: str, device: str) -> torch.nn.Module:
    config = AutoConfig.for_model(kind, **SHAPE)
    config._attn_implementation = "eager"
    with torch.device(device):
        model = AutoModel.from_config(config)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    LoraModel(model, config=LoraConfig(modified_modules=["attn.q", "attn.v"], lora_r=8, lora_dropout=0.1))
    return model.train()


def _resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(kind: str) -> None:
    torch.manual_seed(0)
    model = build(kind, "cpu")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable)
    ids = torch.randint(0, 1000, (BATCH, SEQUENCE))

    def step() -> None:
        model(input_ids=ids).last_hidden_state.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # optimizer states exist, libraries are loaded
    baseline = _resident()
    peak = [baseline]
    running = [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], _resident())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    step()
    running[0] = False
    sampler.join()
    print(json.dumps({"peak_over_baseline": peak[0] - baseline,
                      "trainable": sum(p.numel() for p in trainable)}))


if __name__ == "__main__":
    main(sys.argv[1])
