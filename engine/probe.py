"""Pseudo-input passes: run a small input through a backbone to learn what static structure
cannot tell (sizes, which modules the forward really calls).

On a meta backbone the pass runs on the meta device — no memory, no arithmetic. Passes hold the
model's lock and switch it to eval mode for their duration (so no BatchNorm statistic moves), and
every hook they add acts only in the probing thread: another thread running the same model at that
moment is not observed, and is not stopped by :class:`ProbeComplete`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from engine.locking import model_lock


class ProbeComplete(Exception):
    """Raised from a probe hook once everything is recorded, to end the pass early."""


def in_probing_thread(hook: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a probe hook so that it acts only in the thread that registered it."""
    owner = threading.get_ident()

    def filtered(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() == owner:
            return hook(*args, **kwargs)
        return None

    return filtered


def module_device_dtype(module: nn.Module, model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where a module's (or, without parameters, the model's) parameters live and their dtype."""
    for source in (module, model):
        parameter = next(source.parameters(), None)
        if parameter is not None:
            return parameter.device, parameter.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def pseudo_input_variants(model: nn.Module, batch: int = 1, length: int = 4) -> Iterator[dict[str, Any]]:
    """Inputs of ``batch`` × ``length`` tokens a transformers model accepts, tried in order (the
    last one suits meta). Small by default: probes only need every module to run once."""
    device, dtype = module_device_dtype(model, model)
    config: Any = getattr(model, "config", None)
    main = getattr(model, "main_input_name", "input_ids")
    if main == "pixel_values":
        size = getattr(config, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)[-2:]  # 224 or (h, w)
        channels = getattr(config, "num_channels", 3)
        yield {"pixel_values": torch.zeros(batch, channels, int(height), int(width), device=device, dtype=dtype)}
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


def user_dummy_inputs(model: nn.Module) -> dict[str, Any] | None:
    """Inputs the user gave the model for pseudo passes (OpenDelta's ``dummy_inputs``): set on the
    instance, or defined by a class of the user's (transformers' own generic default is not
    one), moved to the model's device."""
    owner = next((k for k in type(model).__mro__ if "dummy_inputs" in vars(k)), None)
    given = "dummy_inputs" in model.__dict__ or (
        owner is not None and not owner.__module__.startswith(("transformers.", "torch.")))
    if not given:
        return None
    value = model.dummy_inputs
    if isinstance(value, torch.Tensor):
        value = {"input_ids": value}
    if not isinstance(value, dict):
        raise TypeError(f"{type(model).__name__}.dummy_inputs must be a dict of keyword inputs (or a "
                        f"tensor of input ids), got {type(value).__name__}")
    device, _ = module_device_dtype(model, model)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in value.items()}


def _pass_targets(model: nn.Module) -> list[nn.Module]:
    """The model, then — for a wrapper whose own forward a pseudo input cannot call — the
    outermost transformers models it holds (each run on its own inputs)."""
    inner = []
    for path, module in model.named_modules():
        if path and hasattr(module, "main_input_name") and getattr(module, "config", None) is not None and not any(
                path.startswith(outer + ".") for outer, _ in inner):
            inner.append((path, module))
    return [model, *(module for _, module in inner)]


def run_pseudo_passes(model: nn.Module, done: Callable[[], bool]) -> list[str]:
    """Run pseudo inputs through ``model`` until ``done()``; return the errors met on the way.

    The model's own ``dummy_inputs`` (when the user gave them) go first. A wrapper that holds
    backbones but whose forward rejects every pseudo input has its backbones run instead.
    Call it with the model's lock held (the probes that add hooks must hold it around the
    registration too).
    """
    errors: list[str] = []
    with model_lock(model):
        for target in _pass_targets(model):
            try:
                given = user_dummy_inputs(target)
                variants = ([given] if given is not None else []) + list(pseudo_input_variants(target))
            except Exception as exc:  # noqa: BLE001 - a config the pseudo input cannot follow
                errors.append(f"no pseudo input for {type(target).__name__} ({type(exc).__name__}: {exc})")
                continue
            for inputs in variants:
                try:
                    with torch.no_grad(), module_mode(target, training=False), experts_runnable_on_meta(target):
                        if accepts_use_cache(target) and "use_cache" not in inputs:
                            target(**inputs, use_cache=False)
                        else:
                            target(**inputs)
                except ProbeComplete:
                    return errors
                except Exception as exc:  # noqa: BLE001 - every failure is reported with its paths
                    errors.append(f"{type(exc).__name__}: {exc}")
                if done():
                    return errors
    return errors


def accepts_use_cache(model: nn.Module) -> bool:
    config: Any = getattr(model, "config", None)
    return config is not None and hasattr(config, "use_cache")


@contextlib.contextmanager
def experts_runnable_on_meta(model: nn.Module) -> Iterator[None]:
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
def module_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Eval (probes) or training (traces) mode for a pass, restoring every module's own flag
    afterwards (not just the root's: a model may keep some submodules in another mode on purpose)."""
    modes = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
