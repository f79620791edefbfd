"""The small layers deltas are made of: the delta-module base class and cheap layer construction."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class DeltaModule(nn.Module):
    """Base class of the small modules a delta adds; the tree marks them (and only them) delta."""

    is_delta_module = True

    def mixed_batch_refusal(self) -> str | None:
        """Why this layer cannot act on some rows of a batch only (``None``: it can)."""
        if getattr(self, "merged", False):
            return "it is merged into the backbone's weights, which every row uses; unmerge() it"
        return None


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
