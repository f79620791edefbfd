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
 ("activation trace counts nothing of dropout (eval mode)", "engine/memory_plan.py",
  "module_mode(model, training=True)", "module_mode(model, training=False)",
  ["tests/engine/test_memory_plan.py"]),
 ("a layer holding a delta folds with plain layers", "engine/tree.py",
  "    if any(n.is_delta or n.delta_parameters for child in added for n in child.walk()):",
  "    if False:",
  ["tests/engine/test_tree.py"]),

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
