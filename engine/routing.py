"""Wire a delta module into a modified module with forward hooks — never by editing its class.

| route           | effect                          | hook                           |
|-----------------|---------------------------------|--------------------------------|
| ``before``      | h_in  ← h_in + m(h_in)          | forward pre-hook               |
| ``after``       | h_out ← h_out + m(h_out)        | forward hook                   |
| ``parallel``    | h_out ← h_out + m(h_in)         | forward hook with the input    |
| ``parallel_pair``| h_out(B) ← h_out(B) + m(h_in(A))| pre-hook on A, hook on B       |

Tuple (and ``ModelOutput``) outputs modify their first element. Several deltas on one module
apply in attach order (hooks run in registration order); each returns a :class:`RouteHandle`
whose ``remove()`` detaches just that delta.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from engine.errors import ConfigError, DeltaError

#: ``delta(h) -> tensor to add``; it may return None to add nothing (e.g. while merged).
DeltaFunction = Callable[[torch.Tensor], "torch.Tensor | None"]


class Route(str, Enum):
    BEFORE = "before"
    AFTER = "after"
    PARALLEL = "parallel"
    PARALLEL_PAIR = "parallel_pair"

    @classmethod
    def parse(cls, value: str | Route) -> Route:
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(
                f"unknown route {value!r}; choose one of: {', '.join(r.value for r in cls)}"
            ) from None


@dataclass
class RouteHandle:
    """The hooks that wire one delta into one module; ``remove()`` unwires it."""

    handles: list[RemovableHandle] = field(default_factory=list)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The module's main input: first positional tensor, else ``hidden_states``, else any tensor."""
    for value in args:
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def _writable_in_place(target: torch.Tensor) -> bool:
    """Whether autograd lets ``target`` be changed in place: not a view it forbids that for while
    gradients are recorded (one made inside a custom Function or under no_grad — bitsandbytes'
    8-bit matmul on CPU returns such a view), which takes the out-of-place path instead."""
    if not (torch.is_grad_enabled() and target._is_view()):
        return True
    creation = getattr(torch._C._autograd, "_get_creation_meta", None)
    return creation is not None and creation(target) == torch._C._autograd.CreationMeta.DEFAULT


