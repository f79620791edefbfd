import io

import pytest
import torch
from rich.console import Console

from engine import (
    AdapterModel,
    AutoDeltaConfig,
    AutoDeltaModel,
    BitFitModel,
    ConfigError,
    DeltaStateError,
    LoraConfig,
    LoraModel,
    NoMatchError,
    PrefixModel,
    load_backbone,
    resolve,
)
from tests.engine.test_delta_matrix import output, perturb
from tests.engine.tiny import main_tensor, tiny_inputs, tiny_model

# --- LoRA merge ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_lora_merge_matches_unmerged_outputs_and_unmerge_restores_weights(kind):
    model, inputs = tiny_model(kind, dtype=torch.float64), tiny_inputs(kind)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = LoraModel(model, lora_r=4)
    perturb(delta)
    unmerged = output(model, inputs)
    delta.merge()
    assert delta.is_merged
    torch.testing.assert_close(output(model, inputs), unmerged, rtol=0, atol=1e-10)
    changed = [n for n, p in model.named_parameters() if n in weights and not torch.equal(p, weights[n])]
    assert changed and all(n.endswith("weight") for n in changed)  # the update lives in W
    delta.unmerge()
    for name, parameter in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(parameter, weights[name], rtol=0, atol=1e-12)
    torch.testing.assert_close(output(model, inputs), unmerged, rtol=0, atol=1e-12)
    with pytest.raises(DeltaStateError, match="not merged"):
        delta.unmerge()
    delta.merge()
    with pytest.raises(DeltaStateError, match="already merged"):
        delta.merge()
    delta.detach()  # detaching a merged delta unmerges first
    torch.testing.assert_close(output(tiny_model(kind, dtype=torch.float64), inputs), output(model, inputs),
                               rtol=0, atol=1e-12)


def test_only_lora_can_merge():
    delta = AdapterModel(tiny_model("bert"))
    with pytest.raises(DeltaStateError, match="cannot be merged"):
        delta.merge()


# --- multi-task serving (the paper's multi-task figure) ------------------------------------------


def test_three_tasks_served_on_one_backbone_by_attach_and_detach():
    inputs = tiny_inputs("bert")
    builders = {
        "task_a": lambda m: LoraModel(m, name="task_a", attach=False),
        "task_b": lambda m: AdapterModel(m, name="task_b", attach=False),
        "task_c": lambda m: BitFitModel(m, name="task_c", attach=False),
    }
    solo, states = {}, {}
    for seed, (task, build) in enumerate(builders.items()):
        alone = tiny_model("bert")
        delta = build(alone).attach()
        perturb(delta, seed)
        solo[task] = output(alone, inputs)
        states[task] = delta.state_dict()
    shared = tiny_model("bert")
    deltas = {}
    for task, build in builders.items():
        deltas[task] = build(shared)
        deltas[task].load_state_dict(states[task])
    base = output(shared, inputs)
    for task in ["task_b", "task_a", "task_c", "task_a"]:
        deltas[task].attach()
        assert torch.equal(output(shared, inputs), solo[task]), task
        deltas[task].detach()
        assert torch.equal(output(shared, inputs), base)


# --- exact counts --------------------------------------------------------------------------------


def test_lora_count_on_bert_base_is_the_formula_on_meta_and_real():
    meta = load_backbone("catalog:bert-base-uncased").model
    assert LoraModel(meta, ["query", "value"], lora_r=8).num_trainable_parameters() == 12 * 2 * 8 * (768 + 768)
    real = load_backbone("minilm").model
    assert LoraModel(real, ["query", "value"], lora_r=8).num_trainable_parameters() == 6 * 2 * 8 * (384 + 384)


def test_counts_equal_the_formulas_for_every_method():
    model = load_backbone("catalog:bert-base-uncased").model
    adapter = AdapterModel(model, bottleneck_dim=24)  # after attention.output.dense and output.dense
    assert adapter.num_trainable_parameters() == 24 * (768 * 24 + 24 + 24 * 768 + 768)
    bitfit = BitFitModel(model, name="bitfit")
    per_layer = 4 * 768 + 768 + 3072 + 768 + 768  # q,k,v,o + attn LN + intermediate + out + out LN
    assert bitfit.num_trainable_parameters() == 12 * per_layer + 768  # + embeddings.LayerNorm
    prefix = PrefixModel(model, prefix_token_num=6, embed_dim=256, mid_dim=512)
    width = 768  # one MLP for all 12 layers: 6 embeddings of 256 → 512 → every layer's keys and values
    assert prefix.num_trainable_parameters() == 6 * 256 + (256 * 512 + 512) + (512 + 1) * 12 * 2 * width
    direct = PrefixModel(model, prefix_token_num=6, reparameterize=False, name="prefix2")
    assert direct.num_trainable_parameters() == 12 * 2 * 6 * width
    by_module = adapter.trainable_parameters_by_module()
    assert list(by_module)[:2] == ["encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense"]
    assert sum(by_module.values()) == adapter.num_trainable_parameters()


