"""Multi-task serving, unmerged LoRA inference and start-up, measured side by side in one run.

Run: .venv/bin/python benchmarks/serving.py [--repeats N] [--length L]

Every comparison alternates its contenders (A B C A B C …) so machine noise hits all of them,
and reports ratios of medians. Targets (issue 14):
- a mixed batch of 8 LoRA tasks (r=8 on q,v) × 32 rows: ≤ 0.8 × PEFT's mixed-adapter batch,
  ≤ 1.15 × one task alone on the same 32 rows, ≥ 3 × faster than 8 sub-batches with switching;
- unmerged LoRA inference ≤ 1.02 × the plain backbone and ≤ PEFT's unmerged time;
- ``delta-designer tree catalog:gpt2`` ≤ 1.3 × a fresh interpreter that imports torch and
  transformers and builds GPT-2 on meta; ``import engine`` ≤ 1.2 × ``import torch``;
- LoRA training peak memory ≤ 0.8 × PEFT (3 steps of r=16 on q,k,v,dense, batch 8 × 256, each
  contender in its own process; peak RSS).
The plain backbone's time is printed beside the mixed batch: no delta library can go below it.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import transformers
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from rich.console import Console
from rich.table import Table

import engine

TASKS = 8
ROWS = 32


class Timings(dict):
    """Contender → seconds of each round; ``ms`` gives the median, ``ratio`` the median over
    rounds of one contender's time over another's (robust to the machine's drift)."""

    def ms(self, name: str) -> float:
        return statistics.median(self[name]) * 1e3

    def ratio(self, name: str, reference: str) -> float:
        return statistics.median(a / b for a, b in zip(self[name], self[reference]))


def alternate(contenders: dict[str, Callable[[], object]], repeats: int) -> Timings:
    """Seconds of each contender, run in turn ``repeats`` times after one warm-up. A contender
    that returns a float has timed itself (leaving out its own set-up)."""
    for run in contenders.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            start = time.perf_counter()
            timed = run()
            times[name].append(timed if isinstance(timed, float) else time.perf_counter() - start)
    return Timings(times)


def backbones() -> dict[str, Callable[[], torch.nn.Module]]:
    def bert() -> torch.nn.Module:
        torch.manual_seed(0)
        return transformers.BertModel(transformers.BertConfig()).eval()

    def llama() -> torch.nn.Module:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                          num_attention_heads=16, num_key_value_heads=16, vocab_size=32000)
        return transformers.LlamaModel(config).eval()

    return {"BERT-base": bert, "llama 4×1024": llama}


def mixed_batch_rows(repeats: int, length: int) -> list[tuple[str, Timings]]:
    rows = []
    for label, build in backbones().items():
        ours = build()
        peft_base = copy.deepcopy(ours)
        targets = ["attn.q", "attn.v"]
        peft_targets = ["query", "value"] if label.startswith("BERT") else ["q_proj", "v_proj"]
        names = [f"t{i}" for i in range(TASKS)]
        deltas = {}
        for index, name in enumerate(names):
            delta = engine.LoraModel(ours, targets, lora_r=8, name=name)
            with torch.no_grad():
                for parameter in delta.parameters():
                    parameter.normal_(0, 0.02, generator=torch.Generator().manual_seed(index))
            deltas[name] = delta
        peft_config = PeftLoraConfig(r=8, target_modules=peft_targets)
        peft_model = get_peft_model(peft_base, peft_config, adapter_name=names[0])
        for name in names[1:]:
            peft_model.add_adapter(name, peft_config)
        peft_model.eval()
        ids = torch.randint(0, 30000, (ROWS, length), generator=torch.Generator().manual_seed(1))
        tasks = [names[i % TASKS] for i in range(ROWS)]

        def ours_mixed() -> None:
            with engine.tasks(ours, tasks):
                ours(input_ids=ids)

        def peft_mixed() -> None:
            peft_model(input_ids=ids, adapter_names=tasks)

        def only(name: str | None) -> list[engine.LoraModel]:
            detached = [d for n, d in deltas.items() if n != name and d.is_attached]
            for delta in detached:
                delta.detach()
            return detached

        def timed_with_only(name: str | None) -> float:
            """One forward over all rows with only ``name`` attached (the switch is not timed)."""
            detached = only(name)
            start = time.perf_counter()
            ours(input_ids=ids)
            elapsed = time.perf_counter() - start
            for delta in detached:
                delta.attach()
            return elapsed

        def switching() -> None:  # 8 sub-batches, only that task's delta attached for each
            for name in names:
                rows_of_task = [i for i, task in enumerate(tasks) if task == name]
                detached = only(name)
                ours(input_ids=ids[rows_of_task])
                for delta in detached:
                    delta.attach()

        with torch.inference_mode():
            timed = alternate({"ours mixed": ours_mixed, "PEFT mixed": peft_mixed, "one task alone": lambda: timed_with_only(names[0]),
                               "plain backbone": lambda: timed_with_only(None), "switching": switching}, repeats)
        rows.append((label, timed))
    return rows


def unmerged_rows(repeats: int) -> list[tuple[str, Timings]]:
    rows = []
    for batch, length in ((8, 128), (1, 16)):
        model = backbones()["BERT-base"]()
        peft_model = get_peft_model(copy.deepcopy(model), PeftLoraConfig(r=8, target_modules=["query", "value"])).eval()
        delta = engine.LoraModel(model, ["attn.q", "attn.v"], lora_r=8)
        with torch.no_grad():
            for parameter in delta.parameters():
                parameter.normal_(0, 0.02)
        ids = torch.randint(0, 30000, (batch, length), generator=torch.Generator().manual_seed(1))

        def plain() -> float:  # the same model object with the delta detached (same memory layout)
            delta.detach()
            start = time.perf_counter()
            model(input_ids=ids)
            elapsed = time.perf_counter() - start
            delta.attach()
            return elapsed

        with torch.inference_mode():
            timed = alternate({"ours": lambda: model(input_ids=ids), "plain backbone": plain,
                               "PEFT": lambda: peft_model(input_ids=ids)}, repeats * (3 if batch > 1 else 20))
        rows.append((f"BERT-base {batch}×{length}", timed))
    return rows