def _replace_input(
    args: tuple[Any, ...], kwargs: dict[str, Any], new: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    for index, value in enumerate(args):
        if isinstance(value, torch.Tensor):
            return args[:index] + (new,) + args[index + 1 :], kwargs
    key = "hidden_states" if isinstance(kwargs.get("hidden_states"), torch.Tensor) else next(
        k for k, v in kwargs.items() if isinstance(v, torch.Tensor)
    )
    return args, {**kwargs, key: new}


def main_output(output: Any) -> torch.Tensor:
    """The tensor a route modifies: the output itself, or its first element."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "to_tuple"):  # transformers ModelOutput
        first = output.to_tuple()[0]
        if isinstance(first, torch.Tensor):
            return first
    raise DeltaError(f"a delta route needs a tensor output, got {type(output).__name__}")


def _with_main_output(output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    key = next(iter(output.keys()))
    output[key] = new
    return output


def compute_dtype(delta: Any) -> torch.dtype | None:
    """The dtype a delta module computes in: that of its first floating parameter (breadth first;
    this runs on every call, so it reads the module dicts directly)."""
    queue = [delta] if isinstance(delta, nn.Module) else []
    while queue:
        module = queue.pop(0)
        for parameter in module._parameters.values():
            if parameter is not None and parameter.is_floating_point():
                return parameter.dtype
        queue.extend(m for m in module._modules.values() if m is not None)
    return None


def run_delta(delta: DeltaFunction, hidden: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
    """``delta(hidden)`` computed in the delta's own dtype, returned in ``like``'s dtype: a float32
    delta on a bfloat16 backbone reads bfloat16 activations and gives a bfloat16 update."""
    dtype = compute_dtype(delta)
    if dtype is None or (dtype == hidden.dtype and dtype == like.dtype):
        return delta(hidden)
    update = delta(hidden.to(dtype) if hidden.is_floating_point() else hidden)
    return None if update is None else update.to(like.dtype)


def _added(base: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    return base if delta is None else base + delta


def _scaled(base: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    return base if delta is None else base * delta


COMBINE = MappingProxyType({"add": _added, "multiply": _scaled})


#: ``select(like, where)``: ``None`` (every row takes the delta) or the indices along ``like``'s
#: leading dimension of the rows that do, inside a mixed-task batch (see :mod:`engine.mixed_batches`).
RowSelect = Callable[..., "torch.Tensor | None"]


def _combine_rows(combine: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], delta: DeltaFunction,
                  hidden: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``combine(h, delta(h))`` on every row, or only on ``rows`` (the others pass unchanged)."""
    if rows is None:
        return combine(hidden, run_delta(delta, hidden, hidden))
    if not rows.numel():
        return hidden
    part = hidden.index_select(0, rows)
    return hidden.index_copy(0, rows, combine(part, run_delta(delta, part, part)))


def on_rows(select: RowSelect | None, hook: Callable[..., Any]) -> Callable[..., Any]:
    """A forward hook (``with_kwargs``) that transforms a module's output row by row, run only on
    the rows ``select`` picks: it sees those rows of the input and the output, and the others are
    left as they were."""
    if select is None:
        return hook

    def selected(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        target = main_output(output)
        rows = select(target, type(module).__name__)
        if rows is None:
            return hook(module, args, kwargs, output)
        if not rows.numel():
            return output
        hidden = first_tensor(args, kwargs)
        if hidden is None:
            raise DeltaError(f"a mixed-task batch found no tensor input to {type(module).__name__}")
        args, kwargs = _replace_input(args, kwargs, hidden.index_select(0, select(hidden, type(module).__name__)))
        changed = main_output(hook(module, args, kwargs, target.index_select(0, rows)))
        return _with_main_output(output, target.index_copy(0, rows, changed))

    return selected


def _add_rows(target: torch.Tensor, update: torch.Tensor | None, rows: torch.Tensor,
              mode: str, in_place: bool) -> torch.Tensor:
    """``target`` with ``update`` (computed for ``rows`` only) added to, or multiplied into, them."""
    if update is None:
        return target
    if mode == "multiply":
        return target.index_copy(0, rows, target.index_select(0, rows) * update)
    if in_place:
        return target.index_add_(0, rows, update)
    return target.index_add(0, rows, update)


def attach_route(
    route: Route | str,
    module: nn.Module,
    delta: DeltaFunction,
    partner: nn.Module | None = None,
    in_place: bool = False,
    mode: str = "add",
    select: RowSelect | None = None,
) -> RouteHandle:
    """Hook ``delta`` into ``module`` along ``route``; ``partner`` is module B of parallel_pair.

    ``mode="multiply"`` scales the hidden state by the delta's output instead of adding to it
    (IA3: ``before`` scales a module's input, ``after`` its output). ``in_place`` (parallel,
    add) adds into the module's output tensor instead of allocating a new one; only valid for
    modules whose backward never reads their output (Linear, Conv1D, Embedding, Conv2d).
    ``select`` restricts the delta to some rows of the batch (mixed-task batches). A delta with
    an ``add_into(input, output) -> bool`` method may add its update into the output itself
    (in place, add, every row), and one with ``add_mixed_into(module, input, output) -> bool``
    may do so for every row of a mixed batch at once; False takes the general path instead.
    """
    route = Route.parse(route)
    if mode not in COMBINE:
        raise ConfigError(f"unknown route mode {mode!r}; choose add or multiply")
    combine = COMBINE[mode]
    pick: RowSelect = select if select is not None else (lambda like, where="": None)
    handle = RouteHandle()
    if route is Route.BEFORE:

        def before(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = first_tensor(args, kwargs)
            if hidden is None:
                raise DeltaError(f"route 'before' found no tensor input to {type(mod).__name__}")
            rows = pick(hidden, type(mod).__name__)
            return _replace_input(args, kwargs, _combine_rows(combine, delta, hidden, rows))

        handle.handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
    elif route is Route.AFTER:

        def after(mod: nn.Module, args: tuple, output: Any) -> Any:
            hidden = main_output(output)
            rows = pick(hidden, type(mod).__name__)
            return _with_main_output(output, _combine_rows(combine, delta, hidden, rows))

        handle.handles.append(module.register_forward_hook(after))
    elif route is Route.PARALLEL:
        in_place_allowed = in_place

        def parallel(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            target = main_output(output)
            source = first_tensor(args, kwargs)
            rows = pick(target, type(mod).__name__)
            in_place = in_place_allowed and _writable_in_place(target)
            if rows is not None:
                if in_place and mode == "add" and hasattr(delta, "add_mixed_into") and delta.add_mixed_into(
                        mod, source, target):
                    return output  # the module's deltas added every row's update at once
                if not rows.numel():
                    return output
                update = run_delta(delta, source.index_select(0, pick(source, type(mod).__name__)), target)
                changed = _add_rows(target, update, rows, mode, in_place)
                return output if changed is target else _with_main_output(output, changed)
            if in_place and mode == "add" and hasattr(delta, "add_into") and delta.add_into(source, target):
                return output  # the delta added its update into the output itself
            update = run_delta(delta, source, target)
            if in_place and mode == "add" and update is not None:
                target.add_(update)
                return output
            return _with_main_output(output, combine(target, update))

        handle.handles.append(module.register_forward_hook(parallel, with_kwargs=True))
    else:
        if partner is None:
            raise ConfigError("route 'parallel_pair' needs a partner module B (the output side)")
        saved: list[torch.Tensor] = []

        def remember(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            saved[:] = [first_tensor(args, kwargs)]

        def add_saved(mod: nn.Module, args: tuple, output: Any) -> Any:
            if not saved:
                raise DeltaError("route 'parallel_pair': module B ran before module A")
            hidden = saved.pop()
            target = main_output(output)
            rows = pick(target, type(mod).__name__)
            if rows is not None:
                if not rows.numel():
                    return output
                hidden = hidden.index_select(0, pick(hidden, type(mod).__name__))
            update = run_delta(delta, hidden, target)
            expected = target.shape if rows is None else (len(rows), *target.shape[1:])
            if update is not None and update.shape != expected and update.numel() == math.prod(expected):
                update = update.reshape(expected)  # B sees the tokens flattened (OPT's FFN)
            if rows is not None:
                return _with_main_output(output, _add_rows(target, update, rows, mode, False))
            return _with_main_output(output, combine(target, update))

        handle.handles.append(module.register_forward_pre_hook(remember, with_kwargs=True))
        handle.handles.append(partner.register_forward_hook(add_saved))
    return handle
