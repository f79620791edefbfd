"""Train a LoRA delta with the Hugging Face Trainer; checkpoints hold only the delta tensors.

    python examples/train_with_trainer.py out/ --steps 20
    python examples/train_with_trainer.py out/ --steps 40 --resume out/checkpoint-20

The backbone here is a small LLaMA built from a config (no download); swap in
``AutoModelForCausalLM.from_pretrained(...)`` for a real one — the three delta lines stay the same.
"""

from __future__ import annotations

import argparse

import torch
import transformers
from torch.utils.data import Dataset

from engine import LoraModel


class RepeatingTask(Dataset):
    """A few fixed sequences, repeated: learnable by a small delta, so the loss visibly drops."""

    def __init__(self, size: int = 64, length: int = 12, vocab: int = 99, distinct: int = 4) -> None:
        generator = torch.Generator().manual_seed(0)
        patterns = torch.randint(0, vocab, (distinct, length), generator=generator)
        self.rows = patterns[torch.arange(size) % distinct]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[index], "labels": self.rows[index]}


PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def backbone() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=99, max_position_embeddings=64))


def train(output_dir: str, steps: int, resume: str | None = None, save_steps: int = 10) -> transformers.Trainer:
    model = backbone()
    delta = LoraModel(backbone_model=model, modified_modules=PROJECTIONS, lora_r=8)
    delta.freeze_module(exclude=["deltas"], set_state_dict=True)  # checkpoints: delta tensors only
    arguments = transformers.TrainingArguments(
        output_dir=output_dir, max_steps=steps, save_steps=save_steps, per_device_train_batch_size=8,
        learning_rate=1e-2, logging_steps=5, report_to=[], use_cpu=True, seed=0, data_seed=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=RepeatingTask())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resume", default=None)
    options = parser.parse_args()
    result = train(options.output_dir, options.steps, options.resume)
    print("losses:", [round(entry["loss"], 4) for entry in result.state.log_history if "loss" in entry])
