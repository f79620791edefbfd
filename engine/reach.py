"""Which targets the model's forward really runs: a delta hooked to a module that the model never
calls — because it reads the module's weight directly, as transformers' Mamba does with
``dt_proj.weight`` — would train nothing and merge into something else. Such targets are found
by one pseudo-input pass and refused by name.

The pass watches one module per kind (path with layer indices folded, and structural fingerprint)
and stops once each has run. A watched module whose forward never runs while its own parameters
are used by code outside every module that owns them is *bypassed*. One whose forward never runs
and whose parameters are never read was simply not reached by the pseudo input (a cross-attention
without encoder states, a vision tower fed no image): it is not refused.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from engine.locking import model_lock
from engine.probe import ProbeComplete, in_probing_thread, run_pseudo_passes
from engine.tree import ModuleTree

if TYPE_CHECKING:
    from engine.roles import ModelStructure

_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)")


def _kind(path: str, tree: ModuleTree) -> tuple[str, int]:
    return _INDEX.sub("*", path), tree.node(path).fingerprint


class _DirectReads(TorchFunctionMode):
    """Records torch calls that take a watched parameter while none of its owners is running."""

    def __init__(self, owner_of: dict[int, str], running: Counter[int]) -> None:
        super().__init__()
        self.owner_of, self.running = owner_of, running
        self.thread = threading.get_ident()
        self.reads: dict[str, str] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if threading.get_ident() == self.thread and getattr(func, "__name__", "") != "__get__":
            for value in _tensor_arguments(args, kwargs):
                path = self.owner_of.get(id(value))
                if path is not None and not self.running[id(value)] and path not in self.reads:
                    self.reads[path] = getattr(func, "__name__", repr(func))
        return func(*args, **kwargs)


def _tensor_arguments(args: tuple, kwargs: dict) -> Iterator[torch.Tensor]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, torch.Tensor))


def find_bypassed(structure: ModelStructure, paths: list[str]) -> dict[str, str]:
    """Targets whose weights the model reads without calling them: path → what reads them.

    What one pass learnt about a kind of module is kept on ``structure`` (which lives as long as
    the operation — or, for a model nothing is attached to, as the designer's planning copy), so
    repeated plans on one structure probe only kinds not seen before.
    """
    model, tree, modules = structure.model, structure.tree, structure.modules
    groups: dict[tuple[str, int], list[str]] = {}
    for path in paths:
        groups.setdefault(_kind(path, tree), []).append(path)
    known = structure.reach
    unseen = {kind: members[0] for kind, members in groups.items() if kind not in known}
    if unseen:
        readers = _probe(model, list(unseen.values()), modules)
        for kind, path in unseen.items():
            known[kind] = readers.get(path)
    bypassed: dict[str, str] = {}
    for kind, members in groups.items():
        if known[kind] is not None:
            bypassed.update(dict.fromkeys(members, known[kind]))
    return bypassed


def _probe(model: nn.Module, representatives: list[str], modules: dict[str, nn.Module]) -> dict[str, str]:
    """One pass watching ``representatives``: each that never ran although code outside its
    owners used its parameters → the name of the function that used them."""
    watched = {path: modules[path] for path in representatives}
    owner_of = {id(p): path for path, module in watched.items() for p in module.parameters(recurse=False)}
    if not owner_of:
        return {}
    fired: set[str] = set()
    running: Counter[int] = Counter()

    def entering(ids: list[int], path: str | None):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple) -> None:
            running.update(ids)
            if path is not None:
                fired.add(path)
                if len(fired) == len(watched):
                    raise ProbeComplete

        return hook

    def leaving(ids: list[int]):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            running.subtract(ids)

        return hook

    with model_lock(model):
        handles = []
        for path, module in modules.items():  # every owner of a watched parameter (tied ones too)
            ids = [id(p) for p in module.parameters(recurse=False) if id(p) in owner_of]
            target = path if path in watched else None
            if ids or target is not None:
                handles.append(module.register_forward_pre_hook(in_probing_thread(entering(ids, target))))
                handles.append(module.register_forward_hook(in_probing_thread(leaving(ids)), always_call=True))
        reads = _DirectReads(owner_of, running)
        try:
            with reads:
                run_pseudo_passes(model, lambda: len(fired) == len(watched))
        finally:
            for handle in handles:
                handle.remove()
    return {path: reader for path, reader in reads.reads.items() if path not in fired}
