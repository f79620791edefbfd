"""OpenDelta's behaviours, as its users rely on them (thunlp/OpenDelta's basemodel.py,
delta_configs.py, utils/visualization.py, utils/inspect.py, structure_mapping.py)."""

from __future__ import annotations

import copy
import io
import json
import logging

import pytest
import torch
from rich.console import Console
from torch import nn

from engine import (
    AdapterModel,
    AutoDeltaConfig,
    AutoDeltaModel,
    CheckpointError,
    CompacterConfig,
    ConfigError,
    DeltaStateError,
    LoraModel,
    ModelStructure,
    ParallelAdapterModel,
    PrefixModel,
    SoftPromptModel,
    Visualization,
    expand_common_names,
    inspect_module_statistics,
    inspect_optimizer_statistics,
    resolve,
)
from tests.engine.tiny import main_tensor, tiny_inputs, tiny_model

#: OpenDelta's examples/examples_prompt/output/config.json, as it is in its repository
OPENDELTA_ADAPTER_CONFIG = {
    "backbone_checkpoint_name": "t5-base", "backbone_class": "T5ForConditionalGeneration",
    "backbone_hash": "bc7b37ff1b8304968f33e2ae7d73063a", "bottleneck_dim": 24, "common_structure": True,
    "delta_type": "adapter", "exclude_modules": ["lm_head"], "modified_modules": ["attn", "ff"],
    "non_linearity": "gelu_new", "opendelta_version": "0.1.0", "sequential": True,
    "transformers_version": "4.19.2", "unfrozen_modules": ["deltas", "layer_norm", "final_layer_norm"],
}
#: the training settings OpenDelta's example configs carry beside the delta's (lora_beans.json)
TRAINING_KEYS = {"report_to": "none", "dataset_name": "beans", "output_dir": "./beans_outputs/", "do_train": True,
                 "num_train_epochs": 5, "per_device_train_batch_size": 8, "seed": 1337, "learning_rate": 5e-4}


def paths_of(model: nn.Module, expressions: list[str], **options) -> list[str]:
    structure = ModelStructure(model)
    return resolve(structure.tree, expand_common_names(structure, expressions, **options)).paths


# --- names --------------------------------------------------------------------------------------


def test_a_second_delta_of_the_same_type_gets_a_suffixed_name(caplog):
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    first = LoraModel(model, ["query"])
    with caplog.at_level(logging.INFO, logger="engine.delta"):
        second = LoraModel(model, ["query"])
        third = AutoDeltaModel.from_config({"delta_type": "lora", "modified_modules": ["query"]}, model)
    assert (first.name, second.name, third.name) == ("lora", "lora_1", "lora_2")
    assert "this one is named 'lora_1'" in caplog.text
    query = model.encoder.layer[0].attention.self.query
    assert {"lora", "lora_1", "lora_2"} <= set(query._modules)
    for delta in (first, second, third):  # all three act: each changes the output when perturbed
        before = main_tensor(model(**inputs)).clone()
        with torch.no_grad():
            for layer in delta.delta_modules.values():
                layer.lora_B.weight.normal_()
        assert not torch.allclose(main_tensor(model(**inputs)), before)
    named = LoraModel(model, ["value"], name="lora")  # a given name is kept: 'lora' is free on value
    assert named.name == "lora"
    with pytest.raises(DeltaStateError, match="already has a submodule named 'lora'"):
        LoraModel(model, ["query"], name="lora")


