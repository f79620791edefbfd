"""Backbones a designer server has loaded, shared by all sessions and loaded once each.

Each entry keeps the model, its full and collapsed trees, and a meta-device *twin* (the same
architecture with no weights) on which previews and exports are planned without touching — or
attaching anything to — the real model.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from designer.diagram import layer_schematic
from engine import (
    Backbone,
    DeltaError,
    Design,
    ModelStructure,
    ModuleTree,
    load_backbone,
    max_positions,
    peft_default_modules,
)


@dataclass
class LoadedBackbone:
    """A backbone with its trees and its meta twin, built once."""

    backbone: Backbone
    tree: ModuleTree
    collapsed: ModuleTree
    twin: nn.Module
    twin_tree: ModuleTree
    lock: threading.Lock = field(default_factory=threading.Lock)  # guards builds on the model
    #: the twin's roles and probe results, computed once (nothing is ever attached to the twin)
    structure: ModelStructure = field(init=False)

    def __post_init__(self) -> None:
        # computed now, before any session shares it: later reads never walk the live model (a
        # meta backbone is its own twin, and a build attaches deltas to it meanwhile)
        self.structure = ModelStructure(self.twin, self.twin_tree)
        _ = self.structure.modules, self.structure.roles

    @property
    def parameter_bytes(self) -> int:
        """Bytes of one backbone parameter (what an unfrozen module's tensors take in a checkpoint)."""
        first = next(self.twin.parameters(), None)
        return first.element_size() if first is not None else 4

    @property
    def source(self) -> str:
        return self.backbone.source

    @property
    def memory_bytes(self) -> int:
        """What keeping this backbone costs: its real tensors, plus about 1 KiB per module of the
        model and its twin (module objects and trees; a meta model has no tensor memory)."""
        model = self.backbone.model
        tensors = {id(t): t for t in (*model.parameters(), *model.buffers()) if not t.is_meta}
        return sum(t.numel() * t.element_size() for t in tensors.values()) + 1024 * 2 * len(self.tree.paths)

    def roles(self) -> dict[str, Any]:
        """Inferred roles for the page: a label per collapsed node, and which roles exist."""
        inferred = self.structure.roles
        labels = {}
        for node in self.collapsed.root.walk():
            label = inferred.label(node.member_paths[0]) if node.path else ""
            if label:
                labels[node.path] = label
        return {"labels": labels, "available": sorted(inferred.by_role)}

    def peft_defaults(self) -> dict[str, Any]:
        """Which modules PEFT's default ``target_modules`` wrap here (``all``/``some`` members of
        each collapsed node), for the page's overlay; why there are none, when there are none.
        Computed once per backbone, under its lock."""
        with self.lock:
            cached = self.__dict__.get("_peft_defaults")
            if cached is None:
                cached = self.__dict__["_peft_defaults"] = self._peft_defaults()
            return cached

    def _peft_defaults(self) -> dict[str, Any]:
        try:
            paths, source = peft_default_modules(self.twin)
        except DeltaError as error:
            return {"paths": [], "marks": {}, "source": str(error)}
        chosen = set(paths)
        marks = {}
        for node in self.collapsed.root.walk():
            hits = sum(p in chosen for p in node.member_paths) if node.path else 0
            if hits:
                marks[node.path] = "all" if hits == len(node.member_paths) else "some"
        return {"paths": paths, "marks": marks, "source": source}

    def schematic(self) -> dict[str, Any] | None:
        """The folded layer the page's block diagram draws (computed once, under the lock)."""
        with self.lock:
            if "_schematic" not in self.__dict__:
                self.__dict__["_schematic"] = layer_schematic(self)
            return self.__dict__["_schematic"]

    def planning_model(self) -> nn.Module:
        """A weight-free model designs may be attached to for a while, under :attr:`lock`: the
        meta backbone itself (as builds use it), else a private meta copy — never the shared twin,
        which previews read without the lock."""
        if self.backbone.is_meta:
            return self.backbone.model
        with self.lock:
            model = self.__dict__.get("_planning_model")
            if model is None:
                model = self.__dict__["_planning_model"] = _meta_twin(self.backbone)
            return model

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.backbone.source,
            "class_name": self.backbone.class_name,
            "is_meta": self.backbone.is_meta,
            "parameters": self.tree.total_parameters,
            "modules": len(self.tree.paths),
            "max_positions": max_positions(self.twin),
        }


