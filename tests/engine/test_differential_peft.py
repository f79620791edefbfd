"""Generated differential tests against PEFT: hypothesis draws an architecture (tiny BERT, GPT-2,
Llama, T5, OPT with random non-zero biases and norm weights ≠ 1), a method (LoRA, rsLoRA, DoRA,
rank/alpha patterns, IA3, prompt tuning, prefix tuning), targets, rank, alpha and dropout, and then a sequence of operations —
training steps (forward, backward, an SGD update on both sides), eval forwards, save and load,
merge and unmerge, detach and attach, export to PEFT, import from PEFT, a mixed-task batch — and
after each one compares the outputs and every gradient with PEFT's, in float64 at 1e-10.

PEFT's model gets our delta's tensors through ``export_peft`` once; from then on both sides
evolve independently (each updates its own tensors from its own gradients), so a slip anywhere —
forward, backward, persistence, interop — shows up as a difference at a later step.

``make test`` runs a fixed set of examples; ``make fuzz`` runs many random ones.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from peft import PeftModel
from safetensors.torch import load_file

import engine
from engine import AutoDeltaModel, export_peft, import_peft, method_for
from tests.engine.test_against_peft import _grads_by_peft_key, _peft_key
from tests.engine.tiny import main_tensor, tiny_inputs, tiny_model, with_nonzero_biases

EXAMPLES = 400 if os.environ.get("DELTA_HYPOTHESIS_PROFILE") == "fuzz" else 12
TOLERANCE = {"rtol": 0, "atol": 1e-10}
KINDS = ["bert", "gpt2", "llama", "t5", "opt"]
TARGETS = [["attn.q", "attn.v"], ["attn.k", "attn.o"], ["attn.q", "ff.w2"], ["attn.v", "ff.w1", "ff.w2"]]
OPERATIONS = ["train_step", "train_step", "eval", "save_load", "merge_unmerge", "detach_attach", "export",
              "import", "mixed_batch"]


#: prompt methods and the architectures PEFT runs them on here (prefixes: decoder and encoder)
PROMPTS = {"soft_prompt": (["bert", "gpt2", "llama"], {"soft_token_num": 3}),
           "prefix": (["bert", "llama"], {"prefix_token_num": 3, "reparameterize": False, "shift_positions": True})}


@st.composite
def scenarios(draw: Any) -> dict[str, Any]:
    method = draw(st.sampled_from(["lora", "rslora", "dora", "patterns", "ia3", *PROMPTS]))
    if method in PROMPTS:
        kinds, options = PROMPTS[method]
        return {"kind": draw(st.sampled_from(kinds)), "delta_type": method, "options": dict(options),
                "operations": draw(st.lists(st.sampled_from([o for o in OPERATIONS if o != "mixed_batch"]),
                                            min_size=3, max_size=7)),
                "seed": draw(st.integers(0, 2**16))}
    targets = draw(st.sampled_from(TARGETS))
    options: dict[str, Any]
    if method == "ia3":
        options = {"modified_modules": [*targets, "ff.w2"] if "ff.w2" not in targets else targets,
                   "feedforward_modules": ["ff.w2"]}
    else:
        options = {"modified_modules": targets, "lora_r": draw(st.sampled_from([1, 2, 4])),
                   "lora_alpha": draw(st.sampled_from([1, 4, 8, 16.5])),
                   "lora_dropout": draw(st.sampled_from([0.0, 0.1, 0.3])),
                   "use_rslora": method == "rslora", "use_dora": method == "dora"}
        if method == "patterns":
            options["rank_pattern"] = {r"[r].*\.1\..*": draw(st.sampled_from([1, 3]))}
            options["alpha_pattern"] = {targets[0]: draw(st.sampled_from([2, 5.5]))}
    return {"kind": draw(st.sampled_from(KINDS)), "delta_type": "ia3" if method == "ia3" else "lora",
            "options": options, "operations": draw(st.lists(st.sampled_from(OPERATIONS), min_size=3, max_size=7)),
            "seed": draw(st.integers(0, 2**16))}


class Twins:
    """Our model with its delta and PEFT's model with the same tensors, stepped side by side."""

    def __init__(self, scenario: dict[str, Any], directory: Any) -> None:
        self.kind = scenario["kind"]
        self.directory = directory
        self.count = 0
        self.base = with_nonzero_biases(tiny_model(self.kind, dtype=torch.float64), seed=scenario["seed"])
        self.model = copy.deepcopy(self.base)
        self.delta = method_for(scenario["delta_type"])(self.model, **scenario["options"]).freeze_module()
        generator = torch.Generator().manual_seed(scenario["seed"])
        with torch.no_grad():
            for parameter in self.delta.parameters():
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
        self.theirs = self._peft_from(self._export())
        self.inputs = tiny_inputs(self.kind)

    def _folder(self) -> Any:
        self.count += 1
        return self.directory / f"step-{self.count}"

    def _export(self) -> Any:
        folder = self._folder()
        export_peft(self.delta, folder)
        return folder

    def _peft_from(self, folder: Any) -> PeftModel:
        prompt = self.delta.delta_type in PROMPTS  # PEFT loads prompts only frozen, in float32
        model = PeftModel.from_pretrained(copy.deepcopy(self.base), folder, is_trainable=not prompt)
        if prompt:  # the file's exact float64 values (PEFT rounded them through float32)
            model.prompt_encoder.double()
            table = load_file(str(folder / "adapter_model.safetensors"))["prompt_embeddings"]
            with torch.no_grad():
                model.prompt_encoder.default.embedding.weight.copy_(table)
            model.prompt_encoder.requires_grad_(True)
        return model

    def outputs(self, training: bool, seed: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
        results = []
        for model in (self.model, self.theirs):
            model.train(training)
            torch.manual_seed(seed)  # the same dropout masks on both sides: same draws, same order
            results.append(main_tensor(model(**self.inputs)))
        return results[0], results[1]

    def compare(self, training: bool = False) -> None:
        with torch.no_grad():
            ours, theirs = self.outputs(training)
        torch.testing.assert_close(ours, theirs, **TOLERANCE)

    # --- operations -------------------------------------------------------------------------

    def train_step(self) -> None:
        ours, theirs = self.outputs(training=True)
        torch.testing.assert_close(ours, theirs, **TOLERANCE)
        ours.pow(2).mean().backward()
        theirs.pow(2).mean().backward()
        our_grads = {k.removeprefix("base_model.model."): v for k, v in _our_grads(self.delta).items()}
        their_params = {_peft_key(n).removeprefix("base_model.model."): p
                        for n, p in self.theirs.named_parameters() if p.requires_grad}
        assert set(our_grads) == set(their_params)
        for key, parameter in their_params.items():
            assert parameter.grad is not None, key
            torch.testing.assert_close(our_grads[key].reshape(parameter.grad.shape), parameter.grad, **TOLERANCE,
                                       msg=key)
        with torch.no_grad():  # each side updates its own tensors from its own gradients
            for parameter in [*self.delta.parameters(), *their_params.values()]:
                if parameter.grad is not None:
                    parameter.sub_(0.5 * parameter.grad)
                    parameter.grad = None

    def eval(self) -> None:
        self.compare()

    def save_load(self) -> None:
        folder = self._folder()
        self.delta.save_finetuned(folder)
        self.model = copy.deepcopy(self.base)
        self.delta = AutoDeltaModel.from_finetuned(folder, self.model, is_trainable=True)
        self.compare(training=True)

    def merge_unmerge(self) -> None:
        if self.delta.delta_type != "lora":
            return
        self.delta.merge()
        self.compare()
        self.delta.unmerge()
        self.compare(training=True)

    def detach_attach(self) -> None:
        self.delta.detach()
        with torch.no_grad():  # the bare backbone (PEFT 0.21's disable_adapter fails for prompts on encoders)
            self.model.eval()
            torch.testing.assert_close(main_tensor(self.model(**self.inputs)),
                                       main_tensor(self.base.eval()(**self.inputs)), **TOLERANCE)
        self.delta.attach()
        self.compare()

    def export(self) -> None:
        self.theirs = self._peft_from(self._export())
        self.compare(training=True)

    def import_(self) -> None:
        folder = self._folder()
        self.theirs.save_pretrained(folder)
        self.model = copy.deepcopy(self.base)
        self.delta = import_peft(folder, self.model, is_trainable=True)
        self.compare(training=True)

    def mixed_batch(self) -> None:
        """Rows of our delta's task and of the bare backbone in one batch (no-grad inference)."""
        tasks = [self.delta.name, None]
        self.model.eval()
        self.theirs.eval()
        with torch.no_grad():
            with engine.tasks(self.model, tasks):
                mixed = main_tensor(self.model(**self.inputs))
            with_delta = main_tensor(self.theirs(**self.inputs))
            with self.theirs.disable_adapter():
                bare = main_tensor(self.theirs(**self.inputs))
        torch.testing.assert_close(mixed[0], with_delta[0], **TOLERANCE)
        torch.testing.assert_close(mixed[1], bare[1], **TOLERANCE)


def _our_grads(delta: Any) -> dict[str, torch.Tensor]:
    """Our gradients under PEFT's keys: a prefix's per-layer keys and values side by side, as
    PEFT's one embedding table holds them."""
    if delta.delta_type != "prefix":
        return _grads_by_peft_key(delta)
    layers = [delta.delta_modules[p.replace(".", "/")] for p in delta.modified_paths]
    return {"prompt_embeddings": torch.cat([g.grad.transpose(0, 1).flatten(1) for layer in layers
                                            for g in (layer.prefix_key, layer.prefix_value)], dim=1)}


@pytest.mark.generated
@settings(max_examples=EXAMPLES)
@given(scenario=scenarios())
@example(scenario={"kind": "gpt2", "delta_type": "soft_prompt", "options": {"soft_token_num": 3}, "seed": 1,
                   "operations": ["train_step", "export", "import", "train_step", "save_load", "detach_attach"]})
@example(scenario={"kind": "llama", "delta_type": "prefix", "options": dict(PROMPTS["prefix"][1]), "seed": 2,
                   "operations": ["train_step", "detach_attach", "import", "train_step", "save_load"]})
@example(scenario={"kind": "bert", "delta_type": "lora", "seed": 3, "operations": [
    "eval", "train_step", "merge_unmerge", "mixed_batch", "train_step"], "options": {
    "modified_modules": ["attn.q", "ff.w2"], "lora_r": 2, "lora_alpha": 16.5, "lora_dropout": 0.3,
    "use_rslora": False, "use_dora": True}})
def test_operation_sequences_match_peft_in_outputs_and_gradients(scenario, tmp_path_factory):
    twins = Twins(scenario, tmp_path_factory.mktemp("differential"))
    twins.compare()
    for operation in scenario["operations"]:
        getattr(twins, "import_" if operation == "import" else operation)()
