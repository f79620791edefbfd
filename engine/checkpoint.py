"""Delta checkpoints on disk: ``config.json`` + ``delta.safetensors``. This module only reads and
writes (a config dict and named tensors); which class to build and how to fill it is
:mod:`engine.delta`'s business.

Files are written to temporary names, flushed to disk and renamed into place, so a crash never
leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from engine.errors import CheckpointError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "delta.safetensors"
CHECKPOINT_FORMAT = "delta-checkpoint/1"
#: Keys of the config that describe a checkpoint rather than configure the delta.
RECORD_KEYS = ("format", "resolved_modules", "backbone_class", "trainable_parameters", "unfrozen_paths")
#: Tensor-name prefixes: parameters shared by all of a delta's modules, and backbone tensors that
#: trained with the delta (its unfrozen modules). Module paths never contain "::".
SHARED_PREFIX = "shared::"
BACKBONE_PREFIX = "backbone::"


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


def write_checkpoint(directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write the weights, then the config (its ``delta_type`` names the tensors' owner)."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_safetensors(directory / WEIGHTS_FILE, tensors,
                             {"format": CHECKPOINT_FORMAT, "delta_type": str(config["delta_type"])})
    atomic_write_bytes(directory / CONFIG_FILE, json.dumps({"format": CHECKPOINT_FORMAT, **config},
                                                           indent=2, allow_nan=False).encode())
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


def read_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config (as saved) and every tensor of a checkpoint directory."""
    return read_config(directory), read_safetensors(directory / WEIGHTS_FILE)


def listing(items: list[str], limit: int = 6) -> str:
    """A short, readable list for error messages."""
    if not items:
        return "none"
    shown = ", ".join(items[:limit])
    return shown + (f" … ({len(items)} in all)" if len(items) > limit else "")
