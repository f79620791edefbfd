"""Training steps compared with PEFT: outputs *and gradients*, in train mode with dropout, in
float64 so that the tolerance (1e-10) tells rounding from a bug.

The same delta tensors go to PEFT through ``export_peft``; both models then run the same input
from the same random seed, so every dropout mask is the same draw on both sides.
"""

import pytest
import torch
from peft import PeftModel, PromptTuningConfig, TaskType, get_peft_model

from engine import export_peft, import_peft, method_for
from tests.engine.test_delta_matrix import perturb
from tests.engine.tiny import main_tensor, tiny_inputs, tiny_model

KINDS = ["bert", "gpt2", "llama"]
CASES = [
    ("lora", {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.3}),
    ("lora", {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.3, "use_rslora": True}),
    ("lora", {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.3, "use_dora": True}),
    ("lora", {"lora_r": 4, "rank_pattern": {r"[r].*\.0\..*": 2}, "alpha_pattern": {"attn.v": 3}}),
    ("ia3", {}),
    ("soft_prompt", {"soft_token_num": 3}),
]
TOLERANCE = {"rtol": 0, "atol": 1e-10}


def _ours(kind: str, method: str, options: dict):
    model = tiny_model(kind).double()
    delta = method_for(method)(model, **options).freeze_module()
    perturb(delta)
    return model, delta


def _peft_key(name: str) -> str:
    """A PEFT parameter name → the key PEFT saves it under."""
    name = name.replace(".default", "")
    if name.endswith("lora_magnitude_vector.weight"):
        name = name.removesuffix(".weight")
    if name.startswith("prompt_encoder.embedding.weight"):
        return "prompt_embeddings"
    return name


def _step(model, inputs, seed: int = 7):
    model.train()
    torch.manual_seed(seed)
    out = main_tensor(model(**inputs))
    out.pow(2).mean().backward()
    return out.detach()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method, options", CASES)
def test_a_training_step_matches_peft_in_outputs_and_gradients(kind, method, options, tmp_path):
    model, delta = _ours(kind, method, options)
    export_peft(delta, tmp_path)
    peft_model = _peft_twin(kind, delta, tmp_path)
    assert {p.dtype for p in peft_model.parameters() if p.requires_grad} == {torch.float64}
    inputs = tiny_inputs(kind)
    ours, theirs = _step(model, inputs), _step(peft_model, inputs)
    torch.testing.assert_close(ours, theirs, **TOLERANCE)
    exported = {k.removeprefix("base_model.model."): v for k, v in _grads_by_peft_key(delta).items()}
    peft_grads = {_peft_key(n).removeprefix("base_model.model."): p.grad
                  for n, p in peft_model.named_parameters() if p.requires_grad}
    assert set(peft_grads) == set(exported)
    for key, grad in peft_grads.items():
        assert grad is not None and grad.abs().sum() > 0, key
        torch.testing.assert_close(exported[key].reshape(grad.shape), grad, **TOLERANCE, msg=key)


def _peft_twin(kind: str, delta, directory):
    """PEFT's model with our delta's tensors, ready to train (PEFT will not load a prompt-learning
    adapter as trainable, so prompt tuning is built by PEFT and given our prompt)."""
    if delta.delta_type != "soft_prompt":
        return PeftModel.from_pretrained(tiny_model(kind).double(), directory, is_trainable=True)
    task = TaskType.FEATURE_EXTRACTION if kind == "bert" else TaskType.CAUSAL_LM
    soft = next(iter(delta.delta_modules.values())).soft_embeds
    twin = get_peft_model(tiny_model(kind).double(), PromptTuningConfig(task_type=task, num_virtual_tokens=soft.shape[0]))
    twin.prompt_encoder.double()
    with torch.no_grad():
        twin.prompt_encoder.default.embedding.weight.copy_(soft)
    return twin


def _grads_by_peft_key(delta) -> dict[str, torch.Tensor]:
    """Our gradients under the keys export_peft writes (the tensors' shapes aside)."""
    from engine.interop.peft import _peft_tensors

    grads = {key: tensor.grad for key, tensor in delta.delta_state().items()}
    names = list(_peft_tensors(delta))
    if delta.delta_type == "soft_prompt":
        return {"prompt_embeddings": next(iter(grads.values()))}
    return {name: grads[name.removeprefix("base_model.model.")] for name in names}


def test_dropout_really_draws_masks_in_training_and_none_in_eval():
    model, delta = _ours("llama", "lora", {"lora_dropout": 0.5})
    inputs = tiny_inputs("llama")
    model.train()
    torch.manual_seed(1)
    first = main_tensor(model(**inputs))
    torch.manual_seed(2)
    assert not torch.equal(first, main_tensor(model(**inputs)))
    model.eval()
    assert torch.equal(main_tensor(model(**inputs)), main_tensor(model(**inputs)))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_soft_prompt_labels_are_padded_with_ignore_index(kind):
    model, delta = _ours(kind, "soft_prompt", {"soft_token_num": 3})
    model.eval()
    ids = tiny_inputs(kind)["input_ids"]
    with torch.no_grad():
        result = model(input_ids=ids, labels=ids)
        # the prompt's positions carry no label; the last one predicts the first real token, and
        # each real token the next (the loss runs in float32)
        logits = result.logits[:, 2:-1].float()
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))
    assert result.logits.shape[1] == ids.shape[1] + 3
    torch.testing.assert_close(result.loss, expected, rtol=0, atol=1e-6)


def test_dora_saves_and_loads_back_bit_for_bit_natively_and_through_peft(tmp_path):
    from engine import AutoDeltaModel

    model, delta = _ours("llama", "lora", {"use_dora": True, "lora_r": 2})
    inputs = tiny_inputs("llama")
    model.eval()
    with torch.no_grad():
        expected = main_tensor(model(**inputs))
    delta.save_finetuned(tmp_path / "native")
    export_peft(delta, tmp_path / "peft")
    for load in (lambda m: AutoDeltaModel.from_finetuned(tmp_path / "native", m),
                 lambda m: import_peft(tmp_path / "peft", m)):
        fresh = tiny_model("llama").double()
        loaded = load(fresh)
        assert loaded.config.use_dora
        with torch.no_grad():
            assert torch.equal(main_tensor(fresh(**inputs)), expected)