def fresh_seconds(code: str, repeats: int) -> float:
    """Median wall time of a fresh interpreter running ``code``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def startup_rows(repeats: int) -> list[tuple[str, float, float]]:
    floor = ("import torch, transformers\n"
             "from transformers import AutoConfig, AutoModelForCausalLM\n"
             "with torch.device('meta'): AutoModelForCausalLM.from_config(AutoConfig.for_model('gpt2'))")
    cli = "import sys; from designer.cli import main; sys.exit(main(['tree', 'catalog:gpt2']))"
    pairs = {"import engine / import torch": ("import engine", "import torch"),
             "tree catalog:gpt2 / floor": (cli, floor)}
    measured = {label: ([], []) for label in pairs}
    for _ in range(repeats):  # alternate within each pair
        for label, (ours, reference) in pairs.items():
            measured[label][0].append(fresh_seconds(ours, 1))
            measured[label][1].append(fresh_seconds(reference, 1))
    return [(label, statistics.median(a), statistics.median(b)) for label, (a, b) in measured.items()]


MEMORY_PROBE = """
import resource, sys, torch, transformers
torch.manual_seed(0)
model = transformers.BertModel(transformers.BertConfig()).train()
targets = ["query", "key", "value", "dense"]
if sys.argv[1] == "peft":
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=16, target_modules=targets))
else:
    import engine
    engine.LoraModel(model, targets, lora_r=16).freeze_module()
ids = torch.randint(0, 30000, (8, 256))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
for _ in range(3):
    model(input_ids=ids).last_hidden_state.pow(2).mean().backward()
    optimizer.step(); optimizer.zero_grad()
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_memory() -> dict[str, tuple[int, int]]:
    """(peak RSS before training, peak RSS after 3 LoRA training steps) in kB, ours and PEFT's,
    each measured in its own process."""
    result = {}
    for who in ("ours", "peft"):
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, who], check=True, capture_output=True, text=True)
        before, after = map(int, out.stdout.split()[-2:])
        result[who] = (before, after)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lengths", default="1,32", help="tokens per row of the mixed batches (comma list): "
                        "1 is a decoding step, where per-forward costs weigh most; 32 a short request")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    console = Console(width=150)

    table = Table(title=f"Mixed batch: {TASKS} LoRA tasks (r=8, q,v) × {ROWS} rows, inference, medians of "
                        f"{args.repeats} (ratios: medians of per-round ratios)")
    for column in ("backbone", "tokens", "ours ms", "PEFT ms", "ours/PEFT (≤0.8)", "one task ms", "ours/one (≤1.15)",
                   "plain ms", "switching ms", "switching/ours (≥3)"):
        table.add_column(column, justify="right")
    for length, (label, t) in ((int(n), row) for n in args.lengths.split(",")
                               for row in mixed_batch_rows(args.repeats, int(n))):
        table.add_row(label, str(length), f"{t.ms('ours mixed'):.1f}", f"{t.ms('PEFT mixed'):.1f}",
                      f"{t.ratio('ours mixed', 'PEFT mixed'):.3f}", f"{t.ms('one task alone'):.1f}",
                      f"{t.ratio('ours mixed', 'one task alone'):.3f}", f"{t.ms('plain backbone'):.1f}",
                      f"{t.ms('switching'):.1f}", f"{t.ratio('switching', 'ours mixed'):.2f}")
    console.print(table)

    table = Table(title="Unmerged LoRA inference (r=8 on q,v), medians")
    for column in ("shape", "ours ms", "plain ms", "ours/plain (≤1.02)", "PEFT ms", "ours/PEFT (≤1)"):
        table.add_column(column, justify="right")
    for label, t in unmerged_rows(args.repeats):
        table.add_row(label, f"{t.ms('ours'):.2f}", f"{t.ms('plain backbone'):.2f}",
                      f"{t.ratio('ours', 'plain backbone'):.3f}", f"{t.ms('PEFT'):.2f}", f"{t.ratio('ours', 'PEFT'):.3f}")
    console.print(table)

    table = Table(title="Start-up, fresh interpreters, medians")
    for column in ("comparison", "ours s", "reference s", "ratio (≤1.2 / ≤1.3)"):
        table.add_column(column, justify="right")
    for label, ours, reference in startup_rows(args.repeats):
        table.add_row(label, f"{ours:.3f}", f"{reference:.3f}", f"{ours / reference:.3f}")
    console.print(table)

    if not args.skip_memory:
        memory = peak_memory()
        (ours_before, ours), (peft_before, peft) = memory["ours"], memory["peft"]
        console.print(f"LoRA training peak RSS (r=16 on q,k,v,dense, 8×256, 3 steps): ours {ours / 1024:.0f} MB, "
                      f"PEFT {peft / 1024:.0f} MB, ratio {ours / peft:.3f} (≤0.8); above the loaded model "
                      f"(ours {ours_before / 1024:.0f} MB, PEFT {peft_before / 1024:.0f} MB before training): "
                      f"ratio {(ours - ours_before) / (peft - peft_before):.3f}")


if __name__ == "__main__":
    main()
