"""Which backbone modules a method may target: never a delta's own modules; containers stand for
the layers inside them that the method can handle."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from engine.errors import ModuleNotSupportedError


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
