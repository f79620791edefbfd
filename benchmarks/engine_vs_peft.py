"""The delta engine against PEFT and the plain backbone, measured side by side in one run.

Run: .venv/bin/python benchmarks/engine_vs_peft.py [--steps N]
Each comparison alternates the two contenders (A B A B …) so machine noise hits both, and
reports the ratio of medians. Targets (issues 3, 5 and 10): LoRA, DoRA and IA3 training steps
≤ 1.00 × PEFT, also on a bfloat16 backbone with float32 deltas (PEFT's autocast_adapter_dtype); merged
inference ≤ 1.02 × plain backbone; LoRA on every linear layer of llama-3.1-405b on meta
≤ 0.2 × PEFT's get_peft_model(low_cpu_mem_usage=True); detach+attach switch < 1 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import transformers
from peft import IA3Config as PeftIA3Config
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from rich.console import Console
from rich.table import Table

from engine import IA3Model, LoraModel, load_backbone

BATCH, LENGTH = 8, 128
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def interleaved(first: Callable[[], object], second: Callable[[], object], repeats: int,
                warmup: int = 1) -> tuple[list[float], list[float]]:
    """Time ``first`` and ``second`` alternately; return both lists of seconds."""
    for _ in range(warmup):
        first()
        second()
    a, b = [], []
    for _ in range(repeats):
        for function, out in ((first, a), (second, b)):
            start = time.perf_counter()
            function()
            out.append(time.perf_counter() - start)
    return a, b


def bert_base() -> transformers.BertModel:
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig()).train()


def training_step(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)

    def step() -> None:
        loss = model(input_ids=ids).last_hidden_state.float().pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def bench_training(steps: int, method: str = "lora",
                   dtype: torch.dtype = torch.float32) -> tuple[list[float], list[float]]:
    """One training step of the same delta built here and by PEFT, on the same BERT-base (in
    ``dtype``; the deltas are float32 on both sides)."""
    ids = torch.randint(0, 30522, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    ours_model = bert_base().to(dtype)
    peft_model_base = copy.deepcopy(ours_model)
    if method == "ia3":
        delta = IA3Model(ours_model)  # k, v outputs and the FFN down-projection inputs
        feedforward = [p for p in delta.modified_paths if p.endswith(".output.dense") and ".attention." not in p]
        config = PeftIA3Config(target_modules=list(delta.modified_paths), feedforward_modules=feedforward)
    else:
        dora = method == "dora"
        delta = LoraModel(ours_model, ["query", "value"], lora_r=8, lora_alpha=16, use_dora=dora)
        config = PeftLoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
                                use_dora=dora)
    delta.freeze_module()
    peft_model = get_peft_model(peft_model_base, config)  # autocast_adapter_dtype: float32 adapters
    assert {p.dtype for p in delta.parameters()} == {p.dtype for p in peft_model.parameters() if p.requires_grad}
    return interleaved(training_step(ours_model, ids), training_step(peft_model, ids), steps)


def bench_merged_inference(steps: int) -> tuple[list[float], list[float]]:
    ids = torch.randint(0, 30522, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    merged = bert_base().eval()
    plain = copy.deepcopy(merged)
    LoraModel(merged, ["query", "value"], lora_r=8).merge()

    def infer(model: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                model(input_ids=ids)
        return run

    return interleaved(infer(merged), infer(plain), steps)


@contextlib.contextmanager
def without_cyclic_gc() -> Iterator[None]:
    """Time without the cyclic garbage collector, as ``timeit`` does: building thousands of small
    modules can trigger a full collection of the whole interpreter (~0.2 s with torch and
    transformers loaded) in either contender, at random. The engine itself never switches it."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def bench_405b(repeats: int) -> tuple[list[float], list[float]]:
    ours_times, peft_times = [], []
    for _ in range(repeats + 1):  # the first pair warms imports up
        ours_model = load_backbone("catalog:llama-3.1-405b").model
        peft_base = load_backbone("catalog:llama-3.1-405b").model
        with without_cyclic_gc():
            start = time.perf_counter()
            LoraModel(ours_model, LLAMA_LINEAR, lora_r=8)
            ours_times.append(time.perf_counter() - start)
        with without_cyclic_gc():
            start = time.perf_counter()
            get_peft_model(peft_base, PeftLoraConfig(r=8, target_modules="all-linear"),
                           low_cpu_mem_usage=True)
            peft_times.append(time.perf_counter() - start)
    return ours_times[1:], peft_times[1:]


def bench_switch(repeats: int) -> list[float]:
    model = load_backbone("catalog:bert-base-uncased").model
    delta = LoraModel(model, ["query", "value"])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        delta.detach()
        delta.attach()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8, help="timed pairs per comparison")
    parser.add_argument("--only", nargs="*", default=None,
                        choices=["lora", "bf16", "dora", "ia3", "merged", "405b", "switch"],
                        help="run just these rows")
    args = parser.parse_args()
    console = Console(width=120)
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
                  f"BERT-base batch {BATCH}×{LENGTH}; {args.steps} interleaved pairs each")
    table = Table(title="engine vs PEFT / plain backbone (median seconds; ratio = ours / reference)")
    for column in ("measurement", "ours", "reference", "ratio", "target", "met"):
        table.add_column(column, justify="left" if column == "measurement" else "right")

    def row(name: str, ours: list[float], reference: list[float], target: float) -> None:
        ratio = statistics.median(ours) / statistics.median(reference)
        table.add_row(name, f"{statistics.median(ours):.4f}", f"{statistics.median(reference):.4f}",
                      f"{ratio:.3f}", f"≤ {target:.2f}", "yes" if ratio <= target else "NO")

    def wanted(name: str) -> bool:
        return args.only is None or name in args.only

    if wanted("lora"):
        row("LoRA train step (fwd+bwd+AdamW) vs PEFT", *bench_training(args.steps), 1.00)
    if wanted("bf16"):
        row("LoRA train step, bf16 backbone + fp32 deltas, vs PEFT", *bench_training(args.steps, dtype=torch.bfloat16),
            1.00)
    if wanted("dora"):
        row("DoRA train step vs PEFT", *bench_training(args.steps, "dora"), 1.00)
    if wanted("ia3"):
        row("IA3 train step vs PEFT", *bench_training(args.steps, "ia3"), 1.00)
    if wanted("merged"):
        row("merged LoRA inference vs plain BERT", *bench_merged_inference(args.steps), 1.02)
    if wanted("405b"):
        row("LoRA on all 882 linears of 405B (meta) vs PEFT", *bench_405b(max(3, args.steps // 2)), 0.20)
    if wanted("switch"):
        median = statistics.median(bench_switch(200))
        table.add_row("detach+attach switch, BERT-base, 24 modules", f"{median * 1000:.3f} ms", "—",
                      "—", "< 1 ms", "yes" if median < 1e-3 else "NO")
    console.print(table)


if __name__ == "__main__":
    main()
