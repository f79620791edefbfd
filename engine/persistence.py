"""Saving and loading a delta: what goes into a checkpoint, and the one-way load flow
(read → pick the class → build → check → fill → attach).

A checkpoint holds every tensor that trains with the delta — the delta's own modules, the tensors
shared by them, and the delta's *unfrozen* backbone modules (``freeze_module(exclude=[...])``,
OpenDelta's ``unfrozen_modules``). A backbone tensor that requires grad but is in none of these is
an error at save time: a checkpoint never silently leaves out a trained tensor.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.checkpoint import (
    BACKBONE_PREFIX,
    RECORD_KEYS,
    listing,
    read_checkpoint,
    write_checkpoint,
)
from engine.errors import CheckpointError, ConfigError, DeltaStateError
from engine.registry import method_for
from engine.tree import all_modules

if TYPE_CHECKING:
    from engine.delta import DeltaBase


def _delta_tensor_ids(model: nn.Module) -> set[int]:
    """Every parameter and buffer inside any delta module attached to ``model``."""
    ids: set[int] = set()
    for module in model.modules():
        if getattr(module, "is_delta_module", False):
            ids.update(id(t) for t in module.parameters())
            ids.update(id(t) for t in module.buffers())
    return ids


def unfrozen_tensors(delta: DeltaBase, trainable_only: bool) -> dict[str, torch.Tensor]:
    """Backbone tensor name → tensor inside the delta's unfrozen modules (never a delta's own)."""
    backbone = delta.backbone_model
    if not delta.unfrozen_paths:
        return {}
    modules = all_modules(backbone)
    in_deltas = _delta_tensor_ids(backbone)
    names = {id(p): n for n, p in backbone.named_parameters()}
    buffer_names = {id(b): n for n, b in backbone.named_buffers()}
    result: dict[str, torch.Tensor] = {}
    for path in delta.unfrozen_paths:
        for parameter in modules[path].parameters():
            if id(parameter) not in in_deltas and (parameter.requires_grad or not trainable_only):
                result[names[id(parameter)]] = parameter
        if trainable_only:
            continue
        for owner in modules[path].modules():  # persistent buffers train too (BatchNorm statistics)
            for name, buffer in owner.named_buffers(recurse=False):
                if (buffer is not None and name not in owner._non_persistent_buffers_set
                        and id(buffer) not in in_deltas and id(buffer) in buffer_names):
                    result[buffer_names[id(buffer)]] = buffer
    return result


def structure_hash(model: nn.Module) -> str:
    """A hash of the backbone's structure — every parameter's and persistent buffer's name, shape
    and dtype, delta modules left out — never of its values (so a meta copy hashes as the real one)."""
    in_deltas = _delta_tensor_ids(model)
    persistent = [(f"{path}.{name}" if path else name, buffer)
                  for path, module in model.named_modules()
                  for name, buffer in module.named_buffers(recurse=False)
                  if name not in module._non_persistent_buffers_set]
    digest = hashlib.sha256()
    for name, tensor in (*model.named_parameters(), *persistent):
        if id(tensor) not in in_deltas:
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    return digest.hexdigest()[:32]


def locate(directory: str | Path, *, cache_dir: str | Path | None = None, local_files_only: bool = False) -> Path:
    """The local checkpoint directory (OpenDelta's ``cache_dir`` is looked in first). Deltas are
    never downloaded here, so a name that is no local directory is an error either way."""
    candidates = ([Path(cache_dir) / str(directory)] if cache_dir is not None else []) + [Path(directory)]
    found = next((c for c in candidates if c.is_dir()), None)
    if found is None:
        where = " or ".join(repr(str(c)) for c in candidates)
        raise CheckpointError(
            f"no delta checkpoint at {where}: it is not a local directory, and deltas are never "
            f"downloaded (local_files_only={local_files_only}); download it first and pass its path")
    return found


def unfrozen_parameters(delta: DeltaBase) -> dict[str, nn.Parameter]:
    return unfrozen_tensors(delta, trainable_only=True)  # type: ignore[return-value]


def checkpoint_state(delta: DeltaBase) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint of ``delta`` holds, by key."""
    return {**delta.delta_state(),
            **{BACKBONE_PREFIX + name: t for name, t in unfrozen_tensors(delta, trainable_only=False).items()}}


def _gathered(tensor: torch.Tensor) -> torch.Tensor:
    """A full tensor: FSDP2 shards parameters as DTensors, gathered here (a collective)."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else tensor


def _writes() -> bool:
    """Only rank 0 writes when running under torch.distributed."""
    distributed = torch.distributed
    return not (distributed.is_available() and distributed.is_initialized()) or distributed.get_rank() == 0


def save(delta: DeltaBase, directory: Path) -> Path:
    backbone = delta.backbone_model
    in_deltas = _delta_tensor_ids(backbone) | {id(p) for p in delta.parameters()}
    saved = {id(t) for t in unfrozen_tensors(delta, trainable_only=False).values()}
    stray = [name for name, p in backbone.named_parameters()
             if p.requires_grad and id(p) not in in_deltas and id(p) not in saved]
    if stray:
        raise DeltaStateError(
            f"{len(stray)} backbone tensors require grad but would not be in this checkpoint "
            f"({listing(stray, 4)}): training changes them, so reloading would not reproduce the "
            "model. Call delta.freeze_module(exclude=['deltas', <the modules you train>]) so they are "
            "saved with the delta, or freeze them (requires_grad_(False)) if they do not train"
        )
    state = {key: _gathered(tensor) for key, tensor in checkpoint_state(delta).items()}
    if any(t.is_meta for t in state.values()):
        raise DeltaStateError(
            "this delta lives on a meta backbone and has no values to save; build it on a "
            "backbone with real weights (load_backbone of a directory or 'minilm')"
        )
    if not _writes():
        return directory
    config = {
        **delta.config.to_dict(),
        "resolved_modules": delta.modified_paths,
        "unfrozen_paths": delta.unfrozen_paths,
        "backbone_class": type(backbone).__name__,
        "structure_hash": structure_hash(backbone),
        "trainable_parameters": delta.num_trainable_parameters(),
    }
    return write_checkpoint(directory, config, state)


def fill(delta: DeltaBase, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into a built delta (and its unfrozen backbone modules); every key and
    shape is checked before anything is written."""
    expected = checkpoint_state(delta)
    missing_keys = sorted(set(expected) - set(tensors))
    unexpected_keys = sorted(set(tensors) - set(expected))
    if missing_keys or unexpected_keys:
        raise CheckpointError(
            f"checkpoint keys do not fit this backbone: missing {listing(missing_keys)}; "
            f"unexpected {listing(unexpected_keys)}"
        )
    wrong = [
        f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items() if tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise CheckpointError(f"checkpoint tensor shapes do not fit this backbone: {listing(wrong)}")
    if any(t.is_meta for t in expected.values()):
        raise DeltaStateError("cannot load a checkpoint into a delta on a meta backbone")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key])


