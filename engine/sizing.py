"""Runtime initialisation: the input/output sizes a delta module needs.

Sizes come from the modified module when it declares them (Linear, Conv1D, Embedding, norms,
Conv2d). Otherwise one pseudo-input pass records them with hooks (see :mod:`engine.probe`).
Identical layers (same structural fingerprint) share sizes, so a pass that stops early still sizes
every repeated layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from engine.errors import DeltaError
from engine.locking import model_lock
from engine.probe import ProbeComplete, in_probing_thread, run_pseudo_passes
from engine.roles.kinds import IOSizes, keeps_width
from engine.routing import first_tensor, main_output
from engine.tree import ModuleTree, all_modules


def representatives(model: nn.Module, paths: list[str], tree: ModuleTree | None = None) -> dict[str, str]:
    """Each path → the first path with the same structural fingerprint (probe only those)."""
    if len(set(paths)) <= 1:
        return {p: p for p in paths}
    tree = tree if tree is not None else ModuleTree.from_model(model)
    first: dict[int, str] = {}
    return {p: first.setdefault(tree.node(p).fingerprint, p) for p in paths}


def probe_sizes(model: nn.Module, paths: list[str], tree: ModuleTree | None = None) -> dict[str, IOSizes]:
    """Run a pseudo input through ``model`` and record each module's input/output sizes.

    Only one module per structural fingerprint is watched, and the pass stops once all of them
    have run, so a 126-layer model is sized by its first layer.
    """
    modules = all_modules(model)
    rep = representatives(model, paths, tree)
    watched = sorted(set(rep.values()), key=paths.index)
    seen: dict[str, IOSizes] = {}

    def recorder(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = first_tensor(args, kwargs)
            if hidden is not None:
                seen[path] = IOSizes(hidden.shape[-1], main_output(output).shape[-1])
            if all(p in seen for p in watched):
                raise ProbeComplete

        return hook

    def input_recorder(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = first_tensor(args, kwargs)
            if hidden is not None:
                seen[path] = IOSizes(hidden.shape[-1], hidden.shape[-1])
            if all(p in seen for p in watched):
                raise ProbeComplete

        return hook

    with model_lock(model):
        handles = [
            modules[p].register_forward_pre_hook(in_probing_thread(input_recorder(p)), with_kwargs=True)
            if keeps_width(modules[p])
            else modules[p].register_forward_hook(in_probing_thread(recorder(p)), with_kwargs=True)
            for p in watched
        ]
        try:
            errors = run_pseudo_passes(model, lambda: all(p in seen for p in watched))
        finally:
            for handle in handles:
                handle.remove()
    missing = [p for p in paths if rep[p] not in seen]
    if missing:
        raise DeltaError(
            f"could not find the sizes of {', '.join(missing[:5])}: the module declares none and "
            f"a pseudo-input pass did not reach it ({errors[-1] if errors else 'never called'}); "
            "choose modules with declared sizes (Linear, Conv1D, norms) or a route that needs none"
        )
    return {p: seen[rep[p]] for p in paths}