def load(
    source: str, progress: Callable[[int, int], None] | None = None, allow_python: bool = False
) -> LoadedBackbone:
    """Load ``source`` with its trees and meta twin."""
    backbone = load_backbone(source, progress=progress, allow_python=allow_python)
    tree = ModuleTree.from_model(backbone.model)
    if backbone.is_meta:
        twin, twin_tree = backbone.model, tree
    else:
        twin = _meta_twin(backbone)
        twin_tree = ModuleTree.from_model(twin)
    return LoadedBackbone(backbone, tree, tree.collapse(), twin, twin_tree)


@contextlib.contextmanager
def attached(model: nn.Module, design: Design) -> Iterator[Any]:
    """``design`` attached to a shared ``model`` for the ``with`` body, then undone completely —
    deltas detached and every parameter's ``requires_grad`` restored — whatever happens. Hold
    the backbone's lock around it."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    applied = None
    try:
        applied = design.apply(model)  # detaches what it attached if it fails
        yield applied
    finally:
        if applied is not None:
            applied.detach()
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(flags[name])


def _meta_twin(backbone: Backbone) -> nn.Module:
    if backbone.source.startswith("python:"):
        return backbone.model  # a custom model: plan on it directly (its own weights stay)
    return load_backbone(backbone.source, weights=False).model


#: default memory budget of the backbone cache (a third of this 24 GiB machine)
DEFAULT_BUDGET_BYTES = 8 * 1024**3


class BackboneCache:
    """Source → loaded backbone; concurrent requests for one source wait for a single load.

    A least-recently-used cache within ``budget_bytes``: after a load, backbones that no session
    has open (``in_use``) and that are not the server's own are dropped, oldest first, until the
    rest fit (``on_evict`` lets the owner drop what it keeps per backbone).
    """

    def __init__(self, server_source: str, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                 in_use: Callable[[], set[int]] = set,
                 on_evict: Callable[[LoadedBackbone], None] = lambda loaded: None) -> None:
        self.server_source = server_source
        self.budget_bytes = budget_bytes
        self.in_use, self.on_evict = in_use, on_evict
        self._loaded: dict[str, LoadedBackbone] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        #: source → (done, total) while it loads; read by the page that waits for it
        self._progress: dict[str, tuple[int, int]] = {}
        #: source → the error its background load ended with
        self.failures: dict[str, str] = {}

    def get(self, source: str, progress: Callable[[int, int], None] | None = None) -> LoadedBackbone:
        """Load once; a python: factory only if it is the source the server was started with."""
        with self._guard:
            lock = self._locks.setdefault(source, threading.Lock())
        with lock:
            loaded = self._loaded.get(source)
            if loaded is None:
                def record(done: int, total: int) -> None:
                    self._progress[source] = (done, total)
                    if progress is not None:
                        progress(done, total)

                self._progress[source] = (0, 1)
                try:
                    loaded = load(source, record, allow_python=source == self.server_source)
                finally:
                    self._progress.pop(source, None)
            with self._guard:  # most recently used last
                self._loaded.pop(source, None)
                self._loaded[source] = loaded
            self._evict(keep=source)
            return loaded

    def _evict(self, keep: str) -> None:
        with self._guard:
            open_now = self.in_use()
            total = sum(loaded.memory_bytes for loaded in self._loaded.values())
            for source, loaded in list(self._loaded.items()):
                if total <= self.budget_bytes:
                    break
                if source in (keep, self.server_source) or id(loaded) in open_now:
                    continue
                del self._loaded[source]
                total -= loaded.memory_bytes
                self.on_evict(loaded)

    def progress(self, source: str) -> tuple[int, int] | None:
        """(done, total) of a load in progress, else None."""
        return self._progress.get(source)

    def preload(self, source: str) -> threading.Thread:
        """Load ``source`` on a background thread (the server listens meanwhile); a failure is
        kept in :attr:`failures` and shown by the page instead of the design."""
        def run() -> None:
            try:
                self.get(source)
            except Exception as error:  # shown on the page; the server keeps serving
                self.failures[source] = f"{type(error).__name__}: {error}"

        self._progress.setdefault(source, (0, 1))
        thread = threading.Thread(target=run, name=f"load {source}", daemon=True)
        thread.start()
        return thread

    def cached(self, source: str) -> LoadedBackbone | None:
        return self._loaded.get(source)
