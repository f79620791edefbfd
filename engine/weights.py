"""Move real weights into a model built on the meta device, one tensor at a time.

Reading tensor by tensor (rather than ``from_pretrained``) lets the caller see progress and
guarantees that only safetensors are parsed unless pickle loading was explicitly allowed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from engine.errors import BackboneError

ProgressCallback = Callable[[int, int], None]


def load_safetensors_into(
    model: nn.Module, files: list[Path], *, progress: ProgressCallback | None = None
) -> None:
    """Fill ``model``'s meta parameters from ``files``; raise if any parameter stays empty."""
    handles = []
    keys: list[tuple[int, str]] = []
    for index, file in enumerate(files):
        try:
            handle = safe_open(str(file), framework="pt")
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types
            raise BackboneError(f"{str(file)!r} is not a readable safetensors file: {exc}") from exc
        handles.append(handle)
        keys.extend((index, key) for key in handle.keys())

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for index, key in keys:
            yield key, handles[index].get_tensor(key)

    _assign(model, tensors(), len(keys), progress, ", ".join(str(f) for f in files))


def assign_state(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    progress: ProgressCallback | None = None,
    origin: str = "state dict",
) -> None:
    """Like :func:`load_safetensors_into`, for a state dict already in memory."""
    _assign(model, iter(state.items()), len(state), progress, origin)


def _assign(
    model: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    total: int,
    progress: ProgressCallback | None,
    origin: str,
) -> None:
    expected = dict(model.state_dict(keep_vars=True))
    prefix = getattr(model, "base_model_prefix", "") or ""
    bar = tqdm(total=total, desc="Loading weights", unit="tensor", disable=None, leave=False)
    done = 0
    try:
        for key, tensor in tensors:
            name = _model_key(key, expected, prefix)
            if name is not None:
                target = expected[name]
                if tuple(target.shape) != tuple(tensor.shape):
                    raise BackboneError(
                        f"weight {key!r} in {origin} has shape {tuple(tensor.shape)}, but the "
                        f"model's {name!r} has {tuple(target.shape)}: config.json does not "
                        "match the weights"
                    )
                set_module_tensor_to_device(model, name, "cpu", value=tensor)
            done += 1
            bar.update(1)
            if progress is not None:
                progress(done, total)
    finally:
        bar.close()
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        shown = ", ".join(missing[:8]) + (" …" if len(missing) > 8 else "")
        raise BackboneError(
            f"{len(missing)} parameters have no weights in {origin}: {shown}; the checkpoint "
            "belongs to another architecture, or its config.json names the wrong class"
        )
    model.eval()


def _model_key(key: str, expected: dict[str, torch.Tensor], prefix: str) -> str | None:
    """The model's name for checkpoint ``key`` (with or without the base-model prefix)."""
    if key in expected:
        return key
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in expected:
        return key[len(prefix) + 1 :]
    if prefix and f"{prefix}.{key}" in expected:
        return f"{prefix}.{key}"
    return None
