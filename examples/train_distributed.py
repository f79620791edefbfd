"""Train one LoRA delta on one process, or across processes with DDP or FSDP2 (fully_shard).

    python examples/train_distributed.py --mode single --out out/single
    torchrun --nproc_per_node 2 examples/train_distributed.py --mode ddp --out out/ddp
    torchrun --nproc_per_node 2 examples/train_distributed.py --mode fsdp --out out/fsdp

Attach the delta *before* wrapping (so FSDP2 shards the delta parameters with the rest), freeze
the backbone, train, then call ``save_finetuned`` on every rank: sharded tensors are gathered and
rank 0 writes ``config.json`` + ``delta.safetensors``. On CPU the gloo backend is used; on GPUs
use nccl. Each rank trains on its slice of the same global batch, so the runs match the single
process up to float rounding.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

from engine import LoraModel

GLOBAL_BATCH, LENGTH, VOCAB = 8, 12, 99


def backbone(dtype: torch.dtype) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)).to(dtype)


def next_token_loss(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The causal LM loss, in the model's own dtype (transformers' takes it in float32)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))


def batches(steps: int) -> list[torch.Tensor]:
    """The same global batch every step: a task the delta can learn, so the loss must fall."""
    generator = torch.Generator().manual_seed(1)
    batch = torch.randint(0, VOCAB, (GLOBAL_BATCH, LENGTH), generator=generator)
    return [batch] * steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["single", "ddp", "fsdp"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                        help="float64 lets a comparison with a single process tell rounding from a bug")
    options = parser.parse_args()
    distributed = options.mode != "single"
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    model = backbone(getattr(torch, options.dtype))
    delta = LoraModel(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], lora_r=4)
    delta.freeze_module(exclude=["deltas"])
    runner: torch.nn.Module = model
    if options.mode == "ddp":
        runner = torch.nn.parallel.DistributedDataParallel(model)
    elif options.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    delta_ids = {id(p) for p in delta.parameters()}

    losses, only_deltas_have_gradients = [], True
    share = GLOBAL_BATCH // world
    for batch in batches(options.steps):
        rows = batch[rank * share:(rank + 1) * share]
        loss = next_token_loss(runner(input_ids=rows).logits, rows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with_gradients = {id(p) for p in model.parameters() if p.grad is not None}
        only_deltas_have_gradients &= bool(with_gradients) and with_gradients <= delta_ids
        optimizer.step()
        reported = loss.detach().clone()
        if distributed:
            dist.all_reduce(reported)
            reported /= world
        losses.append(reported.item())

    delta.save_finetuned(options.out)  # every rank: FSDP2 gathers; rank 0 writes
    if rank == 0:
        Path(options.out, "run.json").write_text(json.dumps(
            {"mode": options.mode, "world": world, "losses": losses,
             "only_deltas_have_gradients": only_deltas_have_gradients}))
    if distributed:
        dist.barrier()  # let rank 0 finish writing before the group goes away (gloo can hang otherwise)
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
