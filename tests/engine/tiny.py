"""Tiny real-weight transformers models (random init, fixed seed) for the engine tests."""

from __future__ import annotations

import torch
import transformers
from torch import nn

TINY_CONFIGS = {
    "bert": lambda: transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        vocab_size=99, max_position_embeddings=64),
    "gpt2": lambda: transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64),
    "t5": lambda: transformers.T5Config(
        d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4, vocab_size=99,
        decoder_start_token_id=0),
    "llama": lambda: transformers.LlamaConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=99, max_position_embeddings=64),
    "opt": lambda: transformers.OPTConfig(
        hidden_size=32, ffn_dim=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=99,
        max_position_embeddings=64, word_embed_proj_dim=32),
}
TINY_CLASSES = {
    "bert": transformers.BertModel,
    "gpt2": transformers.GPT2LMHeadModel,
    "t5": transformers.T5ForConditionalGeneration,
    "llama": transformers.LlamaForCausalLM,
    "opt": transformers.OPTForCausalLM,
}


def tiny_model(kind: str, seed: int = 0, attention: str | None = None,
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """The same weights for the same (kind, seed), in eval mode; ``attention`` picks eager/sdpa.
    Tests that compare two computations use ``dtype=torch.float64`` with a tolerance of 1e-10,
    so rounding never hides a bug."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[kind]()
    if attention is not None:
        config._attn_implementation = attention
    return TINY_CLASSES[kind](config).eval().to(dtype)


def tiny_inputs(kind: str, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (2, 6), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "t5":
        inputs["decoder_input_ids"] = torch.randint(3, 99, (2, 4), generator=generator)
    return inputs


def main_tensor(output: object) -> torch.Tensor:
    """logits for LM heads, last_hidden_state for bare encoders."""
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    raise TypeError(f"no main tensor in {type(output).__name__}")


def with_nonzero_biases(model: nn.Module, seed: int = 3) -> nn.Module:
    """Every bias random and non-zero, every norm's weight away from 1 (transformers initialises
    biases to 0 and norms to 1, which hides any bug that mishandles them)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or ("norm" in name.lower() and name.endswith("weight")):
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
                parameter.add_((0.3 * noise).to(parameter.dtype))
    return model
