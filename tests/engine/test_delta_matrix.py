"""The method × architecture matrix: no-op attach, training touches only deltas, exact detach,
exact save/load. Every method runs with its default positions on every tiny model."""

import pytest
import torch
from safetensors import safe_open

from engine import AutoDeltaModel, DeltaBase, method_for, registered_methods
from tests.engine.tiny import main_tensor, tiny_inputs, tiny_model

KINDS = ["bert", "gpt2", "t5", "llama", "opt"]
METHODS = sorted(registered_methods())
NOT_ZERO_INIT = {"prefix", "soft_prompt"}  # they add attention targets / tokens by design
ZERO_INIT = [m for m in METHODS if m not in NOT_ZERO_INIT]
#: tiny models have 64 positions: a 100-token soft prompt would not fit
OPTIONS = {"soft_prompt": {"soft_token_num": 4}}
#: IA3 trains a few hundred scaling factors: it needs (and is usually given) a larger step
LEARNING_RATE = {"ia3": 1e-1}


def build(method: str, model, **options):
    return method_for(method)(model, **{**OPTIONS.get(method, {}), **options})
MATRIX = [(m, k) for m in METHODS for k in KINDS]


def output(model, inputs):
    with torch.no_grad():
        return main_tensor(model(**inputs))


def perturb(delta: DeltaBase, seed: int = 0) -> None:
    """Give every delta tensor non-zero values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in delta.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def backbone_snapshot(model, delta) -> dict[str, torch.Tensor]:
    delta_ids = {id(p) for p in delta.parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in delta_ids}


@pytest.mark.parametrize("method", ZERO_INIT)
@pytest.mark.parametrize("kind", KINDS)
def test_attaching_a_zero_initialised_delta_changes_nothing(method, kind):
    model, inputs = tiny_model(kind), tiny_inputs(kind)
    before = output(model, inputs)
    build(method, model)
    assert torch.equal(output(model, inputs), before)


@pytest.mark.parametrize("method, kind", MATRIX)
def test_training_lowers_the_loss_and_changes_only_delta_tensors(method, kind):
    model, inputs = tiny_model(kind), tiny_inputs(kind)
    delta = build(method, model)
    delta.freeze_module(exclude=["deltas"])
    frozen = backbone_snapshot(model, delta)
    target = torch.randn_like(output(model, inputs), generator=torch.Generator().manual_seed(3))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in delta.parameters()}
    optimizer = torch.optim.Adam(trainable, lr=LEARNING_RATE.get(method, 1e-2))
    losses = []  # eval mode: no dropout noise, the deltas alone decide the loss
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(main_tensor(model(**inputs)), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.99, losses
    assert sum(after < before for before, after in zip(losses, losses[1:])) >= 15, losses
    for name, tensor in backbone_snapshot(model, delta).items():
        assert torch.equal(tensor, frozen[name]), f"backbone tensor {name} changed"
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)


def hook_counts(model) -> dict[str, tuple[int, int, int]]:
    """Every module's forward hooks, pre-hooks and attention config (prefix): what wiring changes."""
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks), id(getattr(m, "config", None)))
            for name, m in model.named_modules()}


@pytest.mark.parametrize("method, kind", MATRIX)
def test_detach_restores_exact_outputs_and_attach_restores_the_delta(method, kind):
    model, inputs = tiny_model(kind), tiny_inputs(kind)
    original = output(model, inputs)
    wiring = hook_counts(model)
    delta = build(method, model)
    perturb(delta)
    with_delta = output(model, inputs)
    assert not torch.equal(with_delta, original)
    delta.detach()
    assert torch.equal(output(model, inputs), original)
    assert not any(getattr(m, "is_delta_module", False) for m in model.modules())
    assert hook_counts(model) == wiring, "detach must remove every hook it added"
    delta.attach()
    assert torch.equal(output(model, inputs), with_delta)


ROUTED = [(m, r) for m in METHODS for r in method_for(m).config_class.routes if len(method_for(m).config_class.routes) > 1]


@pytest.mark.parametrize("method, route", ROUTED)
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_every_route_changes_the_output_and_detaches_without_a_trace(method, route, kind):
    model, inputs = tiny_model(kind), tiny_inputs(kind)
    original, wiring = output(model, inputs), hook_counts(model)
    # the tiny FFN width (37) is prime: compacter's hypercomplex blocks go on the 32-wide attention output
    delta = build(method, model, route=route, **({"modified_modules": ["attn.o"]} if method == "compacter" else {}))
    perturb(delta)
    assert not torch.equal(output(model, inputs), original)
    delta.detach()
    assert hook_counts(model) == wiring
    assert torch.equal(output(model, inputs), original)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("order", [(0, 1, 2), (1, 0, 2), (2, 1, 0)])
def test_three_deltas_on_the_same_modules_detach_in_any_order(kind, order):
    model, inputs = tiny_model(kind), tiny_inputs(kind)
    original = output(model, inputs)
    deltas = [method_for("lora")(model, name=f"lora_{i}") for i in range(3)]
    for seed, delta in enumerate(deltas):
        perturb(delta, seed)
    remaining = [0, 1, 2]
    for index in order:
        deltas[index].detach()
        remaining.remove(index)
        expected_model = tiny_model(kind)
        for i in remaining:  # a fresh backbone with only the remaining deltas, same tensors
            fresh = method_for("lora")(expected_model, name=f"lora_{i}")
            fresh.load_state_dict(deltas[i].state_dict())
        torch.testing.assert_close(output(model, inputs), output(expected_model, inputs),
                                   rtol=0, atol=1e-6)
    assert torch.equal(output(model, inputs), original)


@pytest.mark.parametrize("method, kind", MATRIX)
def test_save_then_load_on_a_fresh_backbone_reproduces_outputs(method, kind, tmp_path):
    model, inputs = tiny_model(kind), tiny_inputs(kind)
    delta = build(method, model).freeze_module()
    perturb(delta)
    expected = output(model, inputs)
    delta.save_finetuned(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "delta.safetensors"]
    with safe_open(str(tmp_path / "delta.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert keys == set(delta.delta_state())
    assert sum(
        safe_open(str(tmp_path / "delta.safetensors"), framework="pt").get_tensor(k).numel()
        for k in keys
    ) == delta.num_delta_parameters()
    fresh = tiny_model(kind)
    loaded = AutoDeltaModel.from_finetuned(tmp_path, backbone_model=fresh)
    assert type(loaded) is type(delta) and loaded.modified_paths == delta.modified_paths
    assert torch.equal(output(fresh, inputs), expected)
