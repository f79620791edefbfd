"""Delta checkpoints: ``config.json`` + ``delta.safetensors`` with delta tensors only.

Files are written to temporary names and renamed into place, so a crash never leaves a
half-written checkpoint. Loading checks the checkpoint against the backbone before touching it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from engine.errors import CheckpointError, DeltaStateError

if TYPE_CHECKING:
    from engine.delta import DeltaBase

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "delta.safetensors"
CHECKPOINT_FORMAT = "delta-checkpoint/1"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` as a safetensors file atomically (delta checkpoints are small)."""
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, safetensors_bytes(data, metadata=metadata))


def _gathered(tensor: torch.Tensor) -> torch.Tensor:
    """A full tensor: FSDP2 shards parameters as DTensors, gathered here (a collective)."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else tensor


def _writes() -> bool:
    """Only rank 0 writes when running under torch.distributed."""
    distributed = torch.distributed
    return not (distributed.is_available() and distributed.is_initialized()) or distributed.get_rank() == 0


def save_delta(delta: DeltaBase, directory: Path) -> Path:
    """Under torch.distributed, call it on every rank: sharded tensors are gathered, rank 0 writes."""
    state = {key: _gathered(tensor) for key, tensor in delta.delta_state().items()}
    if any(t.is_meta for t in state.values()):
        raise DeltaStateError(
            "this delta lives on a meta backbone and has no values to save; build it on a "
            "backbone with real weights (load_backbone of a directory or 'minilm')"
        )
    if not _writes():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "format": CHECKPOINT_FORMAT,
        **delta.config.to_dict(),
        "resolved_modules": delta.modified_paths,
        "backbone_class": type(delta.backbone_model).__name__,
        "trainable_parameters": delta.num_trainable_parameters(),
    }
    atomic_write_safetensors(directory / WEIGHTS_FILE, state,
                             {"format": CHECKPOINT_FORMAT, "delta_type": delta.delta_type})
    atomic_write_bytes(directory / CONFIG_FILE, json.dumps(config, indent=2).encode())
    return directory


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{str(directory)!r} has no {CONFIG_FILE}; a delta checkpoint is a directory "
            f"written by save_finetuned() ({CONFIG_FILE} + {WEIGHTS_FILE})"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or "delta_type" not in data:
        raise CheckpointError(f"{str(path)!r} is not a delta config (no delta_type)")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a missing or damaged file is a :class:`CheckpointError`."""
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} is missing; save_finetuned() writes it")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise CheckpointError(
            f"{str(path)!r} is corrupted or truncated ({exc}); save the delta again"
        ) from exc


def load_delta(directory: Path, backbone_model: nn.Module) -> DeltaBase:
    """Rebuild a saved delta on ``backbone_model``; the backbone is untouched if anything fails."""
    from engine.auto import AutoDeltaConfig
    from engine.methods import method_for

    raw = read_config(directory)
    saved_modules = raw.get("resolved_modules")
    config = AutoDeltaConfig.from_dict(
        {k: v for k, v in raw.items()
         if k not in ("format", "resolved_modules", "backbone_class", "trainable_parameters")}
    )
    tensors = read_safetensors(directory / WEIGHTS_FILE)
    delta = method_for(config.delta_type)(backbone_model, config=config, attach=False)
    if saved_modules is not None and list(saved_modules) != delta.modified_paths:
        missing = [p for p in saved_modules if p not in delta.modified_paths]
        extra = [p for p in delta.modified_paths if p not in saved_modules]
        raise CheckpointError(
            "this checkpoint was made for another backbone: its modules do not match. "
            f"In the checkpoint only: {_listing(missing)}; in this backbone only: {_listing(extra)}"
        )
    fill_delta(delta, tensors)
    return delta.attach()


def fill_delta(delta: DeltaBase, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into a built (unattached) delta; keys and shapes must match exactly."""
    expected = delta.delta_state()
    missing_keys = sorted(set(expected) - set(tensors))
    unexpected_keys = sorted(set(tensors) - set(expected))
    if missing_keys or unexpected_keys:
        raise CheckpointError(
            f"checkpoint keys do not fit this backbone: missing {_listing(missing_keys)}; "
            f"unexpected {_listing(unexpected_keys)}"
        )
    wrong = [
        f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items() if tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise CheckpointError(f"checkpoint tensor shapes do not fit this backbone: {_listing(wrong)}")
    with torch.no_grad():
        for key, target in expected.items():
            if target.is_meta:
                raise DeltaStateError("cannot load a checkpoint into a delta on a meta backbone")
            target.copy_(tensors[key])


def _listing(items: list[str], limit: int = 6) -> str:
    if not items:
        return "none"
    shown = ", ".join(items[:limit])
    return shown + (f" … ({len(items)} in all)" if len(items) > limit else "")
