"""Delta checkpoints on disk: ``config.json`` + ``delta.safetensors``. This module only reads and
writes (a config dict and named tensors); which class to build and how to fill it is
:mod:`engine.delta`'s business.

A checkpoint's files change together or not at all: the new files are written beside the old ones
under staging names and synced, then a commit marker (written atomically) names them, then each is
renamed into place and the marker removed. A crash before the marker leaves the old checkpoint
(the staged files are discarded by the next read or write); a crash after it leaves a checkpoint
that the next read or write finishes. Either way a reader sees the previous or the new version,
never the new weights with the old config.
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
RECORD_KEYS = ("format", "resolved_modules", "backbone_class", "trainable_parameters", "unfrozen_paths",
               "structure_hash")
#: Tensor-name prefixes: parameters shared by all of a delta's modules, and backbone tensors that
#: trained with the delta (its unfrozen modules). Module paths never contain "::".
SHARED_PREFIX = "shared::"
#: The marker naming the staged files of a write in progress (see the module docstring).
COMMIT_FILE = ".delta-commit"
#: Files written by this engine (ours and PEFT's layout): their temporary leftovers are removed.
KNOWN_FILES = ("config.json", "delta.safetensors", "adapter_config.json", "adapter_model.safetensors")
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
        _sync_directory(path.parent)  # the rename itself survives a power cut
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def safetensors_data(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """``tensors`` serialised as a safetensors file."""
    return safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


def _synced_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())


def _sync_directory(directory: Path) -> None:
    """Make renames and removals in ``directory`` durable."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _staged(directory: Path, name: str) -> Path:
    return directory / f".{name}.staged"


def write_files_together(directory: Path, files: dict[str, bytes]) -> Path:
    """Replace the files named in ``files`` in ``directory`` as one unit (see the module
    docstring); one writer at a time per directory."""
    directory.mkdir(parents=True, exist_ok=True)
    recover(directory)
    try:
        for name, data in files.items():
            _synced_write(_staged(directory, name), data)
        atomic_write_bytes(directory / COMMIT_FILE, json.dumps(sorted(files)).encode())
    except BaseException:
        for name in files:
            _staged(directory, name).unlink(missing_ok=True)
        raise
    _roll_forward(directory)
    return directory


def _roll_forward(directory: Path) -> None:
    """Finish a committed write: rename its staged files into place, then drop the marker."""
    names = json.loads((directory / COMMIT_FILE).read_text())
    for name in names:
        staged = _staged(directory, name)
        if staged.exists():
            os.replace(staged, directory / name)
    _sync_directory(directory)
    (directory / COMMIT_FILE).unlink()
    _sync_directory(directory)


def recover(directory: Path) -> None:
    """Finish a write that reached its commit marker, or discard one that did not (and any
    temporary files an interrupted write left); nothing to do for an intact checkpoint."""
    if not directory.is_dir():
        return
    leftovers = [p for p in directory.iterdir() if p.name.startswith(".") and (
        p.name.endswith(".staged") or (p.name.startswith(f".{COMMIT_FILE}.") and p.name != COMMIT_FILE)
        or any(p.name.startswith(f".{known}.") for known in KNOWN_FILES))]
    try:
        if (directory / COMMIT_FILE).exists():
            _roll_forward(directory)
        for path in leftovers:
            path.unlink(missing_ok=True)
    except OSError as exc:
        raise CheckpointError(f"{str(directory)!r} holds an interrupted save that could not be finished "
                              f"({exc}); give this process write access to it, or save again") from exc


def write_checkpoint(directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write the weights and the config (its ``delta_type`` names the tensors' owner) together."""
    weights = safetensors_data(tensors, {"format": CHECKPOINT_FORMAT, "delta_type": str(config["delta_type"])})
    text = json.dumps({"format": CHECKPOINT_FORMAT, **config}, indent=2, allow_nan=False)
    return write_files_together(directory, {WEIGHTS_FILE: weights, CONFIG_FILE: text.encode()})


def read_config(directory: Path) -> dict[str, Any]:
    recover(directory)
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
    """The config (as saved) and every tensor of a checkpoint directory (an interrupted save is
    finished or discarded first, so both are of one version)."""
    return read_config(directory), read_safetensors(directory / WEIGHTS_FILE)


def listing(items: list[str], limit: int = 6) -> str:
    """A short, readable list for error messages."""
    if not items:
        return "none"
    shown = ", ".join(items[:limit])
    return shown + (f" … ({len(items)} in all)" if len(items) > limit else "")