def test_unfrozen_modules_is_a_config_field_used_saved_and_restored(tmp_path):
    model = tiny_model("bert")
    delta = LoraModel(model, ["query"], unfrozen_modules=["deltas", "pooler"])
    assert delta.config.unfrozen_modules == ["deltas", "pooler"]
    delta.freeze_module()  # no arguments: the config's unfrozen_modules
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"pooler.dense.weight", "pooler.dense.bias"} <= trainable
    assert all(".lora" in n or n.startswith("pooler.") for n in trainable)
    with torch.no_grad():
        model.pooler.dense.bias.add_(1.0)
    delta.save_finetuned(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["unfrozen_modules"] == ["deltas", "pooler"]
    fresh = tiny_model("bert")
    loaded = AutoDeltaModel.from_finetuned(tmp_path, fresh, is_trainable=True)
    assert loaded.config.unfrozen_modules == ["deltas", "pooler"]
    assert torch.equal(fresh.pooler.dense.bias, model.pooler.dense.bias)
    assert fresh.pooler.dense.bias.requires_grad and not fresh.embeddings.word_embeddings.weight.requires_grad


# --- configs as OpenDelta writes them -----------------------------------------------------------


def test_an_opendelta_config_json_loads_as_it_is(tmp_path, caplog):
    (tmp_path / "config.json").write_text(json.dumps({**OPENDELTA_ADAPTER_CONFIG, **TRAINING_KEYS}))
    with caplog.at_level(logging.WARNING, logger="engine.config"):
        config = AutoDeltaConfig.from_finetuned(tmp_path)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one warning lists every ignored key
    assert all(key in warnings[0].getMessage() for key in TRAINING_KEYS)
    assert (config.route, config.bottleneck_dim, config.common_structure) == ("after", 24, True)
    assert config.unfrozen_modules == ["deltas", "layer_norm", "final_layer_norm"]
    model = tiny_model("t5")
    delta = AutoDeltaModel.from_config(config, model)
    assert delta.modified_paths == paths_of(model, ["attn", "ff"], typed=False)
    delta.freeze_module()  # layer_norm is T5's real module name: it means those modules
    trainable = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad and ".adapter" not in n}
    assert trainable == {*paths_of(model, ["layer_norm"]), "encoder.final_layer_norm", "decoder.final_layer_norm"}


def test_strict_loading_and_typos_are_errors():
    data = {"delta_type": "lora", "lora_r": 4, **TRAINING_KEYS}
    with pytest.raises(ConfigError, match="unknown lora option.*learning_rate"):
        AutoDeltaConfig.from_dict(data, strict=True)
    assert AutoDeltaConfig.from_dict(data).lora_r == 4
    with pytest.raises(ConfigError, match="'lora_alhpa': did you mean 'lora_alpha'"):
        AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_alhpa": 4})  # never silently ignored
    with pytest.raises(ConfigError, match="unknown lora option"):
        LoraModel(tiny_model("bert"), learning_rate=1e-3)  # keyword arguments stay strict


def test_compacter_reads_every_opendelta_option():
    values = {"delta_type": "compacter", "bottleneck_dim": 32, "non_linearity": "gelu_new", "sequential": True,
              "reduction_factor": 16, "phm_c_init": "normal", "hypercomplex_division": 4, "learn_phm": True,
              "hypercomplex_nonlinearity": "glorot-uniform", "shared_phm_rule": False, "factorized_phm": True,
              "shared_W_phm": False, "factorized_phm_rule": False, "phm_rank": 1, "phm_init_range": 0.0001,
              "kronecker_prod": None, "use_bias_up_sampler": True, "use_bias_down_sampler": True,
              "unfrozen_modules": ["deltas"], "common_structure": False, "interactive_modify": False,
              "backend": "hf"}
    config = AutoDeltaConfig.from_dict(values, strict=True)  # nothing left over, even when strict
    assert isinstance(config, CompacterConfig)
    assert (config.route, config.shared_phm_rule, config.reduction_factor) == ("after", False, 16)
    for key, value, reason in (("shared_W_phm", True, "OpenDelta itself refuses it"),
                               ("sequential", False, "non-sequential"),
                               ("interactive_modify", True, "delta-designer serve"),
                               ("backend", "bmt", "bmtrain")):
        with pytest.raises(ConfigError, match=f"OpenDelta option {key}=.*{reason}"):
            AutoDeltaConfig.from_dict({**values, key: value})


