"""What one training step needs besides the weights and the trainable states, found by running
that step — forward *and* backward — on the meta device (shapes only, nothing allocated) with the
design attached, and following every tensor's storage from the operation that creates it to the
moment it is freed. The answer is the most bytes alive at any moment: what autograd keeps for
the backward pass, the output and the loss, and the gradients the backward pass works with.

Nothing is guessed from shapes or formulas; the step's own program decides. Three things a GPU
step does differently from the meta step are made to match it:

* the model's parameters and buffers are weights, counted by :mod:`engine.memory_plan` in their
  real format — an operation that keeps a weight for its backward keeps a reference, not bytes;
  the trainable parameters' gradients are counted with the trainable states, not here;
* fused (flash / memory-efficient) attention never holds sequence × sequence scores: for
  ``attention="flash"`` the model runs its SDPA attention, and each call keeps what those kernels
  keep (queries, keys, values, output and a float32 log-sum-exp per query) instead of the scores
  PyTorch's reference decomposition would keep on meta;
* fused MoE experts cannot run their grouped-matmul kernel on meta, so the step runs them as
  batched matmuls, which gather every routed token's expert weights; those gathers are the
  weights again (the real kernel reads them in place) and are left out.

Gradient checkpointing is transformers' own (non-reentrant): the meta step recomputes each layer
in the backward pass as the real one does.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from engine.errors import ConfigError
from engine.locking import model_lock
from engine.probe import (
    accepts_use_cache,
    experts_runnable_on_meta,
    module_mode,
    pseudo_input_variants,
)
from engine.roles.kinds import fused_expert_parameters, is_fused_experts

_GATHERS = (torch.ops.aten.index.Tensor, torch.ops.aten.index_select.default)
#: model classes whose forward computes a language-modelling loss from ``labels`` shaped like the ids
_LM_HEADS = ("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForConditionalGeneration")


@dataclass(frozen=True)
class ActivationTrace:
    """Bytes one training step holds beyond weights and trainable states."""

    #: the most alive at any moment of the forward and backward passes
    peak: int
    #: alive when the forward pass ends: what autograd keeps, the output and the loss
    after_forward: int
    layers: int
    hidden: int


def layer_modules(model: nn.Module) -> list[nn.Module]:
    """The repeated layers: members of every ``ModuleList`` not inside another one's member
    (BERT's 12, T5's encoder 12 + decoder 12; a block's own sub-lists are not layers)."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, nn.ModuleList) and len(module):
            found.extend(module)
            inside.update(id(m) for member in module for m in member.modules())
    return found


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model reads (its position table), when its config says."""
    config: Any = getattr(model, "config", None)
    longest = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return longest if isinstance(longest, int) and not isinstance(longest, bool) else None


@contextlib.contextmanager
def computing_in(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """The weight-free ``model``'s floating parameters and buffers in ``dtype`` for the body (a
    trace then sees the tensors a model loaded in that dtype computes), restored afterwards.
    Call with the model's lock held, before a design is attached (deltas choose their own dtype)."""
    _require_meta(model)
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    originals = [t.dtype for t in tensors]
    for tensor in tensors:
        tensor.data = tensor.data.to(dtype)
    try:
        yield
    finally:
        for tensor, original in zip(tensors, originals):
            tensor.data = tensor.data.to(original)


def trace_activations(model: nn.Module, batch: int, sequence: int, *, attention: str = "flash",
                      checkpointing: bool = False) -> ActivationTrace:
    """Run one training step of the weight-free ``model`` (deltas attached, backbone frozen, in
    the dtype it is in: see :func:`computing_in`) at ``batch`` × ``sequence`` on meta and follow
    its memory. ``attention``: ``"flash"`` (fused kernels) or ``"eager"`` (scores kept)."""
    _require_meta(model)
    longest = max_positions(model)
    if longest is not None and sequence > longest:
        raise ConfigError(f"sequence {sequence:,} is longer than {type(model).__name__} reads "
                          f"(max_position_embeddings = {longest:,}); plan with at most {longest:,} tokens")
    weights = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    experts = {getattr(m, name).untyped_storage()._cdata for m in model.modules() if is_fused_experts(m)
               for name in fused_expert_parameters(m)}
    errors = []
    with model_lock(model), module_mode(model, training=True), experts_runnable_on_meta(model), \
            _attention(model, attention), _checkpointing(model, checkpointing, attention == "flash"):
        for inputs in _training_inputs(model, batch, sequence):
            live = _LiveBytes(set(weights), experts)
            try:
                with _gradients_counted_elsewhere(model, live), _FlashKernels(attention == "flash"), live:
                    output = model(**inputs, use_cache=False) if accepts_use_cache(model) else model(**inputs)
                    loss = _loss(output)
                    after_forward = live.now
                    loss.backward()
                break
            except Exception as exc:  # noqa: BLE001 - the next input variant may suit the model
                errors.append(f"{type(exc).__name__}: {exc}")
        else:
            raise ConfigError(f"could not trace a training step of {type(model).__name__} on meta: {errors[-1]}")
    config: Any = getattr(model, "config", None)
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0) or 0)
    return ActivationTrace(peak=live.peak, after_forward=after_forward,
                           layers=max(len(layer_modules(model)), 1), hidden=hidden)


