"""Speed of the foundation on catalog:llama-3.1-405b (meta device), against the issue's targets.

Run: .venv/bin/python benchmarks/tree_and_addressing.py
Prints one table: median and worst of several warm runs, the target, and median/target.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from engine import AutoDeltaConfig, ModelStructure, ModuleTree, compile_selection, estimate_delta, load_backbone, resolve

SOURCE = "catalog:llama-3.1-405b"
REPEATS = 7
EXPRESSIONS = [
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "input_layernorm", r"[r]layers\.(0|1|2|3)\.self_attn", r"[r]layers\.\d+\.mlp",
]


def timed(function: Callable[[], object], repeats: int = REPEATS) -> list[float]:
    results = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        results.append(time.perf_counter() - start)
    return results


def main() -> None:
    cold_start = time.perf_counter()
    backbone = load_backbone(SOURCE)
    cold = time.perf_counter() - cold_start  # includes transformers' lazy imports

    def build_tree_collapse() -> None:
        model = load_backbone(SOURCE).model
        ModuleTree.from_model(model).collapse()

    tree = ModuleTree.from_model(backbone.model)
    rng = random.Random(0)
    random_500 = rng.sample(tree.paths, 500)
    structured_500 = [
        p for p in tree.paths
        if p.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) and ".125." not in p
    ]
    assert len(structured_500) == 500
    resolve(tree, EXPRESSIONS)  # builds the tail index and joined text once, as a server does

    structure = ModelStructure(backbone.model, tree)  # as the designer keeps for its planning copy

    def lora_estimate(patterns: int) -> Callable[[], object]:
        rank_pattern = {rf"[r]layers\.{i}\.self_attn\.q_proj": 4 for i in range(patterns)}
        config = AutoDeltaConfig.from_dict({"delta_type": "lora", "rank_pattern": rank_pattern})

        def estimate() -> object:
            structure.memo.clear()  # a new pattern every time: nothing resolved before
            return estimate_delta(backbone.model, config, structure=structure)

        return estimate

    lora_estimate(1)()  # roles and the probe pass, once per planning copy
    one, many = timed(lora_estimate(1)), timed(lora_estimate(126))
    rows = [
        ("build + tree + collapse", timed(build_tree_collapse), 0.5),
        ("resolve 10 expressions", timed(lambda: resolve(tree, EXPRESSIONS)), 0.020),
        ("compile_selection 500 random paths", timed(lambda: compile_selection(tree, random_500)), 0.020),
        ("compile_selection 500 q/k/v/o paths", timed(lambda: compile_selection(tree, structured_500)), 0.020),
        ("LoRA estimate, rank_pattern of 1 expression", one, 0.050),
        ("LoRA estimate, rank_pattern of 126 expressions", many, 0.100),
    ]
    table = Table(title=f"{SOURCE}: {len(tree.paths)} modules, "
                        f"{tree.total_parameters:,} parameters (cold first build {cold:.2f} s)")
    for column in ("operation", "median", "worst", "target", "median / target"):
        table.add_column(column, justify="right" if column != "operation" else "left")
    for name, seconds, target in rows:
        median = statistics.median(seconds)
        table.add_row(name, f"{median * 1000:.1f} ms", f"{max(seconds) * 1000:.1f} ms",
                      f"{target * 1000:.0f} ms", f"{median / target:.2f}")
    Console(width=110).print(table)
    print(f"126 patterns / 1 pattern: {statistics.median(many) / statistics.median(one):.2f}× "
          "(patterns are resolved against one index: cost grows with matches, not patterns × modules)")


if __name__ == "__main__":
    main()
