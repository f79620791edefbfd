"""One person's design in progress: delta groups, their selections, and every edit to them.

Each edit is applied to a copy of the group and validated by the engine (config, expressions,
what the method can wrap) before it replaces the original, so a bad edit raises and leaves the
last valid design intact. Every accepted edit is autosaved.
"""

from __future__ import annotations

import copy
import re
import threading
from collections.abc import Callable
from typing import Any

from designer.autosave import DeferredSave
from designer.group import Group
from designer.history import History, Shelf, Undoable
from designer.payloads import MAX_GROUPS, PayloadError, check_match_work
from designer.preview import UNFREEZE, Previewer, default_hyperparameters, weight_format_named
from designer.state import LoadedBackbone
from engine import (
    ConfigError,
    DeltaError,
    Design,
    TreeNode,
    expand_common_names,
    format_indices,
    method_for,
    parse_indices,
    resolve,
)

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class DesignSession(Undoable, DeferredSave):
    """The design one browser context edits; thread-safe, autosaved through ``save``."""

    def __init__(self, session_id: str, save: Callable[[dict[str, Any]], None],
                 save_later: Callable[[DesignSession], None] | None = None) -> None:
        self.id = session_id
        self.loaded: LoadedBackbone | None = None
        self.preview: Previewer | None = None
        self.groups: list[Group] = []
        self.active: str | None = None
        self.dtype = "bf16"  # the weight format the live memory line assumes
        self.lock = threading.RLock()
        #: writes the autosave; ``save_later`` hands it to a background writer (DeferredSave)
        self._save, self._deferring = save, threading.local()
        self._save_later = save_later or (lambda session: session._save(session.state()))
        self._counter = 0
        #: counts snapshots sent: a page shows a design only if it is newer than the one it shows
        self._version = 0
        #: undo/redo of this backbone's design; the designs of the other backbones shown before
        self.history, self.shelf = History(), Shelf()
        #: the browser (cookie) session this tab's session was forked from, if any
        self.parent: str | None = None

    # --- backbone ----------------------------------------------------------------------------

    def use_backbone(self, loaded: LoadedBackbone, previewer: Previewer, autosave: bool = True) -> None:
        """Show ``loaded`` with a fresh design (one LoRA group). ``autosave=False`` for a first
        visit: nothing the user chose yet, so no file is written (a thousand cookie-less
        requests must not leave a thousand session files)."""
        with self.lock:
            if self.loaded is loaded:
                return
            if self.loaded is not None and self.loaded.source != loaded.source:
                self.shelf.put(self.loaded.source, self._own_state())  # kept: switching back restores it
            self.loaded, self.preview = loaded, previewer
            self.groups, self.active = [], None
            self.history = History()
            kept = self.shelf.take(loaded.source)
            if kept is not None:
                try:
                    self.restore(kept)
                    self._commit()
                    return
                except (DeltaError, KeyError, TypeError, ValueError):
                    self.groups, self.active = [], None  # a kept design this backbone no longer fits
            self.add_group("lora", autosave=autosave)
            self.history.start(self._snapshot())  # the fresh design is where undo stops

    def require(self) -> tuple[LoadedBackbone, Previewer]:
        if self.loaded is None or self.preview is None:
            raise PayloadError("no backbone is loaded yet; choose one first", "backbone")
        return self.loaded, self.preview

    # --- groups ------------------------------------------------------------------------------

    def group(self, group_id: Any) -> Group:
        for group in self.groups:
            if group.id == group_id:
                return group
        raise PayloadError(f"there is no group {group_id!r}", "group_id")

    def add_group(self, method: str = "lora", autosave: bool = True) -> Group:
        with self.lock:
            if len(self.groups) >= MAX_GROUPS:
                raise PayloadError(f"a design holds at most {MAX_GROUPS} groups; remove one first", "groups")
            self.require()
            self._check_method(method)
            self._counter += 1
            group = Group(f"g{self._counter}", f"{method}_{self._counter}", method,
                          self._default_route(method), default_hyperparameters(method))
            self.groups.append(group)
            self.active = group.id
            if autosave:
                self._commit()
            return group

    def remove_group(self, group_id: str) -> None:
        with self.lock:
            group = self.group(group_id)
            self.groups.remove(group)
            if self.active == group_id:
                self.active = self.groups[-1].id if self.groups else None
            self._commit()

    def select_group(self, group_id: str) -> None:
        with self.lock:
            self.active = self.group(group_id).id
            self._commit()

    def set_group(self, group_id: str, *, name: str | None = None, method: str | None = None,
                  route: str | None = None, hyperparameters: dict[str, Any] | None = None) -> None:
        with self.lock:
            edited = copy.deepcopy(self.group(group_id))
            if method is not None and method != edited.method:
                self._check_method(method)
                prefix, _, number = edited.name.rpartition("_")
                if prefix == edited.method and number.isdigit():  # an automatic name follows the method
                    edited.name = f"{method}_{number}"
                edited.method, edited.route = method, self._default_route(method)
                edited.hyperparameters = default_hyperparameters(method)
            if name is not None:
                if not _NAME.match(name):
                    raise PayloadError(f"group name {name!r} must be a Python identifier", "name")
                if any(g.name == name and g.id != group_id for g in self.groups):
                    raise PayloadError(f"another group is already named {name!r}", "name")
                edited.name = name
            if route is not None:
                edited.route = route
            if hyperparameters is not None:
                known = set(default_hyperparameters(edited.method))
                unknown = sorted(set(hyperparameters) - known)
                if unknown:
                    raise PayloadError(f"{edited.method} has no option {', '.join(unknown)}", "hyperparameters")
                edited.hyperparameters = {**edited.hyperparameters, **hyperparameters}
            # an edit of one option reports its errors at that option's field
            field = f"hyper:{next(iter(hyperparameters))}" if hyperparameters and len(hyperparameters) == 1 else None
            self._replace(edited, field=field)

    # --- selections --------------------------------------------------------------------------

    def toggle_nodes(self, group_id: str, node_paths: list[str], checked: bool) -> None:
        """Tick or untick collapsed nodes: every member module, within the group's layer ranges."""
        with self.lock:
            loaded, preview = self.require()
            edited = copy.deepcopy(self.group(group_id))
            chosen = set(edited.selection)
            for node_path in node_paths:
                paths = self._members_in_range(edited, node_path)
                if checked:
                    chosen |= set(preview.wrappable(edited.method, paths))
                else:  # unticking a parent also drops the descendants its tick chose
                    roots = set(paths)
                    chosen = {p for p in chosen if not _within(p, roots)}
            edited.selection = [p for p in loaded.tree.paths if p in chosen]
            edited.typed = []
            self._replace(edited)

    def set_expressions(self, group_id: str, expressions: list[str], *, roles: bool = False) -> None:
        """Replace a group's selection by what typed expressions resolve to (errors change nothing).
        ``roles``: common names select their roles even where a module has that name (quick picks)."""
        with self.lock:
            loaded, _ = self.require()
            edited = copy.deepcopy(self.group(group_id))
            typed = [e for e in expressions if e.strip()]
            check_match_work(len(loaded.tree.paths), typed, "expressions")
            if typed:
                try:
                    edited.selection = resolve(loaded.twin_tree, expand_common_names(
                        loaded.structure, typed, typed=not roles)).paths
                except DeltaError as error:
                    raise PayloadError(str(error), "expressions") from error
            else:
                edited.selection = []
            # kept as typed where they mean the same when read back (a quick pick's role names
            # may not: a module of that name would win there)
            edited.typed = typed if not roles or self._reads_back(typed, edited.selection) else []
            edited.layer_ranges = {}
            self._replace(edited, field="expressions")

    def set_layers(self, group_id: str, node_path: str, text: str) -> None:
        """Restrict a folded group's selection (and later ticks) to some layers, e.g. ``0-5``."""
        with self.lock:
            loaded, _ = self.require()
            node = self._node(node_path)
            if not node.is_group:
                raise PayloadError(f"{node_path!r} is not a folded group of layers", "layers")
            try:
                layers = parse_indices(text, limit=max(node.members or [0]) + 1)  # checked before expanding
            except ValueError as error:
                raise PayloadError(str(error), "layers") from error
            outside = sorted(set(layers) - set(node.members or []))
            if outside:
                raise PayloadError(f"layers {format_indices(outside)} are not in "
                                   f"{format_indices(node.members or [])}", "layers")
            edited = copy.deepcopy(self.group(group_id))
            prefixes = dict(zip(node.members or [], node.member_paths))
            tails = set()
            for path in edited.selection:
                for prefix in node.member_paths:
                    if path == prefix or path.startswith(prefix + "."):
                        tails.add(path[len(prefix):])
            members = set(node.member_paths)
            inside = {p for p in edited.selection if _within(p, members)}
            chosen = (set(edited.selection) - inside) | {prefixes[i] + t for i in layers for t in tails}
            edited.selection = [p for p in loaded.tree.paths if p in chosen]
            edited.layer_ranges = {**edited.layer_ranges, node_path: layers}
            edited.typed = []
            if layers == node.members:
                edited.layer_ranges.pop(node_path)
            self._replace(edited, field="layers")

    def set_dtype(self, dtype: str) -> None:
        with self.lock:
            self.dtype = weight_format_named(dtype)
            self._commit()

    # --- designs -----------------------------------------------------------------------------

    def design(self) -> Design:
        """The ``Design`` these groups describe (empty groups are left out)."""
        loaded, preview = self.require()
        deltas = [g.config(preview.shown(g))
                  for g in self.groups if g.selection and g.method != UNFREEZE]
        unfrozen = sorted({p for g in self.groups if g.method == UNFREEZE for p in g.selection},
                          key=loaded.tree.order().__getitem__)
        backbone = {"source": loaded.source, "class": loaded.backbone.class_name,
                    "parameters": loaded.tree.total_parameters}
        return Design(deltas, preview.expressions(unfrozen) if unfrozen else [], backbone)

    def import_design(self, design: Design) -> None:
        """Replace the groups by an imported design; its recorded modules must still match."""
        with self.lock:
            loaded, _ = self.require()
            check_match_work(len(loaded.tree.paths), [
                *(e for c in design.deltas for e in [*(c.modified_modules or []), *(c.exclude_modules or [])]),
                *design.unfrozen_modules], "import")
            # planned on the shared twin, nothing attached to it; raises on a recorded mismatch
            _, unfrozen_paths = design.plan(loaded.twin, loaded.structure)
            groups = []
            for index, config in enumerate(design.deltas, start=1):
                selection = resolve(loaded.twin_tree, expand_common_names(
                    loaded.structure, config.modified_modules or method_for(config.delta_type).default_modified_modules,
                    typed=bool(config.modified_modules)),
                    expand_common_names(loaded.structure, config.exclude_modules)).paths
                values = config.to_dict()
                hyper = {k: values[k] for k in default_hyperparameters(config.delta_type)}
                typed = list(config.modified_modules or []) if not config.exclude_modules else []
                groups.append(Group(f"g{self._counter + index}", str(config.name), config.delta_type,
                                    config.route, hyper, selection, typed=typed))
            self._counter += len(groups)
            if design.unfrozen_modules:
                self._counter += 1
                groups.append(Group(f"g{self._counter}", "unfrozen", UNFREEZE, None, {}, unfrozen_paths))
            self.groups = groups
            self.active = groups[0].id if groups else None
            self._commit()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            _, preview = self.require()
            self._version += 1
            return {**preview.snapshot(self.groups, self.dtype, self.active), "history": self.history.counts(),
                    "version": self._version}

    def state(self) -> dict[str, Any]:
        """What the autosave file holds (selections as compiled expressions), with the designs
        kept for other backbones."""
        with self.lock:
            return {**self._own_state(), "shelf": self.shelf.states()}

    def _own_state(self) -> dict[str, Any]:
        with self.lock:
            if self.loaded is None or self.preview is None:
                return {"backbone": None, "groups": []}
            return {
                "backbone": self.loaded.source, "active": self.active, "dtype": self.dtype,
                "counter": self._counter,
                "groups": [{**g.public(), "expressions": self.preview.expressions(g.selection), "typed": g.typed}
                           for g in self.groups],
            }

    def restore(self, state: dict[str, Any]) -> None:
        """Rebuild groups from :meth:`state` output (after ``use_backbone``)."""
        with self.lock:
            loaded, _ = self.require()
            check_match_work(len(loaded.tree.paths), [str(e) for g in state.get("groups", []) for key in
                                                      ("expressions", "typed") for e in g.get(key) or []], "design")
            groups = []
            for saved in state.get("groups", []):
                expressions = saved.get("expressions") or []
                selection = resolve(loaded.twin_tree, expressions).paths if expressions else []
                ranges = {k: parse_indices(v, limit=len(loaded.tree.paths))
                          for k, v in (saved.get("layer_ranges") or {}).items()}
                typed = [str(e) for e in saved["typed"]] if isinstance(saved.get("typed"), list) else []
                groups.append(Group(saved["id"], saved["name"], saved["method"], saved.get("route"),
                                    dict(saved.get("hyperparameters") or {}), selection, ranges,
                                    typed if typed and self._reads_back(typed, selection) else []))
            self.groups = groups
            self.active = state.get("active")
            self.dtype = weight_format_named(str(state.get("dtype", self.dtype)), fallback=self.dtype)
            self._counter = int(state.get("counter", len(groups)))
            if "shelf" in state:
                self.shelf.load(state["shelf"])
            self.history.start(self._snapshot())

    # --- internals ---------------------------------------------------------------------------

    def _reads_back(self, typed: list[str], selection: list[str]) -> bool:
        """Typed expressions select exactly ``selection`` when read back (as an import reads them)."""
        try:
            return self.require()[1].typed_selection(typed) == selection
        except DeltaError:
            return False

    def _node(self, node_path: str) -> TreeNode:
        loaded, _ = self.require()
        node = loaded.collapsed.nodes.get(node_path)
        if node is None or not node_path:
            raise PayloadError(f"there is no module {node_path!r} in this backbone", "node")
        return node

    def _members_in_range(self, group: Group, node_path: str) -> list[str]:
        node = self._node(node_path)
        paths = node.member_paths
        for folded, layers in group.layer_ranges.items():
            if node_path == folded or node_path.startswith(folded + "."):
                depth = folded.count(".")
                paths = [p for p in paths if int(p.split(".")[depth]) in layers]
        return paths

    def _check_method(self, method: str) -> None:
        if method != UNFREEZE:
            try:
                method_for(method)
            except ConfigError as error:
                raise PayloadError(str(error), "method") from error

    @staticmethod
    def _default_route(method: str) -> str | None:
        return None if method == UNFREEZE else method_for(method).config_class.routes[0]

    def _replace(self, edited: Group, field: str | None = None) -> None:
        """Validate ``edited`` with the engine, then swap it in and autosave."""
        _, preview = self.require()
        if edited.method != UNFREEZE:
            try:
                edited.config(preview.expressions(edited.selection) or ["placeholder"])
                trainable = preview.trainable(edited)
            except ConfigError as error:
                raise PayloadError(str(error), field or _field_of(error, edited)) from error
            except DeltaError as error:  # e.g. the method cannot wrap a ticked module
                raise PayloadError(str(error), field or "selection") from error
            backbone = self.require()[0].tree.total_parameters
            if trainable > backbone:  # bounds what a build may allocate: never more than the model
                raise PayloadError(
                    f"group {edited.name!r} would train {trainable:,} parameters, more than the whole "
                    f"backbone ({backbone:,}); a delta is a small fraction of it — lower its sizes "
                    "(rank, bottleneck, prefix length)", field or "hyperparameters")
        self.groups = [edited if g.id == edited.id else g for g in self.groups]
        self._commit()

    def _commit(self) -> None:
        self.history.record(self._snapshot())
        self._persist()


def _within(path: str, roots: set[str]) -> bool:
    """``path`` is one of ``roots`` or inside one (checks its ancestors: O(depth), not O(roots))."""
    parts = path.split(".")
    return any(".".join(parts[:end]) in roots for end in range(1, len(parts) + 1))


def _field_of(error: Exception, group: Group) -> str:
    """The form control an engine config error is about (``hyper:NAME``, route or name)."""
    message = str(error)
    for name in group.hyperparameters:
        if name in message:
            return f"hyper:{name}"
    if "route" in message:
        return "route"
    return "name" if "name" in message else "hyperparameters"
