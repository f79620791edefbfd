"""Building blocks for delta methods: the delta-module base class, cheap layer construction, and
the rules for which backbone modules a method may target."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.errors import ModuleNotSupportedError


class DeltaModule(nn.Module):
    """Base class of the small modules a delta adds; the tree marks them (and only them) delta."""

    is_delta_module = True


def new_linear(
    in_features: int, out_features: int, bias: bool, device: torch.device, dtype: torch.dtype,
    init: Callable[[nn.Linear], None] | None = None,
) -> nn.Linear:
    """A Linear layer initialised by ``init`` (default: PyTorch's), never on the meta device.

    Initialising meta tensors computes nothing yet costs ~100 µs a call, which dominated building
    deltas on every layer of a 405B meta backbone.
    """
    # nn.Linear.__init__ would run reset_parameters (and so would nn.utils.skip_init, which
    # builds on meta first): set up the same attributes around empty parameters instead.
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = in_features, out_features
    layer.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
    layer.register_parameter(
        "bias", nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
    )
    if not layer.weight.is_meta:
        (init or nn.Linear.reset_parameters)(layer)
    return layer


def zero_init(layer: nn.Linear) -> None:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def inside_delta(path: str, modules: dict[str, nn.Module]) -> bool:
    """True when ``path`` is a delta module or lies inside one (never a target for a method)."""
    parts = path.split(".")
    return any(
        getattr(modules.get(".".join(parts[:i])), "is_delta_module", False)
        for i in range(1, len(parts) + 1)
    )


def descend_to(
    method: str,
    paths: list[str],
    modules: dict[str, nn.Module],
    accepts: Callable[[nn.Module], bool],
    wanted: str,
) -> list[str]:
    """Each path if ``accepts`` its module, else its accepted descendants (outside deltas).

    Lets a method take a container (an attention block, an FFN) for all the layers inside it
    that the method can handle; a container with none of them is an error naming it.
    """
    selected: dict[str, None] = {}
    for path in paths:
        module = modules[path]
        if accepts(module):
            selected[path] = None
            continue
        inner = [
            f"{path}.{name}" for name, child in module.named_modules()
            if name and accepts(child) and not inside_delta(f"{path}.{name}", modules)
        ]
        if not inner:
            raise ModuleNotSupportedError(
                f"{method} cannot wrap {path!r}, a {type(module).__name__}: neither it nor its "
                f"submodules are {wanted}; choose such modules (`delta-designer tree` shows them)"
            )
        selected.update(dict.fromkeys(inner))
    order = {p: i for i, p in enumerate(modules)}
    return sorted(selected, key=order.__getitem__)
