"""Plant known bugs one at a time, run the tests that guard each, and report whether they caught it.

    .venv/bin/python tests/plant_bugs.py            # every bug
    .venv/bin/python tests/plant_bugs.py "rsLoRA ignored"

A test suite that lets one of these through cannot be trusted with that path. Each bug is a one-line
edit of the engine or the designer, undone afterwards whatever happens. Not collected by pytest (a tool, not a test).
"""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: (name, file, text, planted text, tests that must catch it)
MUTANTS = [
 ("rsLoRA ignored", "engine/methods/lora.py",
  "return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank", "return alpha / rank",
  ["tests/engine/test_against_peft.py", "tests/engine/test_more_methods.py"]),
 ("scaling squared", "engine/methods/lora_layers.py",
  "return self.lora_B(self.lora_A(dropped) * self.scaling)", "return self.lora_B(self.lora_A(dropped) * self.scaling * self.scaling)",
  ["tests/engine/test_against_peft.py", "tests/engine/test_delta_behaviour.py"]),
 ("dropout moved to the output", "engine/methods/lora_layers.py",
  "        return self._lora(self.dropout(hidden))\n", "        return self.dropout(self._lora(hidden))\n",
  ["tests/engine/test_against_peft.py"]),
 ("DoRA norm not detached", "engine/methods/lora_layers.py",
  "        with torch.no_grad():\n            update = self.update()", "        if True:\n            update = self.update()",
  ["tests/engine/test_against_peft.py"]),
 ("a detach that leaves one hook", "engine/routing.py",
  "        for handle in self.handles:\n            handle.remove()", "        for handle in self.handles[:1]:\n            handle.remove()",
  ["tests/engine/test_delta_matrix.py"]),
 ("a save that drops one tensor", "engine/persistence.py",
  "    state = {key: _gathered(tensor) for key, tensor in checkpoint_state(delta).items()}",
  "    state = {key: _gathered(tensor) for key, tensor in list(checkpoint_state(delta).items())[:-1]}",
  ["tests/engine/test_delta_matrix.py", "tests/engine/test_safety.py"]),
 ("a save that drops the unfrozen modules", "engine/persistence.py",
  "    return {**delta.delta_state(),\n            **{BACKBONE_PREFIX",
  "    return {**delta.delta_state(), **{}}\n    return {**delta.delta_state(),\n            **{BACKBONE_PREFIX",
  ["tests/engine/test_safety.py"]),
 ("dropout left in train mode after load", "engine/persistence.py",
  "    backbone.eval()\n", "    pass\n",
  ["tests/engine/test_safety.py"]),
 ("attach ignores the backbone's mode", "engine/delta.py",
  "                self.train(mode)\n", "                pass\n",
  ["tests/engine/test_safety.py"]),
 ("mixed batch: rows get the next task's LoRA", "engine/methods/lora_mixed.py",
  "            slot[selector(target, where).cpu()] = index", "            slot[selector(target, where).cpu()] = (index + 1) % len(layers)",
  ["tests/engine/test_mixed_tasks.py"]),
 ("mixed batch: prefix seen by every row", "engine/methods/prefix.py",
  "implementation, seen)", "implementation, None)",
  ["tests/engine/test_mixed_tasks.py"]),
 ("mixed batch: an adapter on every row", "engine/routing.py",
  "            rows = pick(hidden, type(mod).__name__)\n            return _with_main_output",
  "            rows = None\n            return _with_main_output",
  ["tests/engine/test_mixed_tasks.py"]),
 ("unmerged LoRA fast path off by 0.1 %", "engine/methods/lora_layers.py",
  "self.lora_B.weight.t(), alpha=self.scaling)", "self.lora_B.weight.t(), alpha=self.scaling * 1.001)",
  ["tests/engine/test_lora_fast_path.py"]),
 ("expert LoRA update off by 0.01 %", "engine/methods/lora_layers.py",
  "        return type(module).forward(_with_parameters(module, weights), *args, **kwargs)",
  "        return type(module).forward(_with_parameters(module, weights), *args, **kwargs) * 1.0001",
  ["tests/engine/test_threads.py", "tests/engine/test_experts_and_fallbacks.py"]),
 ("a second LoRA silently replaces the first's name", "engine/delta.py",
  "        while self.config.name in taken:", "        while False:",
  ["tests/engine/test_opendelta_parity.py"]),
 ("structure hash never compared", "engine/persistence.py",
  "    if check_hash and recorded is not None", "    if False and recorded is not None",
  ["tests/engine/test_opendelta_parity.py"]),
 ("PEFT layers_to_transform ignored", "engine/interop/peft_matching.py",
  "    if layers is None or (isinstance(layers, list) and not layers):", "    if True:",
  ["tests/engine/test_peft_in_the_wild.py"]),
 ("PEFT modules_to_save tensors not loaded", "engine/interop/peft.py",
  "    delta.unfrozen_paths = saved_paths\n", "    delta.unfrozen_paths = []\n",
  ["tests/engine/test_peft_in_the_wild.py"]),
 ("PEFT expert factors in the wrong order", "engine/interop/peft_experts.py",
  "factor_b.permute(1, 2, 0)", "factor_b.permute(1, 0, 2)",
  ["tests/engine/test_experts_and_fallbacks.py"]),
 ("PEFT prefix without the position shift", "engine/methods/prefix.py",
  "    start = past + count\n", "    start = past\n",
  ["tests/engine/test_peft_prefix.py"]),
 ("4-bit CPU repacking left on (gradients dropped)", "engine/quantization.py",
  "            module.support_avx512bf16_for_cpu = False", "            pass",
  ["tests/engine/test_quantised.py"]),
 ("a typed real module name read as a common name", "engine/roles/common_names.py",
  "        if typed and structure.tree.tails().get(expression):", "        if False:",
  ["tests/engine/test_opendelta_parity.py"]),
 ("layer ranges listed wrong (a run's last index dropped)", "engine/addressing.py",
  "        top = min(high, 10 ** len(str(low)) - 1)  # one number of digits at a time",
  "        top = min(high - 1, 10 ** len(str(low)) - 1)  # one number of digits at a time",
  ["tests/engine/test_addressing.py"]),
 ("activation trace counts nothing of dropout (eval mode)", "engine/memory_trace.py",
  "module_mode(model, training=True)", "module_mode(model, training=False)",
  ["tests/engine/test_memory_plan.py::test_the_plan_is_within_10_percent_of_a_measured_training_step[bert-lora-8-256-False-fp32-eager]"]),
 # issue 20: the planner measured against reality
 ("frozen weights counted again as activations", "engine/memory_trace.py",
  "    weights = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}\n",
  "    weights = set()\n",
  ["tests/engine/test_memory_plan.py::test_frozen_weights_are_not_counted_as_activations"]),
 ("fused attention keeps the scores anyway", "engine/memory_trace.py",
  "_FlashKernels(attention == \"flash\"), live:", "_FlashKernels(False), live:",
  ["tests/engine/test_memory_plan.py::test_the_plan_is_within_10_percent_of_a_measured_training_step[bert-lora-16-128-False-bf16-sdpa]"]),
 ("checkpointing left out of the step", "engine/memory_trace.py",
  "_checkpointing(model, checkpointing, attention == \"flash\")", "_checkpointing(model, False, attention == \"flash\")",
  ["tests/engine/test_memory_plan.py::test_the_plan_is_within_10_percent_of_a_measured_training_step[bert-adapter-8-256-True-fp32-eager]"]),
 ("GPT-2's Conv1D not quantised", "engine/quantization.py",
  "(kind is nn.Linear or kind.__name__ == \"Conv1D\")", "(kind is nn.Linear)",
  ["tests/engine/test_quantised.py::test_planned_quantised_bytes_equal_what_bitsandbytes_allocates"]),
 ("int8 scales counted per input", "engine/quantization.py",
  "else count + 4 * rows", "else count + 4 * (count // rows)",
  ["tests/engine/test_quantised.py::test_planned_quantised_bytes_equal_what_bitsandbytes_allocates"]),
 ("FSDP does not divide optimizer states", "engine/memory_plan.py",
  "OPTIMIZER_STATE_BYTES[setup.optimizer]) // _shards(setup)", "OPTIMIZER_STATE_BYTES[setup.optimizer])",
  ["tests/engine/test_memory_plan.py::test_formats_optimizers_and_sharding_add_up"]),
 ("only the largest layer list counted", "engine/memory_trace.py",
  "            found.extend(module)\n", "            found[:] = max(found, list(module), key=len)\n",
  ["tests/engine/test_memory_plan.py::test_encoder_decoder_layers_are_counted_on_both_sides"]),
 ("mixed batch after unmerge adds twice", "engine/methods/lora_layers.py",
  "        if lora_mixed.already_added(batch, module, target):\n            return True\n"
  "        layers = [child for child in module._modules.values() if isinstance(child, DeltaModule)]\n",
  "        layers = [child for child in module._modules.values() if isinstance(child, DeltaModule)]\n"
  "        if layers[0] is not self:\n            return lora_mixed.already_added(batch, module, target)\n",
  ["tests/engine/test_mixed_tasks.py::test_merge_then_unmerge_of_the_first_lora_keeps_mixed_batches_exact"]),
 ("caller's position_ids left unshifted past a prefix", "engine/methods/prefix.py",
  "        return args, {**kwargs, \"position_ids\": kwargs[\"position_ids\"] + count}",
  "        return args, kwargs",
  ["tests/engine/test_peft_prefix.py"]),
 ("DoRA's eval path rescales the bias", "engine/methods/lora_layers.py",
  "            base = output - module.bias if module.bias is not None else output", "            base = output",
  ["tests/engine/test_differential_peft.py"]),
 ("8-bit views changed in place", "engine/routing.py",
  "            in_place = in_place_allowed and _writable_in_place(target)", "            in_place = in_place_allowed",
  ["tests/engine/test_quantised.py::test_lora_on_8bit_layers_trains_with_the_gradients_of_the_dequantised_model"]),
 ("a layer holding a delta folds with plain layers", "engine/tree.py",
  "    if any(n.is_delta or n.delta_parameters for child in added for n in child.walk()):",
  "    if False:",
  ["tests/engine/test_tree.py"]),

 ("PEFT rank_pattern keys matched as substrings", "engine/interop/peft.py",
  "        key = next((k for k in pattern if re.match(rf\"(.*\\.)?({k})$\", path)), None)",
  "        key = next((k for k in pattern if re.search(k, path)), None)",
  ["tests/engine/test_peft_interop.py::test_rank_pattern_keys_follow_peft_s_rule_not_substrings"]),
 ("checkpoint bytes leave out shared tensors", "engine/estimate.py",
  "    checkpoint = sum(sizes[representative[kind(p)]] for p in targets) + shared_bytes",
  "    checkpoint = sum(sizes[representative[kind(p)]] for p in targets)",
  ["tests/engine/test_safety.py::test_the_estimated_checkpoint_size_is_what_saving_writes"]),
 ("partially selected nodes marked full", "designer/preview.py",
  "            if hits == len(members):", "            if hits:",
  ["tests/designer/test_generated_edits.py"]),
 ("percent over backbone + trainable", "designer/preview.py",
  "\"percent\": 100.0 * total / backbone if backbone else 0.0,",
  "\"percent\": 100.0 * total / (backbone + total) if backbone else 0.0,",
  ["tests/designer/test_generated_edits.py"]),
 ("out-of-order events applied", "designer/events.py",
  "            if last is not None and message.seq <= last:", "            if False:",
  ["tests/designer/test_events.py"]),
 ("typed expressions kept after they stop reading back", "designer/session.py",
  "            edited.typed = typed if not roles or self._reads_back(typed, edited.selection) else []",
  "            edited.typed = typed",
  ["tests/designer/test_events.py"]),
 ("matching work not bounded for imports", "designer/session.py",
  "                *design.unfrozen_modules], \"import\")", "                ], \"import\") if False else None",
  ["tests/hostile/test_payloads.py::test_matching_work_is_bounded_before_the_engine_matches"]),
]


def main() -> None:
    only = sys.argv[1:]
    for name, path, old, new, tests in MUTANTS:
        if only and name not in only:
            continue
        file = ROOT / path
        original = file.read_text()
        assert old in original, (name, old)
        file.write_text(original.replace(old, new, 1))
        try:
            done = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                                  cwd=ROOT, capture_output=True, text=True, timeout=900)
            tail = [l for l in done.stdout.splitlines() if l.startswith("FAILED")][:1]
            print(f"{name:45s} {'CAUGHT' if done.returncode else 'MISSED'} {tail[0] if tail else ''}", flush=True)
        finally:
            file.write_text(original)


if __name__ == "__main__":
    main()
