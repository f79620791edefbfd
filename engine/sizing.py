"""Runtime initialisation: the input/output sizes a delta module needs.

Sizes come from the modified module when it declares them (Linear, Conv1D, Embedding, norms,
Conv2d). Otherwise one pass of a pseudo input records them with hooks; on a meta backbone that
pass runs on the meta device — no memory, no arithmetic. Identical layers (same structural
fingerprint) share sizes, so a pass that stops early still sizes every repeated layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.errors import DeltaError
from engine.kinds import fused_expert_parameters, is_fused_experts, keeps_width
from engine.routing import first_tensor, main_output
from engine.tree import ModuleTree, all_modules


class ProbeComplete(Exception):
    """Raised from a probe hook once everything is recorded, to end the pass early."""


@dataclass(frozen=True)
class IOSizes:
    """Last-dimension sizes of a module's main input and output."""

    input_dim: int
    output_dim: int


def declared_sizes(module: nn.Module) -> IOSizes | None:
    """Sizes a module states itself, without running it."""
    if isinstance(module, nn.Linear):
        return IOSizes(module.in_features, module.out_features)
    if isinstance(module, nn.Embedding):
        return IOSizes(module.num_embeddings, module.embedding_dim)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return IOSizes(module.in_channels, module.out_channels)
    if isinstance(module, nn.LayerNorm) and module.normalized_shape:
        return IOSizes(module.normalized_shape[-1], module.normalized_shape[-1])
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 linear
        return IOSizes(module.weight.shape[0], module.nf)
    if is_fused_experts(module):
        return _expert_sizes(module)
    weight = getattr(module, "weight", None)
    if "norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return IOSizes(weight.shape[0], weight.shape[0])
    return None


def _expert_sizes(module: nn.Module) -> IOSizes | None:
    """Fused experts: one (experts, out, in) weight, or an up- and a down-projection whose shared
    dimension is the hidden width, in either storage order ((E, 2I, H) + (E, H, I), or transposed)."""
    shapes = [getattr(module, name).shape for name in fused_expert_parameters(module)]
    if len(shapes) == 1:
        return IOSizes(shapes[0][2], shapes[0][1])
    first, last = shapes[0], shapes[-1]
    if first[2] == last[1]:
        return IOSizes(first[2], first[2])
    if first[1] == last[2]:
        return IOSizes(first[1], first[1])
    return None


def module_device_dtype(module: nn.Module, model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where a delta for ``module`` should live: with the module's (or the model's) parameters."""
    for source in (module, model):
        parameter = next(source.parameters(), None)
        if parameter is not None:
            return parameter.device, parameter.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def pseudo_input_variants(model: nn.Module) -> Iterator[dict[str, Any]]:
    """Small inputs a transformers model accepts, tried in order (the last one suits meta)."""
    device, dtype = module_device_dtype(model, model)
    config: Any = getattr(model, "config", None)
    main = getattr(model, "main_input_name", "input_ids")
    batch, length = 1, 4
    if main == "pixel_values":
        size = getattr(config, "image_size", 224)
        channels = getattr(config, "num_channels", 3)
        yield {"pixel_values": torch.zeros(batch, channels, size, size, device=device, dtype=dtype)}
        return
    if main == "input_features":
        bins = getattr(config, "num_mel_bins", 80)
        frames = 2 * getattr(config, "max_source_positions", 1500)
        features = torch.zeros(batch, bins, frames, device=device, dtype=dtype)
        ids = torch.zeros(batch, length, dtype=torch.long, device=device)
        yield {"input_features": features, "decoder_input_ids": ids}
        return
    ids = torch.zeros(batch, length, dtype=torch.long, device=device)
    base: dict[str, Any] = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        base["decoder_input_ids"] = ids
    yield base
    if not getattr(config, "is_encoder_decoder", False):
        # a ready 4-D mask skips transformers' data-dependent mask code, which meta cannot run
        mask = torch.ones(batch, 1, length, length, dtype=torch.bool, device=device)
        yield {**base, "attention_mask": mask}


def run_pseudo_passes(model: nn.Module, done: Callable[[], bool]) -> list[str]:
    """Run pseudo inputs through ``model`` until ``done()``; return the errors met on the way."""
    errors: list[str] = []
    for inputs in pseudo_input_variants(model):
        try:
            with torch.no_grad(), _eval_mode(model), _experts_runnable_on_meta(model):
                if _accepts_use_cache(model):
                    model(**inputs, use_cache=False)
                else:
                    model(**inputs)
        except ProbeComplete:
            break
        except Exception as exc:  # noqa: BLE001 - every failure is reported with its paths
            errors.append(f"{type(exc).__name__}: {exc}")
        if done():
            break
    return errors


def representatives(model: nn.Module, paths: list[str]) -> dict[str, str]:
    """Each path → the first path with the same structural fingerprint (probe only those)."""
    if len(set(paths)) <= 1:
        return {p: p for p in paths}
    tree = ModuleTree.from_model(model)
    first: dict[int, str] = {}
    return {p: first.setdefault(tree.node(p).fingerprint, p) for p in paths}


def probe_sizes(model: nn.Module, paths: list[str]) -> dict[str, IOSizes]:
    """Run a pseudo input through ``model`` and record each module's input/output sizes.

    Only one module per structural fingerprint is watched, and the pass stops once all of them
    have run, so a 126-layer model is sized by its first layer.
    """
    modules = all_modules(model)
    rep = representatives(model, paths)
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

    handles = [
        modules[p].register_forward_pre_hook(input_recorder(p), with_kwargs=True) if keeps_width(modules[p])
        else modules[p].register_forward_hook(recorder(p), with_kwargs=True)
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


def _accepts_use_cache(model: nn.Module) -> bool:
    config: Any = getattr(model, "config", None)
    return config is not None and hasattr(config, "use_cache")


@contextlib.contextmanager
def _experts_runnable_on_meta(model: nn.Module) -> Iterator[None]:
    """On the meta device, fused experts run through batched matmuls: the grouped-matmul kernel's
    meta version accepts bfloat16 only, and the eager loop needs real routing values."""
    config: Any = getattr(model, "config", None)
    current = getattr(config, "_experts_implementation", None)
    switch = current == "grouped_mm" and hasattr(model, "set_experts_implementation") and any(
        p.is_meta for p in model.parameters())
    if switch:
        model.set_experts_implementation("batched_mm")
    try:
        yield
    finally:
        if switch:
            model.set_experts_implementation(current)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