def test_meta_backbone_of_405b_sizes_prefix_and_lora_without_memory():
    model = load_backbone("catalog:llama-3.1-405b").model
    lora = LoraModel(model, lora_r=16)
    assert lora.num_trainable_parameters() == 126 * 16 * ((16384 + 16384) + (16384 + 1024))
    prefix = PrefixModel(model, reparameterize=False, prefix_token_num=4, name="prefix")
    assert prefix.num_trainable_parameters() == 126 * 2 * 4 * 1024  # 8 kv heads × 128
    assert all(p.is_meta for p in prefix.parameters())


# --- freezing and state dicts ----------------------------------------------------------------------


def test_freeze_module_leaves_deltas_and_excluded_modules_trainable_and_filters_state_dict():
    model = tiny_model("bert")
    delta = LoraModel(model)
    delta.freeze_module(exclude=["deltas", "pooler"], set_state_dict=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(model.named_parameters()) if ".lora." in n or n.startswith("pooler.")}
    assert set(model.state_dict()) == trainable
    delta.freeze_module(exclude=["deltas"], set_state_dict=True)
    assert all(".lora." in k for k in model.state_dict())
    with pytest.raises(NoMatchError, match="'poolr'"):
        delta.freeze_module(exclude=["deltas", "poolr"])


def test_log_prints_the_tree_with_delta_modules_and_the_count():
    model = tiny_model("bert")
    delta = LoraModel(model, ["query"], lora_r=2)
    delta.freeze_module()
    buffer = io.StringIO()
    summary = delta.log(console=Console(file=buffer, width=120, color_system=None))
    assert buffer.getvalue() == (
        "root (BertModel) 20.2K (256 trainable)\n"
        "├── embeddings (BertEmbeddings) 5.3K frozen\n"
        "│   ├── word_embeddings (Embedding) weight[99,32] 3.2K frozen\n"
        "│   ├── position_embeddings (Embedding) weight[64,32] 2.0K frozen\n"
        "│   ├── token_type_embeddings (Embedding) weight[2,32] 64 frozen\n"
        "│   ├── LayerNorm (LayerNorm) weight[32] bias[32] 64 frozen\n"
        "│   └── dropout (Dropout)\n"
        "├── encoder (BertEncoder) 13.8K (256 trainable)\n"
        "│   └── layer (ModuleList) 13.8K (256 trainable)\n"
        "│       └── 0-1 ×2 (BertLayer) 6.9K each (128 trainable)\n"
        "│           ├── attention (BertAttention) 4.4K (128 trainable)\n"
        "│           │   ├── self (BertSelfAttention) 3.3K (128 trainable)\n"
        "│           │   │   ├── query (Linear) weight[32,32] bias[32] 1.2K (128 trainable)\n"
        "│           │   │   │   └── lora (LoraLayer) 128 delta\n"
        "│           │   │   │       ├── lora_A (Linear) weight[2,32] 64 delta\n"
        "│           │   │   │       ├── lora_B (Linear) weight[32,2] 64 delta\n"
        "│           │   │   │       └── dropout (Identity) delta\n"
        "│           │   │   ├── key (Linear) weight[32,32] bias[32] 1.1K frozen\n"
        "│           │   │   ├── value (Linear) weight[32,32] bias[32] 1.1K frozen\n"
        "│           │   │   └── dropout (Dropout)\n"
        "│           │   └── output (BertSelfOutput) 1.1K frozen\n"
        "│           │       ├── dense (Linear) weight[32,32] bias[32] 1.1K frozen\n"
        "│           │       ├── LayerNorm (LayerNorm) weight[32] bias[32] 64 frozen\n"
        "│           │       └── dropout (Dropout)\n"
        "│           ├── intermediate (BertIntermediate) 1.2K frozen\n"
        "│           │   ├── dense (Linear) weight[37,32] bias[37] 1.2K frozen\n"
        "│           │   └── intermediate_act_fn (GELUActivation)\n"
        "│           └── output (BertOutput) 1.3K frozen\n"
        "│               ├── dense (Linear) weight[32,37] bias[32] 1.2K frozen\n"
        "│               ├── LayerNorm (LayerNorm) weight[32] bias[32] 64 frozen\n"
        "│               └── dropout (Dropout)\n"
        "└── pooler (BertPooler) 1.1K frozen\n"
        "    ├── dense (Linear) weight[32,32] bias[32] 1.1K frozen\n"
        "    └── activation (Tanh)\n"
        "lora (lora) on 2 modules: 256 trainable parameters, 1.2814% of the backbone\n"
        "Trainable Ratio: 256/20,234=1.265197%\n"
        "Delta Parameter Ratio: 256/20,234=1.265197%\n"
    )
    backbone = sum(p.numel() for p in model.parameters()) - 256
    assert summary == {"trainable_parameters": 256, "modules": 2, "percent_of_backbone": 100 * 256 / backbone,
                       "total_parameters": backbone + 256, "total_trainable_parameters": 256,
                       "trainable_ratio": 256 / (backbone + 256), "delta_parameters": 256,
                       "delta_ratio": 256 / (backbone + 256), "cudamem": 0.0, "maxcudamem": 0.0}