# --- common names -------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "attention_norm", "feed_forward_norm"), [
    ("bert", "encoder.layer.0.attention.output.LayerNorm", "encoder.layer.0.output.LayerNorm"),
    ("gpt2", "transformer.h.0.ln_1", "transformer.h.0.ln_2"),
    ("llama", "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm"),
    ("t5", "encoder.block.0.layer.0.layer_norm", "encoder.block.0.layer.1.layer_norm"),
    ("opt", "model.decoder.layers.0.self_attn_layer_norm", "model.decoder.layers.0.final_layer_norm"),
])
def test_opendelta_common_names_for_norms_and_projections(kind, attention_norm, feed_forward_norm):
    model = tiny_model(kind)
    attention_norms = paths_of(model, ["attn.layer_norm"])
    feed_forward_norms = paths_of(model, ["ff.layer_norm"])
    assert attention_norm in attention_norms and feed_forward_norm in feed_forward_norms
    assert not set(attention_norms) & set(feed_forward_norms)
    assert paths_of(model, ["attn.proj"]) == paths_of(model, ["attn.o"])
    head = model.get_output_embeddings()
    if head is None:  # a bare encoder has no head: naming it is an error, never an empty match
        with pytest.raises(ConfigError, match="common name 'lm_head.proj'"):
            paths_of(model, ["lm_head.proj"])
    else:
        assert [dict(model.named_modules())[p] for p in paths_of(model, ["lm_head.proj"])] == [head]


def test_cross_attention_names_on_t5():
    model = tiny_model("t5")
    assert paths_of(model, ["crossattn.q"]) == [f"decoder.block.{i}.layer.1.EncDecAttention.q" for i in range(2)]
    assert paths_of(model, ["crossattn.proj"]) == [f"decoder.block.{i}.layer.1.EncDecAttention.o" for i in range(2)]
    assert paths_of(model, ["crossattn.layer_norm"]) == [f"decoder.block.{i}.layer.1.layer_norm" for i in range(2)]
    with pytest.raises(ConfigError, match="common name 'crossattn.q'"):
        paths_of(tiny_model("bert"), ["crossattn.q"])  # no cross-attention: an error, not nothing


def test_a_real_module_name_beats_a_common_name(caplog):
    t5 = tiny_model("t5")
    with caplog.at_level(logging.INFO, logger="engine.roles.common_names"):
        typed = paths_of(t5, ["layer_norm"])
    assert typed == [p for p, _ in t5.named_modules() if p.endswith(".layer_norm")]  # not final_layer_norm
    assert "'layer_norm' is a module name" in caplog.text
    assert "encoder.final_layer_norm" in paths_of(t5, ["layer_norm"], typed=False)  # the role
    bert = tiny_model("bert")
    assert paths_of(bert, ["embeddings"]) == ["embeddings"]  # BertEmbeddings, the real module
    assert paths_of(bert, ["embeddings"], typed=False) == ["embeddings.word_embeddings"]
    forced = LoraModel(bert, ["embeddings"], common_structure=True)  # OpenDelta's flag: the role
    assert forced.modified_paths == ["embeddings.word_embeddings"]


# --- log, visualisation, statistics ------------------------------------------------------------


def test_log_has_opendelta_switches_and_exact_counts():
    model = tiny_model("bert")
    delta = LoraModel(model, ["query", "value"], lora_r=2)
    delta.freeze_module()
    out = io.StringIO()
    counts = delta.log(delta_ratio=True, trainable_ratio=True, visualization=False,
                       console=Console(file=out, width=200))
    text = out.getvalue()
    lora = 4 * (2 * 32 + 32 * 2)
    backbone = sum(p.numel() for n, p in model.named_parameters() if ".lora" not in n)
    assert counts["trainable_parameters"] == counts["delta_parameters"] == lora
    assert counts["total_parameters"] == backbone + lora
    assert f"Trainable Ratio: {lora:,}/{backbone + lora:,}" in text
    assert f"Delta Parameter Ratio: {lora:,}/{backbone + lora:,}" in text
    assert "encoder" not in text  # no tree without visualization
    quiet = io.StringIO()
    delta.log(delta_ratio=False, trainable_ratio=False, console=Console(file=quiet, width=200))
    assert "Ratio" not in quiet.getvalue() and "encoder" in quiet.getvalue()