def load(directory: Path, backbone_model: nn.Module, *, is_trainable: bool,
         expected: type | None = None, check_hash: bool = True) -> DeltaBase:
    """Rebuild a saved delta on ``backbone_model``; the backbone is untouched if anything fails.
    With ``check_hash``, a backbone whose structure differs from the one it was saved on (names,
    shapes, dtypes) is refused before anything is attached or filled."""
    raw, tensors = read_checkpoint(directory)
    cls = method_for(raw["delta_type"])
    if expected is not None and not issubclass(cls, expected):
        raise ConfigError(f"{directory} holds a {raw['delta_type']} delta, not {expected.__name__}")
    config = cls.config_class.from_dict({k: v for k, v in raw.items() if k not in RECORD_KEYS})
    delta = cls(backbone_model, config=config, attach=False)
    saved_modules = raw.get("resolved_modules")
    if saved_modules is not None and list(saved_modules) != delta.modified_paths:
        missing = [p for p in saved_modules if p not in delta.modified_paths]
        extra = [p for p in delta.modified_paths if p not in saved_modules]
        raise CheckpointError(
            "this checkpoint was made for another backbone: its modules do not match. "
            f"In the checkpoint only: {listing(missing)}; in this backbone only: {listing(extra)}"
        )
    recorded = raw.get("structure_hash")
    if check_hash and recorded is not None and recorded != structure_hash(backbone_model):
        raise CheckpointError(
            f"{str(directory)!r} was saved on a backbone of another structure ({raw.get('backbone_class')}, "
            f"structure hash {recorded}) than this {type(backbone_model).__name__} "
            f"({structure_hash(backbone_model)}): parameter names, shapes or dtypes differ. "
            "Load it on the backbone it was trained on, or pass check_hash=False to load it anyway "
            "(the modules and tensor shapes are still checked)")
    delta.unfrozen_paths = _existing_paths(backbone_model, raw.get("unfrozen_paths") or [])
    fill(delta, tensors)
    delta.attach()
    set_trainable(delta, is_trainable)
    return delta


def _existing_paths(model: nn.Module, paths: list[Any]) -> list[str]:
    modules = all_modules(model)
    unknown = [str(p) for p in paths if p not in modules]
    if unknown:
        raise CheckpointError(
            f"this checkpoint trained backbone modules this backbone does not have: {listing(unknown)}")
    return [str(p) for p in paths]


def set_trainable(delta: DeltaBase, is_trainable: bool) -> None:
    """After loading. Inference (PEFT's ``is_trainable=False``): the model in eval mode, nothing
    requires grad. Training: the backbone frozen as it was saved, the delta trainable."""
    backbone = delta.backbone_model
    if is_trainable:
        delta.freeze_module(set_state_dict=False)
        return
    backbone.requires_grad_(False)
    delta.requires_grad_(False)
    backbone.eval()
