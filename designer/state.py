"""Backbones a designer server has loaded, shared by all sessions and loaded once each.

Each entry keeps the model, its full and collapsed trees, and a meta-device *twin* (the same
architecture with no weights) on which previews and exports are planned without touching — or
attaching anything to — the real model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from engine import Backbone, ModelStructure, ModuleTree, load_backbone


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
        self.structure = ModelStructure(self.twin, self.twin_tree)

    @property
    def parameter_bytes(self) -> int:
        """Bytes of one backbone parameter (what an unfrozen module's tensors take in a checkpoint)."""
        first = next(self.twin.parameters(), None)
        return first.element_size() if first is not None else 4

    @property
    def source(self) -> str:
        return self.backbone.source

    def roles(self) -> dict[str, Any]:
        """Inferred roles for the page: a label per collapsed node, and which roles exist."""
        inferred = self.structure.roles
        labels = {}
        for node in self.collapsed.root.walk():
            label = inferred.label(node.member_paths[0]) if node.path else ""
            if label:
                labels[node.path] = label
        return {"labels": labels, "available": sorted(inferred.by_role)}

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.backbone.source,
            "class_name": self.backbone.class_name,
            "is_meta": self.backbone.is_meta,
            "parameters": self.tree.total_parameters,
            "modules": len(self.tree.paths),
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


def _meta_twin(backbone: Backbone) -> nn.Module:
    if backbone.source.startswith("python:"):
        return backbone.model  # a custom model: plan on it directly (its own weights stay)
    return load_backbone(backbone.source, weights=False).model


class BackboneCache:
    """Source → loaded backbone; concurrent requests for one source wait for a single load."""

    def __init__(self, server_source: str) -> None:
        self.server_source = server_source
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
            if source not in self._loaded:
                def record(done: int, total: int) -> None:
                    self._progress[source] = (done, total)
                    if progress is not None:
                        progress(done, total)

                self._progress[source] = (0, 1)
                try:
                    self._loaded[source] = load(source, record, allow_python=source == self.server_source)
                finally:
                    self._progress.pop(source, None)
            return self._loaded[source]

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
