"""The engine keeps its runtime state in each delta and each call: threads working on separate
models, or planning on one shared meta backbone, never see each other's work."""

import ast
import threading
from pathlib import Path

import pytest
import torch
import transformers

import engine
from engine import (
    AdapterModel,
    AutoDeltaConfig,
    LoraModel,
    PrefixModel,
    estimate_delta,
    load_backbone,
    method_for,
)
from engine.locking import model_lock
from tests.engine.test_delta_matrix import output, perturb
from tests.engine.tiny import tiny_inputs, tiny_model

THREADS = 8


def run_in_threads(work, count: int = THREADS) -> list:
    """Run ``work(index)`` in ``count`` threads started together; re-raise the first failure."""
    barrier = threading.Barrier(count)
    results: list = [None] * count
    errors: list[BaseException] = []

    def target(index: int) -> None:
        barrier.wait()
        try:
            results[index] = work(index)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    if errors:
        raise errors[0]
    return results


def tiny_mixtral() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, vocab_size=99)
    return transformers.MixtralModel(config).eval()


IDS = torch.tensor([[5, 17, 3, 42, 8, 1]])


def test_expert_lora_serves_concurrent_inference_and_detaches_cleanly():
    model = tiny_mixtral()
    experts = model.layers[0].mlp.experts
    originals = {name: (p, p.detach().clone()) for name, p in experts.named_parameters(recurse=False)}
    plain = output(model, {"input_ids": IDS})
    delta = LoraModel(model, ["moe.experts"], lora_r=2)
    perturb(delta)
    expected = output(model, {"input_ids": IDS})
    assert not torch.equal(expected, plain)

    def serve(index: int) -> int:
        return sum(not torch.equal(output(model, {"input_ids": IDS}), expected) for _ in range(10))

    assert run_in_threads(serve) == [0] * THREADS  # every one of the 80 answers is right
    delta.detach()
    for name, (parameter, values) in originals.items():
        assert getattr(experts, name) is parameter and torch.equal(parameter, values)
    assert torch.equal(output(model, {"input_ids": IDS}), plain)
    delta.attach()
    assert torch.equal(output(model, {"input_ids": IDS}), expected)


def test_two_expert_loras_on_one_module_sum_their_updates():
    model = tiny_mixtral().double()
    model.set_experts_implementation("eager")  # grouped_mm runs float32 only
    first = LoraModel(model, ["moe.experts"], lora_r=2, name="first")
    second = AdapterModel(model, ["moe.experts"], name="between", bottleneck_dim=2)
    third = LoraModel(model, ["moe.experts"], lora_r=3, name="third")
    for seed, delta in enumerate((first, second, third)):
        perturb(delta, seed)
    combined = output(model, {"input_ids": IDS})
    reference = tiny_mixtral().double()
    reference.set_experts_implementation("eager")
    for path in first.modified_paths:
        module = dict(reference.named_modules())[path]
        with torch.no_grad():
            for name in first.delta_modules[path.replace(".", "/")].names:
                update = sum(d.delta_modules[path.replace(".", "/")].update(name) for d in (first, third))
                getattr(module, name).add_(update)
    again = AdapterModel(reference, ["moe.experts"], name="between", bottleneck_dim=2)
    again.load_state_dict(second.state_dict())
    torch.testing.assert_close(output(reference, {"input_ids": IDS}), combined, rtol=0, atol=1e-10)


def test_eight_threads_attach_forward_and_detach_on_their_own_models():
    kinds = ["bert", "gpt2", "llama", "t5"]

    def work(index: int) -> bool:
        kind = kinds[index % len(kinds)]
        model, inputs = tiny_model(kind), tiny_inputs(kind)
        plain = output(model, inputs)
        for method in ("lora", "adapter", "prefix", "ia3"):
            delta = method_for(method)(model)
            perturb(delta, index)
            changed = output(model, inputs)
            delta.detach()
            if not torch.equal(output(model, inputs), plain):
                return False
            delta.attach()
            if not torch.equal(output(model, inputs), changed):
                return False
            delta.detach()
        return True

    assert run_in_threads(work) == [True] * THREADS


