"""Mixed-task batches: each row of one forward runs its own task's delta (engine.tasks)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

import engine
from engine import DeltaError, DeltaStateError
from tests.engine.tiny import main_tensor, tiny_model

TASKS = ["a", "b", None, "a", "b"]

# method → (default-position kwargs, or explicit kwargs per model kind)
METHODS: dict[str, dict[str, Any]] = {
    "lora": {"delta_type": "lora", "modified_modules": ["attn.q", "attn.v", "ff.w2"], "lora_dropout": 0.1},
    "dora": {"delta_type": "lora", "modified_modules": ["attn.q", "attn.v"], "use_dora": True, "lora_dropout": 0.1},
    "lora_embedding": {"delta_type": "lora", "modified_modules": ["embeddings"], "common_structure": True},
    "adapter": {"delta_type": "adapter"},
    "low_rank_adapter": {"delta_type": "low_rank_adapter"},
    "parallel_adapter": {"delta_type": "parallel_adapter"},
    "parallel_pair": {"delta_type": "parallel_adapter", "route": "parallel_pair"},
    "compacter": {"delta_type": "compacter"},
    "ia3": {"delta_type": "ia3"},
    "bitfit": {"delta_type": "bitfit"},
    "prefix": {"delta_type": "prefix", "reparameterize": False},
    "prefix_mlp": {"delta_type": "prefix", "reparameterize": True},
}
KINDS = ["bert", "gpt2", "llama", "t5", "opt"]  # OPT flattens tokens into the batch dimension in its FFN


def _make(model: torch.nn.Module, method: str, name: str, seed: int) -> engine.DeltaBase:
    settings = dict(METHODS[method])
    if method == "parallel_pair" and model.config.model_type == "t5":  # self-attention → its layer's FFN
        settings["modified_modules"] = [r"[r].*\.layer\.0\.SelfAttention"]
    config = engine.AutoDeltaConfig.from_dict({**settings, "name": name})
    delta = engine.AutoDeltaModel.from_config(config, model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every delta visibly different from zero and from the other task's
        for parameter in delta.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return delta


def _inputs(kind: str, rows: int, left_pad: bool = False) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 99, (rows, 6), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # one padded row (left padding)
    if not left_pad:
        mask = mask.flip(-1)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if kind == "t5":
        inputs["decoder_input_ids"] = torch.randint(3, 99, (rows, 4), generator=generator)
    return inputs


def _row(inputs: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    return {k: v[index : index + 1] for k, v in inputs.items()}


def _alone(deltas: dict[str, engine.DeltaBase], task: str | None, run: Any) -> Any:
    """``run()`` with only the delta of ``task`` attached."""
    others = [d for n, d in deltas.items() if n != task]
    for delta in others:
        delta.detach()
    try:
        return run()
    finally:
        for delta in others:
            delta.attach()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("mode", ["eval", "inference"])
def test_each_row_of_a_mixed_batch_equals_that_row_alone_with_only_its_delta(kind, method, mode):
    model = tiny_model(kind, dtype=torch.float64)  # so that rounding cannot hide a wrong row
    deltas = {name: _make(model, method, name, seed) for seed, name in enumerate(("a", "b"))}
    inputs = _inputs(kind, len(TASKS))
    context = torch.inference_mode() if mode == "inference" else torch.no_grad()
    with context:
        with engine.tasks(model, TASKS):
            mixed = main_tensor(model(**inputs))
        for index, task in enumerate(TASKS):
            alone = _alone(deltas, task, lambda i=index: main_tensor(model(**_row(inputs, i))))
            assert (mixed[index] - alone[0]).abs().max().item() <= 1e-12, (index, task)
    # and the two tasks really differ from each other and from the bare backbone
    assert (mixed[0] - mixed[1]).abs().max() > 1e-3 or method == "lora_embedding"


@pytest.mark.parametrize("kind", KINDS)
def test_tasks_are_told_apart_by_the_exact_bare_backbone_on_rows_of_none(kind):
    model = tiny_model(kind)
    inputs = _inputs(kind, 3)
    with torch.no_grad():
        bare = main_tensor(model(**inputs))
        _make(model, "lora", "a", 0)
        _make(model, "adapter", "b", 1)
        with engine.tasks(model, [None, "a", None]):
            mixed = main_tensor(model(**inputs))
    assert torch.equal(mixed[0], bare[0]) and torch.equal(mixed[2], bare[2])  # bit-exact
    assert not torch.allclose(mixed[1], bare[1])


def test_several_deltas_on_the_same_module_each_apply_to_their_own_rows_only():
    model = tiny_model("llama", dtype=torch.float64)
    deltas = {"a": _make(model, "lora", "a", 0), "b": _make(model, "lora", "b", 1),
              "c": _make(model, "ia3", "c", 2)}
    inputs = _inputs("llama", 4)
    tasks = ["c", "b", "a", None]
    with torch.no_grad():
        with engine.tasks(model, tasks):
            mixed = main_tensor(model(**inputs))
        for index, task in enumerate(tasks):
            alone = _alone(deltas, task, lambda i=index: main_tensor(model(**_row(inputs, i))))
            assert (mixed[index] - alone[0]).abs().max().item() <= 1e-12


@pytest.mark.parametrize("method", ["lora", "adapter", "prefix"])
def test_training_on_a_mixed_batch_gives_each_delta_the_gradient_of_its_own_rows(method):
    model = tiny_model("gpt2", dtype=torch.float64)
    deltas = {name: _make(model, method, name, seed) for seed, name in enumerate(("a", "b"))}
    inputs = _inputs("gpt2", len(TASKS))
    weights = torch.randn(main_tensor(model(**inputs)).shape, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(3))
    with engine.tasks(model, TASKS):
        (main_tensor(model(**inputs)) * weights).sum().backward()
    mixed = {n: [p.grad.clone() for p in d.parameters()] for n, d in deltas.items()}
    for delta in deltas.values():
        delta.zero_grad()
    for name in ("a", "b"):
        rows = [i for i, t in enumerate(TASKS) if t == name]

        def run(rows: list[int] = rows) -> None:
            for row in rows:
                (main_tensor(model(**_row(inputs, row))) * weights[row : row + 1]).sum().backward()

        _alone(deltas, name, run)
        for got, parameter in zip(mixed[name], deltas[name].parameters()):
            assert parameter.grad is not None and (got - parameter.grad).abs().max().item() <= 1e-10
        deltas[name].zero_grad()


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5"])
@pytest.mark.parametrize("method", ["lora", "prefix", "adapter"])
def test_generate_with_a_cache_and_left_padding_matches_each_row_alone(kind, method):
    model = tiny_model(kind)
    model.generation_config.pad_token_id = 0
    deltas = {name: _make(model, method, name, seed) for seed, name in enumerate(("a", "b"))}
    inputs = {k: v for k, v in _inputs(kind, len(TASKS), left_pad=True).items() if k != "decoder_input_ids"}
    settings = {"max_new_tokens": 5, "do_sample": False, "use_cache": True,
                "output_scores": True, "return_dict_in_generate": True}
    with torch.inference_mode():
        with engine.tasks(model, TASKS):
            mixed = model.generate(**inputs, **settings)
        for index, task in enumerate(TASKS):
            alone = _alone(deltas, task, lambda i=index: model.generate(**_row(inputs, i), **settings))
            assert torch.equal(mixed.sequences[index], alone.sequences[0]), (index, task)
            for step_mixed, step_alone in zip(mixed.scores, alone.scores):
                assert (step_mixed[index] - step_alone[0]).abs().max().item() <= 1e-5


def test_beam_search_repeats_each_rows_task_over_its_beams():
    model = tiny_model("gpt2")
    model.generation_config.pad_token_id = 0
    deltas = {name: _make(model, "lora", name, seed) for seed, name in enumerate(("a", "b"))}
    inputs = {k: v for k, v in _inputs("gpt2", 3, left_pad=True).items()}
    settings = {"max_new_tokens": 4, "do_sample": False, "num_beams": 3}
    tasks = ["b", "a", None]
    with torch.inference_mode():
        with engine.tasks(model, tasks):
            mixed = model.generate(**inputs, **settings)
        for index, task in enumerate(tasks):
            alone = _alone(deltas, task, lambda i=index: model.generate(**_row(inputs, i), **settings))
            assert torch.equal(mixed[index], alone[0]), (index, task)


def test_an_unknown_task_id_is_an_error_naming_the_attached_deltas():
    model = tiny_model("bert")
    _make(model, "lora", "sst2", 0)
    _make(model, "adapter", "mnli", 1)
    with pytest.raises(DeltaError, match=r"unknown task id 'qnli'.*'mnli', 'sst2'"):
        with engine.tasks(model, ["sst2", "qnli"]):
            pass
    with pytest.raises(DeltaError, match="one task name"):
        with engine.tasks(model, "sst2"):
            pass
    with pytest.raises(DeltaError, match="delta names"):
        with engine.tasks(model, ["sst2", 3]):
            pass


def test_a_batch_whose_size_is_not_the_number_of_task_ids_is_an_error():
    model = tiny_model("bert")
    _make(model, "lora", "a", 0)
    inputs = _inputs("bert", 3)
    with engine.tasks(model, ["a", None]), pytest.raises(DeltaError, match="mixed-task batch of 2 rows.*3"):
        model(**inputs)
    model(**inputs)  # nothing left behind


def test_a_detached_delta_is_no_task_and_its_rows_are_refused_until_it_is_back():
    model = tiny_model("bert")
    deltas = {"a": _make(model, "lora", "a", 0), "b": _make(model, "lora", "b", 1)}
    inputs = _inputs("bert", 2)
    deltas["b"].detach()
    with torch.no_grad():
        with engine.tasks(model, ["a", None]):
            mixed = main_tensor(model(**inputs))
        only_a = main_tensor(model(**inputs))
        assert torch.allclose(mixed[0], only_a[0], atol=1e-6)
        with pytest.raises(DeltaError, match="unknown task id 'b'.*'a'"):
            with engine.tasks(model, ["a", "b"]):
                pass
        deltas["b"].attach()
        with engine.tasks(model, ["b", "a"]):
            model(**inputs)


@pytest.mark.parametrize("case", ["merged", "soft_prompt", "experts"])
def test_deltas_that_cannot_act_on_some_rows_only_are_refused_by_name(case):
    if case == "experts":
        import transformers

        torch.manual_seed(0)
        config = transformers.Qwen3MoeConfig(hidden_size=32, intermediate_size=37, moe_intermediate_size=16,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                             num_experts=4, num_experts_per_tok=2, vocab_size=99)
        model = transformers.Qwen3MoeForCausalLM(config).eval()
        engine.LoraModel(model, ["mlp.experts"], name="moe")
    else:
        model = tiny_model("gpt2")
        if case == "merged":
            engine.LoraModel(model, name="moe").merge()
        else:
            engine.SoftPromptModel(model, name="moe")
    engine.LoraModel(model, ["attn.q"] if case != "experts" else ["self_attn.q_proj"], name="ok")
    with pytest.raises(DeltaStateError, match="delta 'moe' cannot serve part of a mixed-task batch"):
        with engine.tasks(model, ["ok", None]):
            pass


def test_two_threads_run_mixed_batches_on_two_models_at_once():
    models = [tiny_model("bert", seed=s) for s in (0, 1)]
    for model in models:
        _make(model, "lora", "a", 0)
        _make(model, "adapter", "b", 1)
    inputs = _inputs("bert", 4)
    orders = [["a", "b", None, "a"], ["b", None, "a", "b"]]
    with torch.no_grad():
        expected = []
        for model, order in zip(models, orders):
            with engine.tasks(model, order):
                expected.append(main_tensor(model(**inputs)))
    failures: list[str] = []

    def serve(index: int) -> None:
        for _ in range(15):
            with torch.no_grad(), engine.tasks(models[index], orders[index]):
                got = main_tensor(models[index](**inputs))
            if not torch.equal(got, expected[index]):
                failures.append(f"model {index}")
            with torch.no_grad():  # outside the block the same thread runs every delta again
                models[index](**inputs)

    threads = [threading.Thread(target=serve, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_another_thread_outside_the_block_still_runs_every_attached_delta():
    model = tiny_model("bert")
    _make(model, "lora", "a", 0)
    inputs = _inputs("bert", 2)
    with torch.no_grad():
        full = main_tensor(model(**inputs))
        seen: list[torch.Tensor] = []
        with engine.tasks(model, [None, None]):
            bare = main_tensor(model(**inputs))
            worker = threading.Thread(target=lambda: seen.append(main_tensor(model(**inputs))))
            worker.start()
            worker.join()
    assert torch.equal(seen[0], full) and not torch.allclose(bare, full)


def test_lora_deltas_sharing_modules_are_computed_together_and_see_factor_changes():
    """Where every delta on a module is LoRA, one hook adds all rows' updates from factors
    stacked once and kept; changing a factor is seen by the next forward."""
    model = tiny_model("llama", dtype=torch.float64)
    deltas = {"a": _make(model, "lora", "a", 0), "b": _make(model, "lora", "b", 1)}
    with torch.no_grad():  # a different rank, padded with exact zeros
        deltas["c"] = engine.LoraModel(model, ["attn.q"], lora_r=3, name="c")
        deltas["c"].delta_modules[next(iter(deltas["c"].delta_modules))].lora_B.weight.normal_()
    first_layer = next(iter(deltas["a"].delta_modules.values()))
    inputs = _inputs("llama", 4)
    tasks = ["c", "a", None, "b"]

    def check(mixed: torch.Tensor) -> None:
        for index, task in enumerate(tasks):
            alone = _alone(deltas, task, lambda i=index: main_tensor(model(**_row(inputs, i))))
            assert (mixed[index] - alone[0]).abs().max().item() <= 1e-12, (index, task)

    with torch.no_grad():
        with engine.tasks(model, tasks):
            first = main_tensor(model(**inputs))
        stacked = first_layer.__dict__["_stacked_factors"][1]
        with engine.tasks(model, tasks):
            model(**inputs)
        assert first_layer.__dict__["_stacked_factors"][1] is stacked  # kept across batches
        first_layer.lora_B.weight.mul_(3)
        with engine.tasks(model, tasks):
            second = main_tensor(model(**inputs))
        assert first_layer.__dict__["_stacked_factors"][1] is not stacked
        assert not torch.allclose(first[1], second[1])
        check(second)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_merge_then_unmerge_of_the_first_lora_keeps_mixed_batches_exact(kind):
    """After the first LoRA is merged and unmerged, its hook runs after the second's: the layer
    whose hook runs first must add every row's update, and the other must not add its own again."""
    model = tiny_model(kind, dtype=torch.float64)
    deltas = {"a": _make(model, "lora", "a", 0), "b": _make(model, "lora", "b", 1)}
    deltas["a"].merge()
    deltas["a"].unmerge()
    inputs = _inputs(kind, 4)
    tasks = ["a", "b", None, "b"]
    with torch.no_grad():
        with engine.tasks(model, tasks):
            mixed = main_tensor(model(**inputs))
        for index, task in enumerate(tasks):
            alone = _alone(deltas, task, lambda i=index: main_tensor(model(**_row(inputs, i))))
            assert (mixed[index] - alone[0]).abs().max().item() <= 1e-10, (index, task)
