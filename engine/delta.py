"""The delta object: delta modules attached to a frozen backbone by hooks, detachable at will.

A method subclasses :class:`DeltaBase` and says which modules it can wrap, how to build one delta
module for a modified module, and (optionally) how to wire it in. The base class resolves
``modified_modules`` with the one addressing grammar, validates every target before touching the
backbone — including that the model's forward really calls it — and owns attach/detach, freezing,
counting, logging and checkpoints.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from engine import persistence
from engine.addressing import resolve
from engine.checkpoint import SHARED_PREFIX
from engine.config import DeltaConfig
from engine.errors import ConfigError, DeltaStateError
from engine.layers import DeltaModule
from engine.locking import model_lock
from engine.mixed_batches import RowSelector
from engine.planning import Planning
from engine.probe import module_device_dtype
from engine.quantization import keep_differentiable
from engine.roles import IOSizes, ModelStructure, declared_sizes, expand_common_names
from engine.roles.kinds import mixture_sizes
from engine.routing import RouteHandle, attach_route
from engine.sizing import probe_sizes
from engine.statistics import log_delta

_LOW_PRECISION = (torch.bfloat16, torch.float16)
logger = logging.getLogger(__name__)


def _key(path: str) -> str:
    """A ModuleDict key for a dotted path (dots are not allowed in module names)."""
    return path.replace(".", "/")


class DeltaBase(Planning, nn.Module):
    """A delta method applied to one backbone (OpenDelta's ``DeltaBase``). Where it goes is planned
    by :class:`~engine.planning.Planning`; this class builds, wires, freezes, counts and saves."""

    def __init__(
        self,
        backbone_model: nn.Module,
        modified_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
        *,
        config: DeltaConfig | None = None,
        attach: bool = True,
        paths: list[str] | None = None,
        planned: list[str] | None = None,
        structure: ModelStructure | None = None,
        **hyperparameters: Any,
    ) -> None:
        """Resolve where the delta goes, build one delta module per target, attach (unless told not).

        ``paths`` gives already planned target paths (see :meth:`plan`), skipping resolution;
        ``planned`` the whole planned set when only some of it is built (estimates), so parts
        shared by all targets are sized for all of them; ``structure`` a :class:`ModelStructure` of
        this backbone to reuse (planning tools pass theirs, so roles are inferred once).
        """
        super().__init__()
        if not isinstance(backbone_model, nn.Module):
            raise ConfigError(
                f"backbone_model must be a torch.nn.Module, got {type(backbone_model).__name__}"
            )
        if config is None:
            values = dict(hyperparameters)
            if modified_modules is not None:
                values["modified_modules"] = modified_modules
            if exclude_modules is not None:
                values["exclude_modules"] = exclude_modules
            config = self.config_class.from_dict(values)
        elif not isinstance(config, self.config_class):
            raise ConfigError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        self.config = config
        object.__setattr__(self, "backbone_model", backbone_model)  # not a submodule
        self._handles: list[RouteHandle] = []
        self._attached = False
        #: which rows of a mixed-task batch this delta acts on (see engine.mixed_batches), set on attach
        self.row_selector = RowSelector(backbone_model, str(config.name))
        self._state_dict_handle: Any = None
        #: backbone modules that train with this delta (set by freeze_module, saved with it)
        self.unfrozen_paths: list[str] = []
        #: modules shared by all of this delta's modules (registered inside the first of them)
        self.shared_modules = nn.ModuleDict()
        with model_lock(backbone_model):
            structure = structure if structure is not None else ModelStructure(backbone_model)
            modules = structure.modules
            if paths is None:
                self.modified_paths = self.plan(backbone_model, config, structure=structure)
            else:
                unknown = [p for p in paths if p not in modules]
                if unknown:
                    raise ConfigError(f"paths not in the backbone: {', '.join(unknown[:5])}")
                for path in paths:
                    self.check_module(path, modules[path])
                self.modified_paths = list(paths)
            self.planned_paths = list(planned) if planned is not None else list(self.modified_paths)
            #: the modules this delta wraps (these objects: a module later put at the same path is
            #: not one the delta was sized for)
            self._targets = {path: modules[path] for path in self.modified_paths}
            self._avoid_taken_name(modules)
            self._structure: ModelStructure | None = structure  # for build_deltas, then dropped
            built = self.build_deltas({p: modules[p] for p in self.modified_paths})
            self._structure = None
            self.delta_modules = nn.ModuleDict({_key(p): built[p] for p in self.modified_paths})
            if attach:
                self.attach()

    def _avoid_taken_name(self, modules: dict[str, nn.Module]) -> None:
        """As OpenDelta: a delta whose name was not given takes the first free one of ``lora``,
        ``lora_1``, … (logged); a given name is kept (and a collision is an error on attach)."""
        if not getattr(self.config, "automatic_name", False):
            return
        taken = {name for module in modules.values() for name, child in module._modules.items()
                 if getattr(child, "is_delta_module", False)}
        base, suffix = self.config.name, 0
        while self.config.name in taken:
            suffix += 1
            self.config.name = f"{base}_{suffix}"
        if suffix:
            logger.info("a %s delta is already on this backbone: this one is named %r", base, self.config.name)

    # --- what a method provides --------------------------------------------------------------

    @property
    def delta_type(self) -> str:
        return self.config.delta_type

    @property
    def name(self) -> str:
        return str(self.config.name)

    def build_deltas(self, modules: dict[str, nn.Module]) -> dict[str, DeltaModule]:
        """One delta module per modified module."""
        sizes = self.module_sizes(modules)
        return {path: self.make_delta(path, module, sizes[path]) for path, module in modules.items()}

    def make_delta(self, path: str, module: nn.Module, sizes: IOSizes) -> DeltaModule:
        """One delta module for ``module``; methods that override :meth:`build_deltas` need not."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_delta or build_deltas")

    def wire(self, path: str, module: nn.Module, delta: DeltaModule) -> RouteHandle:
        """Hook ``delta`` into ``module`` (default: along ``config.route``)."""
        return attach_route(str(self.config.route), module, delta, select=self.row_selector)

    def module_sizes(self, modules: dict[str, nn.Module]) -> dict[str, IOSizes]:
        """Declared sizes where modules state them; one pseudo-input pass for the rest."""
        sizes: dict[str, IOSizes] = {}
        for path, module in modules.items():
            declared = declared_sizes(module) or mixture_sizes(module)
            if declared is not None:
                sizes[path] = declared
        rest = [p for p in modules if p not in sizes]
        if rest:
            sizes.update(probe_sizes(self.backbone_model, rest))
        return sizes

    def structure(self) -> ModelStructure:
        """The backbone's structure: the one planning used while the delta is being built (its
        tree and roles computed once), a fresh one afterwards."""
        return self._structure if self._structure is not None else ModelStructure(self.backbone_model)

    def placement(self, module: nn.Module) -> tuple[torch.device, torch.dtype]:
        """Device and dtype for the delta of ``module``: its device; float32 on a 16-bit backbone
        unless ``delta_dtype`` says otherwise (a bfloat16 parameter cannot hold small updates:
        0.1 + 1e-4 == 0.1 there). Routes cast inputs to it and updates back."""
        device, dtype = module_device_dtype(module, self.backbone_model)
        choice = self.config.delta_dtype
        if choice == "float32" or not dtype.is_floating_point or (choice == "auto" and dtype in _LOW_PRECISION):
            return device, torch.float32
        return device, dtype

    # --- attach / detach -------------------------------------------------------------------

    @property
    def is_attached(self) -> bool:
        return self._attached

    def _modules_by_path(self) -> dict[str, nn.Module]:
        return dict(self._targets)

    def attach(self) -> DeltaBase:
        """Insert the delta modules and hook them in; they run after deltas attached earlier.

        The delta takes the backbone's training flag, so a delta attached to (or loaded into) a
        model in ``eval()`` has its dropout off, as the model does.
        """
        with model_lock(self.backbone_model):
            if self._attached:
                raise DeltaStateError(f"delta {self.name!r} is already attached; detach() it first")
            targets = self._modules_by_path()
            taken = [p for p, m in targets.items() if self.name in m._modules]
            if taken:
                raise DeltaStateError(
                    f"{taken[0]!r} already has a submodule named {self.name!r} (another delta?); "
                    "give this delta another name, e.g. name='lora_task_b'"
                )
            keep_differentiable(self.backbone_model)  # 4-bit layers: gradients must reach earlier deltas
            mode = self.backbone_model.training
            if any(layer.training != mode for layer in self.delta_modules.values()):
                self.train(mode)
            self.row_selector = RowSelector(self.backbone_model, self.name)
            try:
                for path, module in targets.items():
                    delta = self.delta_modules[_key(path)]
                    module.add_module(self.name, delta)
                    delta.__dict__["_row_selector"] = self.row_selector  # found by engine.mixed_batches
                    self._handles.append(self.wire(path, module, delta))
            except BaseException:  # all or nothing: unwire what this call wired
                self._unwire(targets)
                raise
            self._attached = True
        return self

    def detach(self) -> DeltaBase:
        """Remove the hooks and delta modules; the backbone computes exactly as before."""
        with model_lock(self.backbone_model):
            if not self._attached:
                raise DeltaStateError(f"delta {self.name!r} is not attached; attach() it first")
            self.before_detach()
            self._unwire(self._modules_by_path())
            self._attached = False
        return self

    def _unwire(self, targets: dict[str, nn.Module]) -> None:
        """Remove this delta's hooks and its delta modules from ``targets`` (those it is in)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for path, module in targets.items():
            if module._modules.get(self.name) is self.delta_modules[_key(path)]:
                del module._modules[self.name]

    def before_detach(self) -> None:
        """Hook for methods that must undo something first (LoRA unmerges)."""

    # --- freezing and counting -------------------------------------------------------------

    def freeze_module(
        self, exclude: list[str] | None = None, set_state_dict: bool = True
    ) -> DeltaBase:
        """Freeze the backbone except delta modules (sentinel ``"deltas"``) and ``exclude``.

        ``exclude`` defaults to the config's ``unfrozen_modules`` (``["deltas"]``) and is recorded
        there: the unfrozen backbone modules are saved with the delta and restored with it.
        Entries other than ``"deltas"`` are addressing expressions (one that matches nothing is an
        error). With ``set_state_dict``, the backbone's ``state_dict()`` then holds only
        trainable tensors.
        """
        exclude = list(self.config.unfrozen_modules) if exclude is None else list(exclude)
        backbone = self.backbone_model
        expressions = [e for e in exclude if e != "deltas"]
        structure = ModelStructure(backbone)
        unfrozen = resolve(structure.tree, expand_common_names(structure, expressions)).paths if expressions else []
        keep: set[int] = set()
        for path in unfrozen:
            keep.update(id(p) for p in structure.modules[path].parameters())
        if "deltas" in exclude:
            keep.update(id(p) for p in self.parameters())
            for module in backbone.modules():
                if getattr(module, "is_delta_module", False):
                    keep.update(id(p) for p in module.parameters())
        for parameter in backbone.parameters():
            parameter.requires_grad_(id(parameter) in keep)
        for parameter in self.parameters():
            parameter.requires_grad_(id(parameter) in keep)
        self.config.unfrozen_modules = exclude
        self.unfrozen_paths = unfrozen
        if set_state_dict:
            self.trainable_state_dict_only(backbone)
        return self

    def trainable_state_dict_only(self, model: nn.Module) -> None:
        """Make ``model.state_dict()`` return only tensors that require grad (removable hook)."""
        if self._state_dict_handle is not None:
            self._state_dict_handle.remove()

        def keep_trainable(module: nn.Module, state: dict, prefix: str, metadata: Any) -> None:
            trainable = {prefix + n for n, p in module.named_parameters() if p.requires_grad}
            for key in [k for k in state if k not in trainable]:
                del state[key]

        self._state_dict_handle = model.register_state_dict_post_hook(keep_trainable)

    def shared_tensor_ids(self) -> set[int]:
        """Every tensor (parameters and buffers) of the shared modules."""
        return {id(t) for module in self.shared_modules.values() for t in (*module.parameters(), *module.buffers())}

    def trainable_parameters_by_module(self) -> dict[str, int]:
        """Modified module path → trainable delta parameters there (shared ones not included:
        see :meth:`shared_trainable_parameters`)."""
        shared = self.shared_tensor_ids()
        return {
            path: sum(p.numel() for p in self.delta_modules[_key(path)].parameters()
                      if p.requires_grad and id(p) not in shared)
            for path in self.modified_paths
        }

    def shared_trainable_parameters(self) -> int:
        """Trainable parameters shared by all of this delta's modules (counted once)."""
        unique = {id(p): p for m in self.shared_modules.values() for p in m.parameters() if p.requires_grad}
        return sum(p.numel() for p in unique.values())

    def unfrozen_backbone_parameters(self) -> dict[str, nn.Parameter]:
        """Backbone parameter name → parameter, for the trainable ones in this delta's unfrozen modules."""
        return persistence.unfrozen_parameters(self)

    def own_trainable_parameters(self) -> int:
        """Trainable parameters of the delta itself: per module plus shared (no backbone ones)."""
        return sum(self.trainable_parameters_by_module().values()) + self.shared_trainable_parameters()

    def num_trainable_parameters(self) -> int:
        """Everything that trains with this delta: its own parameters and its unfrozen backbone
        modules' (exact on meta backbones too)."""
        return self.own_trainable_parameters() + sum(p.numel() for p in self.unfrozen_backbone_parameters().values())

    def num_delta_parameters(self) -> int:
        """All parameters of this delta, trainable or not."""
        return sum(p.numel() for p in self.parameters())

    def log(self, module: nn.Module | None = None, delta_ratio: bool = True, trainable_ratio: bool = True,
            visualization: bool = True, cuda_memory: bool = True, *, console: Console | None = None) -> dict[str, Any]:
        """Print the collapsed tree of ``module`` (default: the backbone; deltas highlighted) and
        the ratios OpenDelta's ``log`` prints — each part can be turned off as there — and return
        the counts: this delta's ``trainable_parameters``, ``modules`` and ``percent_of_backbone``,
        plus :func:`~engine.statistics.inspect_module_statistics` of ``module``."""
        return log_delta(self, module, delta_ratio=delta_ratio, trainable_ratio=trainable_ratio,
                         visualization=visualization, cuda_memory=cuda_memory, console=console)

    # --- merging (methods that can override) -----------------------------------------------

    def merge(self) -> DeltaBase:
        raise DeltaStateError(f"{self.delta_type} deltas cannot be merged into the backbone")

    def unmerge(self) -> DeltaBase:
        raise DeltaStateError(f"{self.delta_type} deltas cannot be merged into the backbone")

    # --- checkpoints -----------------------------------------------------------------------

    def delta_state(self) -> dict[str, torch.Tensor]:
        """Every tensor of this delta by checkpoint key: ``{modified path}.{tensor}`` per module,
        ``shared::{name}.{tensor}`` for the shared ones (once)."""
        shared = self.shared_tensor_ids()
        state = {
            f"{path}.{name}": tensor
            for path in self.modified_paths
            for name, tensor in self.delta_modules[_key(path)].state_dict(keep_vars=True).items()
            if id(tensor) not in shared
        }
        for key, module in self.shared_modules.items():
            state.update({f"{SHARED_PREFIX}{key}.{name}": t for name, t in module.state_dict(keep_vars=True).items()})
        return state

    def load_delta_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy checkpoint tensors into this (unattached) delta and its unfrozen backbone
        modules; keys and shapes must match exactly, and nothing is changed if they do not."""
        persistence.fill(self, tensors)

    def save_finetuned(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``delta.safetensors``: every tensor that trains with this
        delta (its own, and its unfrozen backbone modules'). A trainable backbone tensor the
        checkpoint would not hold is an error, never silently left out. Under torch.distributed,
        call it on every rank: sharded tensors are gathered and rank 0 writes."""
        return persistence.save(self, Path(directory))

    @classmethod
    def from_finetuned(
        cls, directory: str | Path, backbone_model: nn.Module, *, is_trainable: bool = False,
        check_hash: bool = True, local_files_only: bool = False, cache_dir: str | Path | None = None,
    ) -> DeltaBase:
        """Rebuild a saved delta on ``backbone_model``; the backbone is untouched if anything fails.

        As PEFT's ``is_trainable=False``: for inference the model is put in ``eval()`` and nothing
        requires grad. ``is_trainable=True`` freezes the backbone as it was when saved (its
        unfrozen modules trainable) and keeps the model's mode.

        As OpenDelta's: ``check_hash`` refuses a backbone whose structure (parameter names, shapes,
        dtypes — not values) differs from the one the delta was saved on; ``cache_dir`` is looked
        in first; nothing is downloaded, whatever ``local_files_only`` says.
        """
        found = persistence.locate(directory, cache_dir=cache_dir, local_files_only=local_files_only)
        return persistence.load(found, backbone_model, is_trainable=is_trainable,
                                expected=None if cls is DeltaBase else cls, check_hash=check_hash)
