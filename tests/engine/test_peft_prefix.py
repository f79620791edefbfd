"""PEFT's prefix tuning both ways, on a decoder (llama, rotary) and an encoder (bert, absolute
positions), with and without ``prefix_projection``: equal outputs and gradients, in float64."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model

from engine import ConfigError, PrefixModel, export_peft, import_peft
from engine.interop.peft_prefix import prefix_tensors
from tests.engine.tiny import main_tensor, tiny_inputs, tiny_model

TASKS = {"llama": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION"}


def _inputs(kind):
    inputs = tiny_inputs(kind)
    inputs["attention_mask"][1, -2:] = 0  # a padded row: the prefix stays visible, padding does not
    return inputs


def _peft_prefix(kind, projection, directory):
    config = PrefixTuningConfig(task_type=TASKS[kind], num_virtual_tokens=3, prefix_projection=projection,
                                encoder_hidden_size=16)
    model = get_peft_model(tiny_model(kind, dtype=torch.float64), config)
    model.prompt_encoder.double()  # PEFT builds it in float32: the comparison runs in float64
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    model.save_pretrained(directory)
    return model.eval()


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_a_peft_prefix_imports_with_equal_outputs(kind, projection, tmp_path):
    inputs = _inputs(kind)
    theirs = _peft_prefix(kind, projection, tmp_path)
    with torch.no_grad():
        expected = main_tensor(theirs(**inputs))
    model = tiny_model(kind, dtype=torch.float64)
    delta = import_peft(tmp_path, model)
    assert delta.delta_type == "prefix" and delta.config.shift_positions
    with torch.no_grad():
        got = main_tensor(model(**inputs))
    plain = main_tensor(tiny_model(kind, dtype=torch.float64)(**inputs))
    assert (expected - plain).abs().max() > 1e-2  # the prefix matters
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_gradients_of_an_imported_prefix_equal_peft_s(kind, tmp_path):
    inputs = _inputs(kind)
    theirs = _peft_prefix(kind, False, tmp_path)  # the model PEFT trains (PEFT loads prefixes frozen only)
    model = tiny_model(kind, dtype=torch.float64)
    delta = import_peft(tmp_path, model, is_trainable=True)
    main_tensor(theirs(**inputs)).pow(2).sum().backward()
    main_tensor(model(**inputs)).pow(2).sum().backward()
    their_grad = theirs.prompt_encoder.default.embedding.weight.grad
    ours = []
    for path in delta.modified_paths:
        layer = delta.delta_modules[path.replace(".", "/")]
        ours += [layer.prefix_key.grad.transpose(0, 1).flatten(1), layer.prefix_value.grad.transpose(0, 1).flatten(1)]
    assert their_grad.abs().max() > 0
    torch.testing.assert_close(torch.cat(ours, dim=1), their_grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_a_prefix_exports_to_peft_with_equal_outputs(kind, tmp_path):
    inputs = _inputs(kind)
    model = tiny_model(kind, dtype=torch.float64)
    delta = PrefixModel(model, prefix_token_num=4, shift_positions=True, embed_dim=8, mid_dim=8)
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in delta.parameters():
            parameter.normal_()
        ours = main_tensor(model(**inputs))
    export_peft(delta, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_virtual_tokens"], config["num_layers"]) == ("PREFIX_TUNING", 4, 2)
    assert prefix_tensors(delta)["prompt_embeddings"].shape == (4, 2 * 2 * config["token_dim"])
    theirs = PeftModel.from_pretrained(tiny_model(kind, dtype=torch.float64), tmp_path).eval()
    table = theirs.prompt_encoder.default.embedding.weight
    exact = prefix_tensors(delta)["prompt_embeddings"]
    assert torch.equal(table, exact.float())  # PEFT loads the file's values into a float32 table
    theirs.prompt_encoder.double()
    with torch.no_grad():
        theirs.prompt_encoder.default.embedding.weight.copy_(exact)
        torch.testing.assert_close(main_tensor(theirs(**inputs)), ours, rtol=0, atol=1e-10)
    back = import_peft(tmp_path, tiny_model(kind, dtype=torch.float64))
    with torch.no_grad():
        torch.testing.assert_close(main_tensor(back.backbone_model(**inputs)), ours, rtol=0, atol=1e-12)


def test_prefixes_peft_would_compute_otherwise_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="shift_positions=True"):
        export_peft(PrefixModel(tiny_model("llama"), prefix_token_num=2), tmp_path / "a")
    with pytest.raises(ConfigError, match="every one of the model's 2 attention layers"):
        export_peft(PrefixModel(tiny_model("llama"), ["layers.0.self_attn"], prefix_token_num=2,
                                shift_positions=True), tmp_path / "b")
    with pytest.raises(ConfigError, match="encoder-decoder"):
        export_peft(PrefixModel(tiny_model("t5"), prefix_token_num=2, shift_positions=True), tmp_path / "c")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_positions_the_caller_gives_move_past_the_prefix_as_in_peft(kind, tmp_path):
    """PEFT adds num_virtual_tokens to position_ids a caller passes (generate() passes them)."""
    inputs = _inputs(kind)
    inputs["position_ids"] = torch.tensor([[0, 1, 2, 3, 4, 5], [2, 3, 4, 5, 6, 7]])
    theirs = _peft_prefix(kind, False, tmp_path)
    model = tiny_model(kind, dtype=torch.float64)
    import_peft(tmp_path, model)
    with torch.no_grad():
        expected = main_tensor(theirs(**inputs))
        got = main_tensor(model(**inputs))
        unshifted = main_tensor(theirs(**{**inputs, "position_ids": inputs["position_ids"] - 3}))
    assert (expected - unshifted).abs().max() > 1e-3  # the positions matter
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_generate_with_an_imported_prefix_scores_as_peft_s_forward(tmp_path):
    """Each step of our greedy ``generate()`` (which passes position_ids) scores the next token as
    PEFT's forward scores the same text. (PEFT 0.21's own generate() on transformers 5 disagrees
    with its own forward, so its forward is the reference.)"""
    inputs = tiny_inputs("llama")
    theirs = _peft_prefix("llama", False, tmp_path)
    model = tiny_model("llama", dtype=torch.float64)
    import_peft(tmp_path, model)
    got = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True,
                         return_dict_in_generate=True)
    with torch.no_grad():
        expected = main_tensor(theirs(input_ids=got.sequences, attention_mask=torch.ones_like(got.sequences)))
    start = inputs["input_ids"].shape[1]
    for step, scores in enumerate(got.scores):
        torch.testing.assert_close(scores.double(), expected[:, start - 1 + step], rtol=0, atol=1e-5)
