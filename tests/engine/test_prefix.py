"""Prefix tuning is checked against attention computed by hand, and for cache/padding/eager
consistency on encoder, decoder and encoder-decoder models."""

import math

import pytest
import torch

from engine import PrefixModel
from tests.engine.test_delta_matrix import output, perturb
from tests.engine.test_more_methods import assert_greedy_choices
from tests.engine.tiny import main_tensor, tiny_inputs, tiny_model


def test_bert_self_attention_with_prefix_equals_attention_computed_by_hand():
    model, inputs = tiny_model("bert", dtype=torch.float64), tiny_inputs("bert")
    delta = PrefixModel(model, prefix_token_num=3, reparameterize=False)
    perturb(delta)
    attention = model.encoder.layer[0].attention.self
    captured = {}
    handle = attention.register_forward_hook(
        lambda m, args, kwargs, out: captured.update(hidden=args[0] if args else kwargs["hidden_states"], out=out[0]),
        with_kwargs=True,
    )
    output(model, inputs)
    handle.remove()
    hidden = captured["hidden"]
    batch, length, _ = hidden.shape
    heads, size = 4, 8

    def split(t):
        return t.view(batch, -1, heads, size).transpose(1, 2)

    with torch.no_grad():
        q, k, v = split(attention.query(hidden)), split(attention.key(hidden)), split(attention.value(hidden))
        prefix = delta.delta_modules["encoder/layer/0/attention/self"]
        k = torch.cat([prefix.prefix_key.expand(batch, -1, -1, -1), k], dim=2)
        v = torch.cat([prefix.prefix_value.expand(batch, -1, -1, -1), v], dim=2)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(size), dim=-1)
        expected = (weights @ v).transpose(1, 2).reshape(batch, length, heads * size)
    torch.testing.assert_close(captured["out"], expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "opt"])
def test_cached_incremental_decoding_equals_the_full_forward(kind):
    model, inputs = tiny_model(kind, dtype=torch.float64), tiny_inputs(kind)
    perturb(PrefixModel(model, prefix_token_num=3))
    ids = inputs["input_ids"]
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        first = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=first.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5"])
def test_generate_with_and_without_cache_agree(kind):
    model, inputs = tiny_model(kind), tiny_inputs(kind)
    perturb(PrefixModel(model, prefix_token_num=2))
    ids = inputs["input_ids"]
    cached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
    uncached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert_greedy_choices(model, ids, cached)  # each token is the prefixed model's own argmax
    with torch.no_grad():  # and the prefix is really there: the logits differ from the bare model's
        bare = tiny_model(kind)
        args = {"input_ids": ids} | ({"decoder_input_ids": cached} if kind == "t5" else {})
        assert not torch.allclose(main_tensor(model(**args)), main_tensor(bare(**args)))


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_padding_never_leaks_and_the_prefix_stays_visible(kind):
    model = tiny_model(kind, dtype=torch.float64)
    perturb(PrefixModel(model, prefix_token_num=3))
    ids = tiny_inputs(kind)["input_ids"][:1]
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = main_tensor(model(input_ids=ids))
        with_pad = main_tensor(model(input_ids=padded, attention_mask=mask))[:, : ids.shape[1]]
    torch.testing.assert_close(with_pad, alone, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "t5"])
def test_eager_and_sdpa_attention_agree_with_a_prefix(kind):
    inputs = tiny_inputs(kind)
    results = []
    for attention in ["eager", "sdpa"]:
        model = tiny_model(kind, attention=attention, dtype=torch.float64)
        perturb(PrefixModel(model, prefix_token_num=3))
        results.append(output(model, inputs))
    # float64 throughout, yet eager attention takes its softmax in float32 (transformers' own code)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-7)


def test_detaching_restores_the_attention_modules_own_config():
    model = tiny_model("llama")
    config = model.model.layers[0].self_attn.config
    delta = PrefixModel(model)
    assert model.model.layers[0].self_attn.config is not config
    assert model.model.layers[0].self_attn.config._attn_implementation == "delta_prefix"
    assert model.config._attn_implementation == "sdpa"  # the model's own config is untouched
    delta.detach()
    assert model.model.layers[0].self_attn.config is config
