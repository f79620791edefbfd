"""A custom model whose module names are HTML, to prove the page escapes them."""

from torch import nn

EVIL_NAME = "<img src=x onerror=alert(1)>"


def evil() -> nn.Module:
    model = nn.Module()
    model.add_module(EVIL_NAME, nn.Linear(3, 3))
    model.add_module("layers", nn.ModuleList(nn.Linear(3, 3) for _ in range(3)))
    return model