def test_structure_graph_can_leave_out_parameter_free_modules():
    model = tiny_model("bert")
    render = Console(file=io.StringIO(), width=200, record=True)
    Visualization(model).structure_graph(console=render, keep_non_params=False, rootname="bert")
    hidden = render.export_text()
    full = Console(file=io.StringIO(), width=200, record=True)
    Visualization(model).structure_graph(console=full)
    shown = full.export_text()
    assert "dropout" in shown and "dropout" not in hidden
    assert hidden.startswith("bert (BertModel)") and shown.startswith("root (BertModel)")
    assert "query (Linear)" in hidden


def test_module_and_optimizer_statistics():
    model = tiny_model("bert")
    AdapterModel(model, ["attention.output.dense"], bottleneck_dim=4).freeze_module()
    adapter = 2 * (32 * 4 + 4 + 4 * 32 + 32)
    total = sum(p.numel() for p in model.parameters())
    stat = inspect_module_statistics(model, verbose=False)
    assert stat["delta_parameters"] == stat["trainable_parameters"] == adapter
    assert stat["total_parameters"] == total and stat["delta_ratio"] == pytest.approx(adapter / total)
    assert stat["cudamem"] == 0 or torch.cuda.is_available()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": trainable, "lr": 1e-3},
                                   {"params": list(model.pooler.parameters()), "lr": 0.0}])
    stats = inspect_optimizer_statistics(optimizer, verbose=False)
    assert stats["param_group_0"]["trainable_parameters"] == adapter and stats["param_group_0"]["lr"] == 1e-3
    assert stats["param_group_1"]["trainable_parameters"] == 0
    assert stats["param_group_1"]["total_parameters"] == 32 * 32 + 32


# --- checkpoints -------------------------------------------------------------------------------


def test_check_hash_refuses_another_structure_and_can_be_turned_off(tmp_path):
    model = tiny_model("bert")
    LoraModel(model, ["query"]).freeze_module().save_finetuned(tmp_path / "delta")
    recorded = json.loads((tmp_path / "delta" / "config.json").read_text())["structure_hash"]
    assert len(recorded) == 32
    AutoDeltaModel.from_finetuned(tmp_path / "delta", tiny_model("bert", seed=5))  # other values: same structure
    double = tiny_model("bert", dtype=torch.float64)
    with pytest.raises(CheckpointError, match="another structure.*check_hash=False"):
        AutoDeltaModel.from_finetuned(tmp_path / "delta", double)
    assert not any(getattr(m, "is_delta_module", False) for m in double.modules())
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "delta", double, check_hash=False)
    assert loaded.is_attached


def test_cache_dir_and_local_files_only(tmp_path):
    model = tiny_model("bert")
    LoraModel(model, ["query"]).freeze_module().save_finetuned(tmp_path / "cache" / "my-delta")
    loaded = AutoDeltaModel.from_finetuned("my-delta", tiny_model("bert"), cache_dir=tmp_path / "cache",
                                           local_files_only=True)
    assert loaded.modified_paths == ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"]
    assert AutoDeltaConfig.from_finetuned("my-delta", cache_dir=tmp_path / "cache").delta_type == "lora"
    with pytest.raises(CheckpointError, match="never downloaded"):
        AutoDeltaModel.from_finetuned("DeltaHub/lora_t5-base_mrpc", tiny_model("bert"))


# --- pseudo inputs ------------------------------------------------------------------------------


