"""Well-known backbone shapes, built on the meta device from their published configurations.

Each entry records the architecture class of the published checkpoint and its published
parameter count, so the catalog is checked against reality by the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

_LLAMA3_ROPE = MappingProxyType({
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
})


@dataclass(frozen=True)
class CatalogEntry:
    """One well-known shape: which class to build, from which configuration."""

    name: str
    model_class: str
    model_type: str
    config: dict[str, Any] = field(default_factory=dict)
    parameters: int = 0
    description: str = ""


CATALOG: MappingProxyType[str, CatalogEntry] = MappingProxyType({
    entry.name: entry
    for entry in [
        CatalogEntry(
            "bert-base-uncased", "BertModel", "bert", {}, 109_482_240, "BERT base encoder"
        ),
        CatalogEntry(
            "roberta-base",
            "RobertaModel",
            "roberta",
            {
                "vocab_size": 50265,
                "max_position_embeddings": 514,
                "type_vocab_size": 1,
                "layer_norm_eps": 1e-5,
                "pad_token_id": 1,
                "bos_token_id": 0,
                "eos_token_id": 2,
            },
            124_645_632,
            "RoBERTa base encoder",
        ),
        CatalogEntry("gpt2", "GPT2LMHeadModel", "gpt2", {}, 124_439_808, "GPT-2 small decoder"),
        CatalogEntry(
            "t5-base",
            "T5ForConditionalGeneration",
            "t5",
            {"d_model": 768, "d_ff": 3072, "num_layers": 12, "num_heads": 12, "d_kv": 64},
            222_903_552,
            "T5 base encoder-decoder",
        ),
        CatalogEntry(
            "llama-3-8b",
            "LlamaForCausalLM",
            "llama",
            {
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "vocab_size": 128256,
                "max_position_embeddings": 8192,
                "rope_theta": 500000.0,
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False,
            },
            8_030_261_248,
            "Llama 3 8B decoder",
        ),
        CatalogEntry(
            "llama-3-70b",
            "LlamaForCausalLM",
            "llama",
            {
                "hidden_size": 8192,
                "intermediate_size": 28672,
                "num_hidden_layers": 80,
                "num_attention_heads": 64,
                "num_key_value_heads": 8,
                "vocab_size": 128256,
                "max_position_embeddings": 8192,
                "rope_theta": 500000.0,
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False,
            },
            70_553_706_496,
            "Llama 3 70B decoder",
        ),
        CatalogEntry(
            "llama-3.1-405b",
            "LlamaForCausalLM",
            "llama",
            {
                "hidden_size": 16384,
                "intermediate_size": 53248,
                "num_hidden_layers": 126,
                "num_attention_heads": 128,
                "num_key_value_heads": 8,
                "vocab_size": 128256,
                "max_position_embeddings": 131072,
                "rope_parameters": _LLAMA3_ROPE,
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False,
            },
            405_853_388_800,
            "Llama 3.1 405B decoder",
        ),
        CatalogEntry(
            "mistral-7b",
            "MistralForCausalLM",
            "mistral",
            {
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "vocab_size": 32000,
                "sliding_window": 4096,
                "tie_word_embeddings": False,
            },
            7_241_732_096,
            "Mistral 7B v0.1 decoder",
        ),
        CatalogEntry(
            "mixtral-8x7b",
            "MixtralForCausalLM",
            "mixtral",
            {
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "vocab_size": 32000,
                "num_local_experts": 8,
                "num_experts_per_tok": 2,
                "tie_word_embeddings": False,
            },
            46_702_792_704,
            "Mixtral 8x7B sparse mixture-of-experts decoder",
        ),
        CatalogEntry(
            "qwen2.5-7b",
            "Qwen2ForCausalLM",
            "qwen2",
            {
                "hidden_size": 3584,
                "intermediate_size": 18944,
                "num_hidden_layers": 28,
                "num_attention_heads": 28,
                "num_key_value_heads": 4,
                "vocab_size": 152064,
                "max_position_embeddings": 131072,
                "rope_theta": 1000000.0,
                "rms_norm_eps": 1e-6,
                "tie_word_embeddings": False,
            },
            7_615_616_512,
            "Qwen2.5 7B decoder",
        ),
        CatalogEntry(
            "vit-base",
            "ViTForImageClassification",
            "vit",
            {"num_labels": 1000},
            86_567_656,
            "ViT-B/16 image classifier (224 px)",
        ),
        CatalogEntry(
            "whisper-small",
            "WhisperForConditionalGeneration",
            "whisper",
            {
                "d_model": 768,
                "encoder_layers": 12,
                "decoder_layers": 12,
                "encoder_attention_heads": 12,
                "decoder_attention_heads": 12,
                "encoder_ffn_dim": 3072,
                "decoder_ffn_dim": 3072,
                "vocab_size": 51865,
                "num_mel_bins": 80,
            },
            241_734_912,
            "Whisper small speech encoder-decoder",
        ),
        CatalogEntry(
            "clip-vit-base",
            "CLIPModel",
            "clip",
            {
                "text_config": {},
                "vision_config": {"patch_size": 32},
                "projection_dim": 512,
            },
            151_277_313,
            "CLIP ViT-B/32 image-text dual encoder",
        ),
    ]
})


#: the Hugging Face Hub model whose shape each catalog entry has: what an exported adapter names as
#: its ``base_model_name_or_path`` (PEFT and the Hub read it), never ``catalog:…``
HUB_IDS: MappingProxyType[str, str] = MappingProxyType({
    "bert-base-uncased": "google-bert/bert-base-uncased",
    "roberta-base": "FacebookAI/roberta-base",
    "gpt2": "openai-community/gpt2",
    "t5-base": "google-t5/t5-base",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3-70b": "meta-llama/Meta-Llama-3-70B",
    "llama-3.1-405b": "meta-llama/Llama-3.1-405B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "vit-base": "google/vit-base-patch16-224",
    "whisper-small": "openai/whisper-small",
    "clip-vit-base": "openai/clip-vit-base-patch32",
})
#: the embedded default backbone's Hub id
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def base_model_id(source: str | None) -> str | None:
    """What an exported adapter should name as its base model for a backbone ``source``: the Hub
    id of a catalog shape or of the embedded default, a local directory or hub id as given, and
    nothing for an architecture's default config (no checkpoint has it)."""
    if not source or source.startswith(("arch:", "python:")):
        return None
    if source.startswith("catalog:"):
        return HUB_IDS.get(source.removeprefix("catalog:"))
    return MINILM_HUB_ID if source == "minilm" else source


def thawed(value: Any) -> Any:
    """A fresh, mutable deep copy of a catalog value (configurations may be changed by whoever
    builds from them; the catalog itself never is)."""
    if isinstance(value, (dict, MappingProxyType)):
        return {key: thawed(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(thawed(item) for item in value)
    return value
