"""Mutation testing with cosmic-ray (a tool from PyPI, not our own list of planted bugs): every
file below is mutated by its operators one mutant at a time, and only the tests that cover that
file run against each mutant. Prints killed / survived per file and the survivors.

    make mutation                                   # every file (hours on 2 cores)
    make mutation FILES="engine/memory_plan.py"     # some

Run on a copy of the checkout (``make mutation`` makes one under $TMPDIR): cosmic-ray writes each
mutant into the file it tests and puts it back afterwards. Sessions are kept there too, so a run
that is stopped continues where it was. Not collected by pytest (a tool, not a test).
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile

#: file (or folder) → the tests that cover it
TARGETS: dict[str, list[str]] = {
    "engine/memory_plan.py": ["tests/engine/test_memory_plan.py::test_formats_optimizers_and_sharding_add_up",
                              "tests/engine/test_memory_plan.py::test_weight_formats_on_a_405b_shape",
                              "tests/engine/test_memory_plan.py::test_gpt2_conv1d_weights_are_quantised_in_the_plan",
                              "tests/engine/test_memory_plan.py::test_a_bad_setup_is_refused_by_name"],
    "engine/quantization.py": ["tests/engine/test_quantised.py"],
    "engine/persistence.py": ["tests/engine/test_safety.py", "tests/engine/test_delta_matrix.py",
                              "tests/engine/test_crash_safety.py"],
    "engine/interop": ["tests/engine/test_peft_interop.py", "tests/engine/test_peft_in_the_wild.py",
                       "tests/engine/test_peft_prefix.py", "tests/engine/test_against_peft.py"],
    "engine/methods": ["tests/engine/test_against_peft.py", "tests/engine/test_differential_peft.py",
                       "tests/engine/test_delta_behaviour.py", "tests/engine/test_more_methods.py",
                       "tests/engine/test_faithful_methods.py", "tests/engine/test_mixed_tasks.py"],
    "designer/preview.py": ["tests/designer/test_generated_edits.py", "tests/designer/test_events.py"],
    "designer/exports.py": ["tests/designer/test_trainer_exports.py", "tests/designer/test_app.py",
                            "tests/designer/test_generated_edits.py"],
}


def run(root: pathlib.Path, target: str, sessions: pathlib.Path) -> dict[str, int]:
    name = target.replace("/", "_")
    config, session = sessions / f"{name}.toml", sessions / f"{name}.sqlite"
    tests = " ".join(shlex.quote(t) for t in TARGETS[target])
    command = (f"env PYTHONPATH={shlex.quote(str(root))} PYTHONDONTWRITEBYTECODE=1 {shlex.quote(sys.executable)} "
               f"-m pytest -x -q -p no:cacheprovider {tests}")
    config.write_text(f'[cosmic-ray]\nmodule-path = "{target}"\ntimeout = 600.0\nexcluded-modules = []\n'
                      f'test-command = {json.dumps(command)}\n\n[cosmic-ray.distributor]\nname = "local"\n')
    tool = pathlib.Path(sys.executable).parent / "cosmic-ray"
    if not session.exists():
        subprocess.run([str(tool), "init", str(config), str(session)], cwd=root, check=True)
    subprocess.run([str(tool), "exec", str(config), str(session)], cwd=root, check=True)
    dumped = subprocess.run([str(tool), "dump", str(session)], cwd=root, capture_output=True, text=True, check=True)
    counts = {"killed": 0, "survived": 0, "incompetent": 0}
    for line in dumped.stdout.splitlines():
        job, result = json.loads(line)
        outcome = (result or {}).get("test_outcome")
        if outcome in counts:
            counts[outcome] += 1
        if outcome == "survived":
            mutation = job["mutations"][0]
            print(f"  survived: {mutation['module_path']}:{mutation['start_pos'][0]} {mutation['operator_name']} "
                  f"#{mutation['occurrence']}", flush=True)
    return counts


def main() -> None:
    root = pathlib.Path(os.environ.get("MUTATION_ROOT", pathlib.Path(__file__).resolve().parents[1]))
    sessions = pathlib.Path(tempfile.gettempdir()) / "delta-designer-mutation"
    sessions.mkdir(exist_ok=True)
    for target in sys.argv[1:] or list(TARGETS):
        counts = run(root, target, sessions)
        judged = counts["killed"] + counts["survived"]
        score = 100 * counts["killed"] / judged if judged else 0.0
        print(f"{target}: {counts['killed']} killed, {counts['survived']} survived, "
              f"{counts['incompetent']} incompetent — {score:.1f} % killed", flush=True)


if __name__ == "__main__":
    main()