def _require_meta(model: nn.Module) -> None:
    if any(not p.is_meta for p in model.parameters()):
        raise ConfigError("a training step is traced on the meta device: pass the weight-free twin of the model")


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages operations create, from creation until freed; their peak. What an
    operation computes from weights alone is weights, not activations, and is not counted."""

    def __init__(self, skipped: set[int], expert_weights: set[int]) -> None:
        super().__init__()
        self.skipped = skipped
        #: storages of fused expert weights: routing-indexed gathers of them are weights too
        self.expert_weights = expert_weights
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def forget(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def skip(self, tensor: torch.Tensor) -> None:
        """Count ``tensor``'s storage elsewhere (no longer, or never, here) while it lives: a freed
        storage's address is soon another's, so the mark goes with it."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        self.forget(key)
        if key not in self.skipped:
            self.skipped.add(key)
            weakref.finalize(storage, self.skipped.discard, key)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        result = func(*args, **(kwargs or {}))
        operands = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        from_weights = bool(operands) and all(t.untyped_storage()._cdata in self.skipped for t in operands) or (
            func in _GATHERS and operands[0].untyped_storage()._cdata in self.expert_weights)
        for tensor in tree_flatten(result)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            if from_weights:  # a copy, reshaping or routed gather of weights
                self.skip(tensor)
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self.live or key in self.skipped:
                continue
            self.live[key] = int(storage.nbytes())
            self.now += self.live[key]
            weakref.finalize(storage, self.forget, key)
            self.peak = max(self.peak, self.now)
        return result


@contextlib.contextmanager
def _gradients_counted_elsewhere(model: nn.Module, live: _LiveBytes) -> Iterator[None]:
    """The trainable parameters' gradients belong to the trainable states: not counted here."""
    def counted_elsewhere(gradient: torch.Tensor) -> None:
        live.skip(gradient)

    trainable = [p for p in model.parameters() if p.requires_grad]
    kept = [p.grad for p in trainable]  # the caller's gradients, as they were
    for parameter in trainable:
        parameter.grad = None
    handles = [p.register_hook(counted_elsewhere) for p in trainable]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for parameter, gradient in zip(trainable, kept):
            parameter.grad = gradient


class _FlashOnMeta(torch.autograd.Function):
    """What a fused attention kernel allocates and keeps: the output and a float32 log-sum-exp
    per query, with queries, keys and values kept for the backward pass (which returns their
    gradients) — never the sequence × sequence scores."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        output = query.new_empty((*query.shape[:-1], value.shape[-1]))
        log_sum_exp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, output, log_sum_exp)
        return output

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> tuple[torch.Tensor, ...]:
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


class _FlashKernels(TorchFunctionMode):
    """``scaled_dot_product_attention`` as a fused kernel computes it, memory-wise (meta only)."""

    def __init__(self, active: bool) -> None:
        super().__init__()
        self.active = active

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if self.active and func is torch.nn.functional.scaled_dot_product_attention:
            query, key, value = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")][len(args):])[:3]
            return _FlashOnMeta.apply(query, key, value)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _attention(model: nn.Module, attention: str) -> Iterator[None]:
    """The model's attention set to SDPA (flash) or eager for the step, when it can switch."""
    config: Any = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    wanted = "sdpa" if attention == "flash" else "eager"
    switch = hasattr(model, "set_attn_implementation") and current is not None and current != wanted
    if switch:
        try:
            model.set_attn_implementation(wanted)
        except (ValueError, ImportError):
            switch = False  # the model supports only its own: traced as it runs
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(current)


@contextlib.contextmanager
def _checkpointing(model: nn.Module, enabled: bool, flash: bool) -> Iterator[None]:
    """transformers' gradient checkpointing for the step, when asked (refused where unsupported).
    The recomputation in the backward pass runs outside the step's function modes, so the fused
    attention kernels are installed for it through checkpoint's own ``context_fn``."""
    if not enabled:
        yield
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(model).__name__} does not support gradient checkpointing in transformers; "
                          "plan without it")
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"  # renamed in 5.x
    was = bool(getattr(model, f"is_{prefix}_checkpointing", False))
    getattr(model, f"{prefix}_checkpointing_enable")(**{f"{prefix}_checkpointing_kwargs": {
        "use_reentrant": False, "context_fn": lambda: (contextlib.nullcontext(), _FlashKernels(flash))}})
    try:
        yield
    finally:
        if not was:
            getattr(model, f"{prefix}_checkpointing_disable")()


def _training_inputs(model: nn.Module, batch: int, sequence: int) -> Iterator[dict[str, Any]]:
    """The probe's inputs, first with ``labels`` where the model computes a language-modelling
    loss from them (the loss keeps the log-probabilities over the vocabulary)."""
    with_labels = type(model).__name__.endswith(_LM_HEADS)
    for inputs in pseudo_input_variants(model, batch, sequence):
        if with_labels:
            labels = inputs.get("decoder_input_ids", inputs.get("input_ids"))
            if labels is not None:
                yield {**inputs, "labels": labels}
        yield inputs


def _loss(output: Any) -> torch.Tensor:
    """The model's own loss, else the sum of its main output in float32 (a plain user loss)."""
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value.float().sum()
    first = output if isinstance(output, torch.Tensor) else output[0]
    return first.float().sum()