class FeatureModel(nn.Module):
    """A user's model on float features, with a block that declares no sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(16, 24), nn.GELU())
        self.out = nn.Linear(24, 3)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(features))


def test_dummy_inputs_on_the_model_drive_the_pseudo_pass():
    model = FeatureModel()
    with pytest.raises(Exception, match="could not find the sizes of block"):
        AdapterModel(model, ["block"])  # the generic pseudo input (token ids) cannot reach it
    model.dummy_inputs = {"features": torch.zeros(1, 5, 16)}
    delta = AdapterModel(model, ["block"], bottleneck_dim=4)
    assert delta.delta_modules["block"].up.out_features == 24


class Wrapper(nn.Module):
    """A user's wrapper around a transformers model: a head on top, and a forward of its own."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(32, 2)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.backbone(**batch).last_hidden_state)


@pytest.mark.parametrize("method", ["prefix", "soft_prompt"])
def test_prefix_and_soft_prompts_on_a_wrapper_equal_them_on_the_bare_model(method):
    inputs = tiny_inputs("bert")
    bare, wrapped = tiny_model("bert"), Wrapper(tiny_model("bert"))
    options = {"prefix": {"prefix_token_num": 3, "reparameterize": False}, "soft_prompt": {"soft_token_num": 3}}
    build = {"prefix": PrefixModel, "soft_prompt": SoftPromptModel}[method]
    reference = build(bare, **options[method])
    delta = build(wrapped, **options[method])  # the wrapper's forward takes no pseudo input: its backbone's does
    assert [f"backbone.{p}" for p in reference.modified_paths] == delta.modified_paths
    torch.manual_seed(0)
    with torch.no_grad():
        for tensor in reference.parameters():
            tensor.normal_()
        delta.detach()
        delta.load_delta_state({f"backbone.{k}": v for k, v in reference.delta_state().items()})
        delta.attach()
        expected = wrapped.head(bare(**inputs).last_hidden_state)
        got = wrapped(inputs)
        plain = Wrapper(tiny_model("bert"))
        plain.head = wrapped.head
        untouched = plain(inputs)
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-6)
    assert got.shape != untouched.shape or not torch.allclose(got, untouched, atol=1e-3)


def test_a_wrapper_without_a_usable_forward_is_sized_through_its_backbone():
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = tiny_model("bert")

        def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003
            raise NotImplementedError("call holder.encoder")

    holder = Holder()
    reference = copy.deepcopy(holder.encoder)
    delta = PrefixModel(holder, prefix_token_num=2)
    assert delta.modified_paths == [f"encoder.encoder.layer.{i}.attention.self" for i in range(2)]
    assert PrefixModel(reference, prefix_token_num=2).num_trainable_parameters() == delta.num_trainable_parameters()


def test_the_remaining_opendelta_method_options_act():
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    untouched = main_tensor(model(**inputs)).clone()
    layers = {}
    for scaled in (1.0, 2.5, 0.0):
        delta = ParallelAdapterModel(model, ["intermediate.dense"], scaled=scaled, name=f"s{int(scaled * 10)}")
        torch.manual_seed(3)
        with torch.no_grad():
            for tensor in delta.parameters():
                tensor.normal_()
        layers[scaled] = next(iter(delta.delta_modules.values()))
        changed = main_tensor(model(**inputs))
        assert torch.equal(changed, untouched) == (scaled == 0.0)  # scaled=0: the adapter adds nothing
        delta.detach()
    hidden = torch.randn(2, 6, 32)
    assert torch.allclose(layers[2.5](hidden), 2.5 * layers[1.0](hidden))
    prompt = SoftPromptModel(tiny_model("bert"), soft_token_num=50, token_init=False, init_range=0.01)
    embeds = next(iter(prompt.delta_modules.values())).soft_embeds
    assert embeds.abs().max() <= 0.01 and embeds.std() > 0.001
    for w_init in ("glorot-uniform", "glorot-normal"):
        AutoDeltaConfig.from_dict({"delta_type": "low_rank_adapter", "low_rank_w_init": w_init}, strict=True)
    with pytest.raises(ConfigError, match="low_rank_w_init must be one of"):
        AutoDeltaConfig.from_dict({"delta_type": "low_rank_adapter", "low_rank_w_init": "zeros"})