def test_eight_threads_plan_and_build_on_one_shared_meta_backbone():
    model = load_backbone("catalog:llama-3-8b").model
    configs = {
        "prefix": {"delta_type": "prefix", "reparameterize": False, "prefix_token_num": 4},
        "lora": {"delta_type": "lora", "lora_r": 4},
        "adapter": {"delta_type": "adapter", "modified_modules": ["mlp"], "bottleneck_dim": 8},
    }
    sequential = {name: estimate_delta(model, AutoDeltaConfig.from_dict(c)).total for name, c in configs.items()}
    assert sequential["prefix"] == 32 * 2 * 4 * 1024

    def work(index: int) -> dict[str, int]:
        counts: dict[str, int] = {}
        for round_ in range(3):
            for name, config in configs.items():
                counts[name] = estimate_delta(model, AutoDeltaConfig.from_dict(config)).total
            built = method_for("prefix")(model, name=f"prefix_{index}_{round_}", reparameterize=False,
                                          prefix_token_num=4)
            counts["built"] = built.num_trainable_parameters()
            built.detach()
        return counts

    expected = {**sequential, "built": sequential["prefix"]}
    assert run_in_threads(work) == [expected] * THREADS
    assert not any(getattr(m, "is_delta_module", False) for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_a_probe_in_one_thread_never_stops_another_threads_forward():
    model, inputs = tiny_model("llama"), tiny_inputs("llama")
    plain = output(model, inputs)
    stop = threading.Event()
    wrong: list[int] = []

    def serve() -> None:
        while not stop.is_set():
            if not torch.equal(output(model, inputs), plain):
                wrong.append(1)

    server = threading.Thread(target=serve)
    server.start()
    try:
        for round_ in range(20):  # each build probes the model with hooks and pseudo inputs
            PrefixModel(model, attach=False, name=f"p{round_}")
            AdapterModel(model, ["mlp"], attach=False, name=f"a{round_}")
    finally:
        stop.set()
        server.join()
    assert not wrong


# --- no module-level mutable state --------------------------------------------------------------

MUTABLE_CALLS = {"dict", "list", "set", "defaultdict", "OrderedDict", "WeakKeyDictionary",
                 "WeakValueDictionary", "Counter", "deque", "bytearray"}
#: module-level names that are mutable on purpose, each with its reason
ALLOWED = {("registry.py", "REGISTRY"): "the method registry: written by registration only, under its lock"}


def module_level_mutables(path: Path, root: Path) -> list[str]:
    found = []
    for node in ast.parse(path.read_text()).body:
        targets, value = [], None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        if value is None:
            continue
        mutable = isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)) or (
            isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", None)) in MUTABLE_CALLS)
        mutable |= isinstance(value, ast.Call) and getattr(value.func, "id", None) == "MethodRegistry"
        for target in targets:
            name = getattr(target, "id", None)
            if mutable and name and name != "__all__" and (path.name, name) not in ALLOWED:
                found.append(f"{path.relative_to(root)}:{node.lineno} {name}")
    return found


ENGINE = Path(engine.__file__).parent


def test_the_engine_has_no_module_level_mutable_state():
    """Every module-level value in engine/ is immutable (tuples, frozensets, MappingProxyType),
    except the registry, which is locked."""
    found = [hit for path in sorted(ENGINE.rglob("*.py")) for hit in module_level_mutables(path, ENGINE.parent)]
    assert not found, found


def test_the_state_check_would_see_a_module_level_table(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("import weakref\n_TABLE: dict = {}\n_CACHE = weakref.WeakKeyDictionary()\nOK = (1, 2)\n")
    assert module_level_mutables(planted, tmp_path) == ["planted.py:2 _TABLE", "planted.py:3 _CACHE"]


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_a_model_lock_copies_as_a_fresh_lock(kind):
    import copy
    import pickle

    model = tiny_model(kind)
    LoraModel(model).detach()  # the model now carries its lock
    copied, unpickled = copy.deepcopy(model), pickle.loads(pickle.dumps(model))
    for other in (copied, unpickled):
        assert model_lock(other) is not model_lock(model)
        LoraModel(other)
