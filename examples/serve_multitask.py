"""Serve many tasks from one frozen backbone: N saved deltas, mixed requests answered in batches.

    python examples/serve_multitask.py --tasks 8 --requests 256 --batch 32

The backbone (the embedded all-MiniLM-L6-v2) is loaded once. Each task is a LoRA delta saved with
``save_finetuned`` (here: random stand-ins for trained ones, written to a temporary directory)
and loaded back with ``from_finetuned`` under its own name. Requests arrive tagged with a task;
each batch is answered by one forward in which every row runs its own task's delta
(``engine.tasks``). For comparison, the same requests are answered the way a server without
mixed batches must: one sub-batch per task, switching deltas between them. Prints throughput.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

import engine


def save_stand_in_deltas(model: torch.nn.Module, names: list[str], root: Path) -> list[Path]:
    """Write one LoRA checkpoint per task (random factors stand in for trained ones)."""
    directories = []
    for index, name in enumerate(names):
        delta = engine.LoraModel(model, ["attn.q", "attn.v"], lora_r=8, name=name).freeze_module()
        with torch.no_grad():
            generator = torch.Generator().manual_seed(index)
            for parameter in delta.parameters():
                parameter.normal_(0, 0.05, generator=generator)
        directories.append(delta.save_finetuned(root / name))
        delta.detach()
    return directories


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=32, help="tokens per request")
    args = parser.parse_args()

    model = engine.load_backbone("minilm").model.eval()
    names = [f"task{i}" for i in range(args.tasks)]
    with tempfile.TemporaryDirectory() as root:
        saved = save_stand_in_deltas(model, names, Path(root))
        deltas = {d.name: d for d in (engine.LoraModel.from_finetuned(path, model) for path in saved)}

    rng = random.Random(0)
    requests = [(rng.choice(names), torch.randint(1000, 20000, (args.length,))) for _ in range(args.requests)]
    batches = [requests[i : i + args.batch] for i in range(0, len(requests), args.batch)]

    def mixed() -> list[torch.Tensor]:
        answers = []
        for batch in batches:
            ids = torch.stack([tokens for _, tokens in batch])
            with engine.tasks(model, [task for task, _ in batch]):
                answers.extend(model(input_ids=ids).last_hidden_state[:, 0])
        return answers

    def switching() -> list[torch.Tensor]:
        answers: list[torch.Tensor | None] = [None] * len(requests)
        for start in range(0, len(requests), args.batch):
            batch = requests[start : start + args.batch]
            for name in names:  # only this task's delta attached for its sub-batch
                rows = [i for i, (task, _) in enumerate(batch) if task == name]
                if not rows:
                    continue
                for other in deltas.values():
                    if other.name != name:
                        other.detach()
                output = model(input_ids=torch.stack([batch[i][1] for i in rows])).last_hidden_state[:, 0]
                for other in deltas.values():
                    if other.name != name:
                        other.attach()
                for row, answer in zip(rows, output):
                    answers[start + row] = answer
        return answers  # type: ignore[return-value]

    with torch.inference_mode():
        mixed()  # warm up
        timings = {}
        for label, serve in (("mixed batches", mixed), ("switching deltas", switching)):
            start = time.perf_counter()
            answers = serve()
            timings[label] = time.perf_counter() - start
            timings[label + " answers"] = torch.stack(answers)
        with engine.tasks(model, [None] * len(requests)):  # every row without a delta
            bare = model(input_ids=torch.stack([tokens for _, tokens in requests])).last_hidden_state[:, 0]
    difference = (timings["mixed batches answers"] - timings["switching deltas answers"]).abs().max().item()
    effect = (timings["mixed batches answers"] - bare).abs().max().item()
    print(f"{args.tasks} tasks, {args.requests} requests of {args.length} tokens, batches of {args.batch}")
    for label in ("mixed batches", "switching deltas"):
        print(f"  {label:17s} {args.requests / timings[label]:8.1f} requests/s")
    print(f"  largest difference between the two answers: {difference:.2e} "
          f"(the deltas change the answers by up to {effect:.2e})")


if __name__ == "__main__":
    main()