# --- state errors ------------------------------------------------------------------------------


def test_attach_and_detach_misuse_raise_clear_state_errors():
    model = tiny_model("bert")
    delta = LoraModel(model)
    with pytest.raises(DeltaStateError, match="already attached"):
        delta.attach()
    delta.detach()
    with pytest.raises(DeltaStateError, match="not attached"):
        delta.detach()
    LoraModel(model)  # takes the name 'lora'
    with pytest.raises(DeltaStateError, match="already has a submodule named 'lora'.*another name"):
        delta.attach()


# --- AutoDelta -------------------------------------------------------------------------------


def test_auto_delta_config_and_model_from_dict():
    config = AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_r": 4})
    assert isinstance(config, LoraConfig) and config.modified_modules is None
    assert config.to_dict()["route"] == "parallel"
    delta = AutoDeltaModel.from_config(config, backbone_model=tiny_model("llama"))
    assert isinstance(delta, LoraModel)
    assert delta.modified_paths == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]
    with pytest.raises(ConfigError, match='needs a "delta_type"'):
        AutoDeltaConfig.from_dict({"lora_r": 4})


def test_adapter_routes_before_and_parallel_work():
    model, inputs = tiny_model("llama"), tiny_inputs("llama")
    reference = output(model, inputs)
    for route in ["before", "parallel"]:
        delta = AdapterModel(model, ["mlp"], route=route, name=f"adapter_{route}")
        assert torch.equal(output(model, inputs), reference)
        perturb(delta)
        assert not torch.equal(output(model, inputs), reference)
        delta.detach()
    assert torch.equal(output(model, inputs), reference)


def test_a_module_without_declared_sizes_is_sized_by_a_pseudo_pass_on_meta_too():
    real = AdapterModel(tiny_model("llama"), ["mlp"], bottleneck_dim=4)
    assert real.num_trainable_parameters() == 2 * (32 * 4 + 4 + 4 * 32 + 32)
    meta = AdapterModel(load_backbone("catalog:llama-3-8b").model, ["mlp"], bottleneck_dim=4)
    assert meta.num_trainable_parameters() == 32 * (4096 * 4 + 4 + 4 * 4096 + 4096)


def test_custom_models_work_with_real_names():
    from tests.engine.toy_models import Toy

    model = Toy()
    x = torch.tensor([[1, 2, 3]])

    def run(m):
        hidden = m.embed(x)
        for layer in m.layers:
            hidden = layer.act(layer.proj(hidden))
        return m.head(hidden)

    before = run(model)
    delta = LoraModel(model, ["proj"], lora_r=2)
    assert torch.equal(run(model), before)
    assert delta.num_trainable_parameters() == 4 * 2 * (4 + 4)
    # no attention, no widening or narrowing projection: LoRA's defaults have nowhere to go
    with pytest.raises(ConfigError, match="none of the default positions attn.q, attn.v .nor their fallbacks. "
                                          "was recognised in Toy .roles found: none.; give modified_modules"):
        LoraModel(model, name="lora2")


def test_a_method_never_wraps_the_modules_of_another_delta():
    model = tiny_model("bert")
    adapter = AdapterModel(model, ["output.dense"], bottleneck_dim=3)
    bitfit = BitFitModel(model, ["output"], name="bitfit")
    assert not any(".adapter" in p for p in bitfit.modified_paths)
    lora = LoraModel(model, ["dense"], name="lora_dense")
    assert not any(".adapter" in p for p in lora.modified_paths)
    with pytest.raises(ConfigError, match="only modules of other deltas"):
        LoraModel(model, ["adapter.down"], name="lora_down")
    assert adapter.is_attached


def test_a_merged_lora_leaves_no_hooks_behind():
    model = tiny_model("bert")
    delta = LoraModel(model)
    query = model.encoder.layer[0].attention.self.query
    assert len(query._forward_hooks) == 1
    delta.merge()
    assert not query._forward_hooks
    delta.unmerge()
    assert len(query._forward_hooks) == 1


@pytest.mark.parametrize("lora_first", [True, False])
def test_lora_in_place_update_composes_with_other_deltas_under_autograd(lora_first):
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    builders = [lambda: LoraModel(model, ["query"]), lambda: AdapterModel(model, ["query"])]
    deltas = [build() for build in (builders if lora_first else builders[::-1])]
    for delta in deltas:
        perturb(delta)
    main_tensor(model(**inputs)).pow(2).mean().backward()
    for delta in deltas:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in delta.parameters())


def test_a_module_shared_by_two_paths_is_addressable_and_wrapped_once():
    from torch import nn

    shared = nn.Linear(4, 4)
    model = nn.Module()
    model.add_module("vision", nn.Sequential(shared))
    model.add_module("text", nn.Sequential(shared))
    assert resolve(model, ["0"]).paths == ["vision.0", "text.0"]
    delta = LoraModel(model, ["0"], lora_r=2)
    assert delta.modified_paths == ["vision.0"]
    assert len(shared._forward_hooks) == 1
    assert delta.num_trainable_parameters() == 2 * (4 + 4)
