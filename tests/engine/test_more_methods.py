"""The methods beyond the first four: exact counts, options, and what each refuses."""

import pytest
import torch

from engine import (
    ConfigError,
    DeltaStateError,
    ModuleNotSupportedError,
    ModuleTree,
    NoMatchError,
    estimate_delta,
    load_backbone,
    method_for,
)
from tests.engine.test_delta_matrix import output, perturb
from tests.engine.tiny import main_tensor, tiny_inputs, tiny_model

D = 768  # bert-base width


@pytest.fixture(scope="module")
def bert_base():
    return load_backbone("catalog:bert-base-uncased").model


def test_counts_equal_the_formulas(bert_base):
    count = lambda name, **kw: method_for(name)(bert_base, attach=False, **kw).num_trainable_parameters()  # noqa: E731
    assert count("ia3") == 12 * (D + D + 3072)  # k and v outputs, FFN down-projection input
    assert count("soft_prompt", soft_token_num=20) == 20 * D
    assert count("parallel_adapter") == 12 * ((D * 24 + 24 + 24 * 3072 + 3072) + (3072 * 24 + 24 + 24 * D + D))
    assert count("parallel_adapter", route="parallel_pair") == 12 * (D * 24 + 24 + 24 * D + D)
    b = D // 32
    assert count("low_rank_adapter") == 24 * ((D * 1 + 1 * b + b) + (b * 1 + 1 * D + D))
    b, n = D // 16, 4
    # one set of rules Aᵢ (n × n × n) shared by every layer, then per layer the down and up Bᵢ and biases
    assert count("compacter") == n**3 + 24 * ((n * (D // n) + n * (b // n) + b) + (n * (b // n) + n * (D // n) + D))


def test_estimates_agree_with_full_builds_for_every_method(bert_base):
    tree = ModuleTree.from_model(bert_base)
    for name, config in [("ia3", {}), ("soft_prompt", {}), ("parallel_adapter", {"route": "parallel_pair"}),
                         ("low_rank_adapter", {}), ("compacter", {}),
                         ("lora", {"rank_pattern": {r"[r]layer\.(0|1)\..*": 2}, "alpha_pattern": {"value": 1}})]:
        cls = method_for(name)
        config = cls.config_class.from_dict(config)
        assert estimate_delta(bert_base, config, tree).total == cls(bert_base, config=config, attach=False).num_trainable_parameters(), name


def test_lora_rank_and_alpha_patterns_apply_per_module(bert_base):
    delta = method_for("lora")(bert_base, ["query", "value"], rank_pattern={r"[r]layer\.0\..*": 16},
                               alpha_pattern={"value": 4}, attach=False)
    assert delta.num_trainable_parameters() == 294_912 + 2 * 8 * (D + D)
    layers = delta.delta_modules
    assert layers["encoder/layer/0/attention/self/query"].lora_A.weight.shape == (16, D)
    assert layers["encoder/layer/1/attention/self/query"].scaling == 16 / 8
    assert layers["encoder/layer/1/attention/self/value"].scaling == 4 / 8
    with pytest.raises(NoMatchError, match="'qeury'"):
        method_for("lora")(bert_base, ["query"], rank_pattern={"qeury": 4}, attach=False)
    with pytest.raises(ConfigError, match=r"rank_pattern\['query'\] must be a positive integer"):
        method_for("lora")(bert_base, ["query"], rank_pattern={"query": 0}, attach=False)


def test_rslora_scales_by_the_square_root_of_the_rank():
    delta = method_for("lora")(tiny_model("bert"), lora_r=4, lora_alpha=8, use_rslora=True)
    assert all(layer.scaling == 8 / 2 for layer in delta.delta_modules.values())


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_dora_starts_as_a_no_op_trains_and_merges(kind):
    model, inputs = tiny_model(kind, dtype=torch.float64), tiny_inputs(kind)
    reference = output(model, inputs)
    delta = method_for("lora")(model, use_dora=True, lora_r=4)
    assert torch.equal(output(model, inputs), reference)
    first = next(iter(delta.delta_modules.values()))
    assert first.lora_magnitude_vector.shape == (first.lora_B.weight.shape[0],)
    perturb(delta)
    changed = output(model, inputs)
    delta.merge()
    torch.testing.assert_close(output(model, inputs), changed, rtol=0, atol=1e-10)
    delta.unmerge()
    torch.testing.assert_close(output(model, inputs), changed, rtol=0, atol=1e-10)
    main_tensor(model(**inputs)).pow(2).mean().backward()
    assert first.lora_magnitude_vector.grad is not None


def test_lora_on_embeddings_and_conv2d_merges_exactly():
    model, inputs = tiny_model("llama", dtype=torch.float64), tiny_inputs("llama")
    reference = output(model, inputs)
    delta = method_for("lora")(model, ["embed_tokens"], lora_r=4)
    assert torch.equal(output(model, inputs), reference)
    perturb(delta)
    changed = output(model, inputs)
    delta.merge()
    torch.testing.assert_close(output(model, inputs), changed, rtol=0, atol=1e-10)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 4, 3, stride=2)).double()
    image = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        before = conv(image)
    delta = method_for("lora")(conv, ["0", "2"], lora_r=2)
    assert delta.num_trainable_parameters() == (2 * 3 * 9 + 8 * 2) + (2 * 8 * 9 + 4 * 2)
    with torch.no_grad():
        assert torch.equal(conv(image), before)
    perturb(delta)
    with torch.no_grad():
        changed = conv(image)
        delta.merge()
        torch.testing.assert_close(conv(image), changed, rtol=0, atol=1e-10)
    with pytest.raises(ModuleNotSupportedError, match="use_dora supports Linear and Conv1D"):
        method_for("lora")(tiny_model("llama"), ["embed_tokens"], use_dora=True)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "t5", "llama", "opt"])
