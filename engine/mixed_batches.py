"""Mixed-task batches: one forward in which each row of the batch runs its own task's delta.

Several deltas attached to one backbone, each under its own name, serve several tasks; inside
``with tasks(model, ["sst2", "mnli", None, …]):`` row *i* of every forward runs only the deltas
named ``task_ids[i]`` (``None``: the bare backbone), and each row's output is the one it would
get alone with only its delta attached. A delta's hooks compute its update on its own rows
(gathered) and add it back into them, so the batch costs about one forward plus each task's
small update on its own rows.

The selection lives on the model for the duration of the block and only for the thread that
entered it, so other threads (and other models) are unaffected. Activations must be batch-first
— every transformers model is — with a leading dimension of the batch size, or a multiple of it
in batch-major order (tokens flattened as OPT's FFN and MoE layers do; beams of ``generate``,
which repeat each row ``num_beams`` times in a row).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from engine.errors import DeltaError, DeltaStateError
from engine.layers import DeltaModule

_ATTRIBUTE = "_delta_engine_task_rows"


class TaskRows:
    """The task of each row of one mixed batch, with the row indices of each task per device and
    leading size (computed once per forward shape, then reused by every hook)."""

    def __init__(self, names: Sequence[str | None]) -> None:
        self.names = tuple(names)
        self._indices: dict[tuple[str, int, torch.device], torch.Tensor] = {}
        #: per-batch values that hooks compute once and reuse (e.g. stacked LoRA factors)
        self.memo: dict[object, object] = {}

    def indices(self, name: str, like: torch.Tensor, where: str) -> torch.Tensor:
        """Indices along ``like``'s leading dimension of the rows of task ``name`` (maybe empty)."""
        size = like.shape[0] if like.dim() else 0
        key = (name, size, like.device)
        found = self._indices.get(key)
        if found is None:
            batch = len(self.names)
            if size == 0 or size % batch:
                raise DeltaError(
                    f"mixed-task batch of {batch} rows, but {where} sees a leading dimension of {size}: "
                    "pass one task id per row of the batch (activations must be batch-first)")
            rows = torch.tensor([i for i, task in enumerate(self.names) if task == name], dtype=torch.long)
            repeat = size // batch
            if repeat > 1:  # tokens or beams flattened into the batch dimension, row-major
                rows = (rows[:, None] * repeat + torch.arange(repeat)).flatten()
            found = self._indices[key] = rows.to(like.device)
        return found


class RowSelector:
    """What the hooks of one delta ask on every call: ``None`` outside a mixed batch (the delta
    applies to every row), else the indices of its rows. Kept on the delta's layers, so
    :func:`tasks` finds the models whose forwards it must steer."""

    def __init__(self, model: nn.Module, name: str) -> None:
        self.model = model
        self.name = name

    def batch(self) -> TaskRows | None:
        """The mixed batch this thread is running on the model, if any."""
        table = self.model.__dict__.get(_ATTRIBUTE)
        return table.get(threading.get_ident()) if table else None

    def __call__(self, like: torch.Tensor, where: str = "a delta") -> torch.Tensor | None:
        rows = self.batch()
        if rows is None:
            return None
        return rows.indices(self.name, like, f"{where} of delta {self.name!r}")


def attached_layers(model: nn.Module) -> dict[str, list[DeltaModule]]:
    """Task (delta) name → the top-level delta layers attached under that name in ``model``."""
    found: dict[str, list[DeltaModule]] = {}
    stack, seen = [model], {id(model)}  # iterative: this runs on entering every mixed batch
    while stack:
        for name, child in stack.pop()._modules.items():
            if child is None or id(child) in seen:
                continue
            seen.add(id(child))
            if isinstance(child, DeltaModule):
                found.setdefault(name, []).append(child)
            else:
                stack.append(child)
    return found


def _selectors(model: nn.Module, names: Sequence[str | None]) -> list[RowSelector]:
    """The selectors of every delta attached to ``model``, after checking that each can serve
    part of a batch and that every named task is attached."""
    layers = attached_layers(model)
    unknown = sorted({n for n in names if n is not None and n not in layers})
    if unknown:
        known = ", ".join(repr(n) for n in sorted(layers)) or "none"
        raise DeltaError(f"unknown task id {unknown[0]!r}: the deltas attached to this model are {known}; "
                         "a row's task is the name of an attached delta, or None for the bare backbone")
    selectors: dict[int, RowSelector] = {}
    for name, group in layers.items():
        for layer in group:
            reason = layer.mixed_batch_refusal()
            if reason:
                raise DeltaStateError(
                    f"delta {name!r} cannot serve part of a mixed-task batch: {reason}. "
                    "Detach it while running mixed batches, or run its task on its own")
            selector = layer.__dict__.get("_row_selector")
            if selector is None:
                raise DeltaStateError(f"delta {name!r} was not attached by a delta model, so its rows "
                                      "cannot be selected; attach it with DeltaBase.attach()")
            selectors[id(selector.model)] = selector
    return list(selectors.values())


@contextmanager
def tasks(model: nn.Module, task_ids: Sequence[str | None]) -> Iterator[None]:
    """Run each row *i* of the forwards inside the block with only the deltas named
    ``task_ids[i]`` (``None``: no delta). Works for training too (gradients reach each task's
    delta from its own rows only), under ``torch.inference_mode()`` and with ``generate()``.

    Every name must be an attached delta's; a delta that cannot act on some rows only (a merged
    LoRA, a soft prompt, LoRA on fused experts) must be detached first — both are errors here,
    before anything runs.
    """
    if isinstance(task_ids, (str, bytes)) or not isinstance(task_ids, Sequence) or not task_ids:
        raise DeltaError("task_ids must be a non-empty list with one task name (or None) per row")
    bad = next((t for t in task_ids if t is not None and not isinstance(t, str)), None)
    if bad is not None:
        raise DeltaError(f"task ids are delta names (str) or None, got {bad!r}")
    models = [s.model for s in _selectors(model, task_ids)]
    thread = threading.get_ident()
    rows = TaskRows(task_ids)
    previous = []
    for target in models:
        table = target.__dict__.setdefault(_ATTRIBUTE, {})
        previous.append(table.get(thread))
        table[thread] = rows
    try:
        yield
    finally:
        for target, before in zip(models, previous):
            table = target.__dict__[_ATTRIBUTE]
            if before is None:
                table.pop(thread, None)
            else:
                table[thread] = before
