"""Small hand-made models whose trees the tests know by heart."""

from __future__ import annotations

from torch import nn


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.act = nn.ReLU()


class Toy(nn.Module):
    """embed → 4 identical blocks → head (no bias)."""

    def __init__(self, width: int = 4, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(layers))
        self.head = nn.Linear(width, 2, bias=False)


def toy() -> nn.Module:
    """Factory used by the python: source tests."""
    return Toy()


def not_a_module() -> str:
    return "not a module"