def test_soft_prompt_prepends_tokens_extends_masks_and_generates_consistently(kind):
    model, inputs = tiny_model(kind, dtype=torch.float64), tiny_inputs(kind)
    delta = method_for("soft_prompt")(model, soft_token_num=3)
    perturb(delta)
    out = output(model, inputs)
    length = inputs["decoder_input_ids" if kind == "t5" else "input_ids"].shape[1]
    assert out.shape[1] == length + (0 if kind == "t5" else 3)
    padded = {**inputs}
    if kind != "t5":  # a right-padded batch gives the same outputs on the real positions
        ids = inputs["input_ids"][:1]
        with torch.no_grad():
            alone = main_tensor(model(input_ids=ids))
            more = main_tensor(model(input_ids=torch.cat([ids, torch.zeros(1, 2, dtype=torch.long)], 1),
                                     attention_mask=torch.cat([torch.ones_like(ids), torch.zeros(1, 2, dtype=torch.long)], 1)))
        torch.testing.assert_close(more[:, : alone.shape[1]], alone, rtol=0, atol=1e-10)
    if kind != "bert":
        ids = padded["input_ids"]
        cached = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
        assert torch.equal(cached, uncached)
        assert_greedy_choices(model, ids, cached)
    delta.detach()
    assert torch.equal(output(model, inputs), output(tiny_model(kind, dtype=torch.float64), inputs))


def assert_greedy_choices(model, prompt, generated):
    """Each generated token is the argmax of one plain forward over the whole sequence: catches a
    soft prompt cached twice (transformers 5.24 renamed ``past_key_values`` to ``cache``)."""
    encoder_decoder = model.config.is_encoder_decoder  # generate returns the decoder's sequence
    with torch.no_grad():
        logits = main_tensor(model(input_ids=prompt, decoder_input_ids=generated) if encoder_decoder
                             else model(input_ids=generated))
    soft = logits.shape[1] - generated.shape[1]  # decoder-only soft prompts add positions
    for position in range(1 if encoder_decoder else prompt.shape[1], generated.shape[1]):
        step = logits[:, soft + position - 1]
        chosen = step.gather(1, generated[:, position : position + 1]).squeeze(1)
        torch.testing.assert_close(chosen, step.max(dim=1).values, rtol=0, atol=1e-10)


def test_soft_prompt_with_labels_masks_the_soft_positions():
    model, inputs = tiny_model("llama"), tiny_inputs("llama")
    method_for("soft_prompt")(model, soft_token_num=3)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    assert torch.isfinite(loss)


def test_parallel_pair_reads_one_module_and_writes_another():
    model, inputs = tiny_model("llama"), tiny_inputs("llama")
    delta = method_for("parallel_adapter")(model, route="parallel_pair")
    assert list(delta.pair_paths.items())[0] == ("model.layers.0.self_attn", "model.layers.0.mlp.down_proj")
    reference = output(tiny_model("llama"), inputs)
    assert torch.equal(output(model, inputs), reference)
    perturb(delta)
    assert not torch.equal(output(model, inputs), reference)
    with pytest.raises(ConfigError, match="one output module per input module"):
        method_for("parallel_adapter")(tiny_model("llama"), route="parallel_pair", pair_modules=["down_proj", "up_proj"], name="pp")
    with pytest.raises(ConfigError, match="comes before"):
        method_for("parallel_adapter")(tiny_model("llama"), ["mlp"], route="parallel_pair", pair_modules=["o_proj"], name="pp")


@pytest.mark.parametrize(
    "name, options, error, message",
    [
        ("ia3", {"feedforward_modules": ["nope"]}, NoMatchError, "'nope' matches no module"),
        ("soft_prompt", {"soft_token_num": 0}, ConfigError, "soft_token_num must be a positive integer"),
        ("soft_prompt", {"modified_modules": ["q_proj"]}, ModuleNotSupportedError, "input embedding"),
        ("low_rank_adapter", {"low_rank_rank": -1}, ConfigError, "low_rank_rank must be a positive integer"),
        ("compacter", {"hypercomplex_division": 0}, ConfigError, "hypercomplex_division must be a positive"),
        ("compacter", {"hypercomplex_division": 5}, ModuleNotSupportedError, "divisible by hypercomplex_division=5"),
        ("parallel_adapter", {"route": "after"}, ConfigError, "does not support route 'after'"),
        ("lora", {"use_dora": "yes"}, ConfigError, "use_dora must be true or false"),
        ("ia3", {"modified_modules": ["input_layernorm"]}, ModuleNotSupportedError, "ia3 cannot wrap"),
    ],
)
def test_bad_hyperparameters_are_refused(name, options, error, message):
    with pytest.raises(error, match=message):
        method_for(name)(tiny_model("llama"), **options)


def test_merging_is_refused_for_methods_without_it():
    delta = method_for("ia3")(tiny_model("llama"))
    with pytest.raises(DeltaStateError, match="cannot be merged"):
        delta.merge()
