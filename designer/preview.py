"""What the page shows for a design, computed by the engine: compiled expressions, match counts,
exact trainable counts, node marks and totals. Results are cached per backbone, so a tick only
recomputes the group it changed.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

from designer.payloads import PayloadError
from engine import (
    WEIGHT_FORMATS,
    ModuleNotSupportedError,
    TrainingSetup,
    checkpoint_bytes,
    compile_selection,
    estimate_delta,
    expand_common_names,
    method_for,
    module_parameters,
    plan_memory,
    resolve,
    weight_bytes,
)

if TYPE_CHECKING:
    from designer.group import Group
    from designer.state import LoadedBackbone

UNFREEZE = "unfreeze"


class _LRU:
    """A bounded memo shared by every session on one backbone; its lock guards the dict (the
    computation runs outside it, so one slow estimate never blocks other sessions' hits)."""

    def __init__(self, size: int = 512) -> None:
        self.size, self.items = size, OrderedDict()  # type: int, OrderedDict[Hashable, Any]
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = compute()
        with self._lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


class Previewer:
    """Engine computations for one loaded backbone, memoised."""

    def __init__(self, loaded: LoadedBackbone) -> None:
        self.loaded = loaded
        self._expressions = _LRU()
        self._counts = _LRU()
        self._trainable = _LRU()
        self._unwrappable = _LRU(64)
        self._wrappable = _LRU(64)
        #: memory plans by design and training setup (each traces a forward on meta)
        self.plans = _LRU(64)
        self._weights = _LRU(8)  # weight bytes by format
        self._marks = _LRU()

    def expressions(self, selection: list[str]) -> list[str]:
        key = frozenset(selection)
        return self._expressions.get(key, lambda: compile_selection(self.loaded.twin_tree, selection))

    def shown(self, group: Group) -> list[str]:
        """The expressions a group is shown and exported with: as typed, else compiled."""
        return group.typed or self.expressions(group.selection)

    def match_counts(self, expressions: list[str], typed: bool = False) -> dict[str, int]:
        """Modules each expression matches (``typed``: common names expanded, as typed)."""
        if not expressions:
            return {}
        if typed:
            return self._counts.get(("typed", *expressions),
                                    lambda: {e: len(self.typed_selection([e])) for e in expressions})
        return self._counts.get(tuple(expressions),
                                lambda: resolve(self.loaded.twin_tree, expressions).counts())

    def typed_selection(self, typed: list[str]) -> list[str]:
        """The module paths typed expressions select (a real module name beats a common name)."""
        return resolve(self.loaded.twin_tree, expand_common_names(self.loaded.structure, typed)).paths

    def trainable(self, group: Group) -> int:
        """Exact trainable parameters of a group (raises the engine's error if it cannot build)."""
        return self._cost(group)[0]

    def _cost(self, group: Group) -> tuple[int, int]:
        """(trainable parameters, checkpoint bytes) of a group: bytes in the dtype the engine
        really builds the delta in; an unfrozen module is saved in the backbone's dtype."""
        expressions = self.expressions(group.selection)
        if not expressions:
            return 0, 0
        if group.method == UNFREEZE:
            count = module_parameters(self.loaded.twin_tree, group.selection)
            return count, checkpoint_bytes(count, self.loaded.parameter_bytes)
        key = (group.method, group.route, json.dumps(group.hyperparameters, sort_keys=True), tuple(expressions))

        def estimate() -> tuple[int, int]:
            found = estimate_delta(self.loaded.twin, group.config(expressions), structure=self.loaded.structure)
            return found.total, found.checkpoint_bytes

        return self._trainable.get(key, estimate)

    def unwrappable(self, method: str | None) -> dict[str, str]:
        """Collapsed node path → why ``method`` cannot wrap it (its first member checked)."""
        if method is None or method == UNFREEZE:
            return {}
        return self._unwrappable.get(method, lambda: self._check_nodes(method))

    def _check_nodes(self, method: str) -> dict[str, str]:
        modules = self.loaded.structure.modules
        result = {}
        for node in self.loaded.collapsed.root.walk():
            if node.path and not self.can_wrap(method, node.member_paths[0], modules):
                result[node.path] = self.why(method, node.member_paths[0], modules)
        return result

    def _wrappable_paths(self, method: str) -> frozenset[str]:
        """Every module path ``method`` can wrap on this backbone (checked once per method)."""
        modules = self.loaded.structure.modules
        return self._wrappable.get(method, lambda: frozenset(
            p for p in self.loaded.tree.paths if p in modules and self.can_wrap(method, p, modules)))

    def wrappable(self, method: str, paths: list[str]) -> list[str]:
        """``paths`` where the method can wrap them; else their descendants it can wrap (a tick on
        a layer or an attention block selects the projections LoRA wraps, say)."""
        if method == UNFREEZE:
            return paths
        allowed = self._wrappable_paths(method)
        if all(p in allowed for p in paths):
            return paths
        prefixes = tuple(p + "." for p in paths)
        below = [p for p in self.loaded.tree.paths if p in allowed and p.startswith(prefixes)]
        if not below:  # a tick that selects nothing is an error, never a silent no-op
            modules = self.loaded.structure.modules
            blocked = next(p for p in paths if p not in allowed)
            raise PayloadError(f"{self.why(method, blocked, modules)} (nor any module inside it)", "selection")
        return below

    @staticmethod
    def can_wrap(method: str, path: str, modules: dict[str, Any]) -> bool:
        return not Previewer.why(method, path, modules)

    @staticmethod
    def why(method: str, path: str, modules: dict[str, Any]) -> str:
        if method == UNFREEZE:
            return ""
        try:
            method_for(method).check_module(path, modules[path])
        except ModuleNotSupportedError as error:
            return str(error)
        return ""

    def marks(self, groups: list[Group]) -> dict[str, dict[str, str]]:
        """Collapsed node path → {group id: "full" | "partial"} for the groups touching it."""
        marks: dict[str, dict[str, str]] = {}
        for group in groups:
            key = frozenset(group.selection)
            for path, kind in self._marks.get(key, lambda: self._selection_marks(key)).items():
                marks.setdefault(path, {})[group.id] = kind
        return marks

    def _selection_marks(self, selected: frozenset[str]) -> dict[str, str]:
        """Collapsed node path → "full" | "partial" for one selection."""
        ancestors = {p.rsplit(".", i)[0] for p in selected for i in range(1, p.count(".") + 1)}
        marks = {}
        for node in self.loaded.collapsed.root.walk():
            if not node.path:
                continue
            members = node.member_paths
            hits = sum(1 for m in members if m in selected)
            if hits == len(members):
                marks[node.path] = "full"
            elif hits or any(m in ancestors for m in members):
                marks[node.path] = "partial"
        return marks

    def memory(self, trainable: int, weight_format: str) -> dict[str, Any]:
        """The live training-memory line: the planner's own arithmetic (weights in the format,
        trainable states with AdamW) for its default setup in that format, activations left out
        until the planner traces them."""
        setup = TrainingSetup(weight_format=weight_format)
        loaded = self.loaded
        weights = self._weights.get(weight_format, lambda: weight_bytes(loaded.twin, setup))
        return {**plan_memory(weights, trainable, None, setup), "weight_format": weight_format}

    def snapshot(self, groups: list[Group], weight_format: str, active: str | None) -> dict[str, Any]:
        """The ``design_updated`` payload."""
        loaded = self.loaded
        rows, total, saved = [], 0, 0
        for group in groups:
            expressions = self.shown(group)
            trainable, size = self._cost(group)
            total += trainable
            saved += size
            rows.append({**group.public(), "expressions": expressions, "modules": len(group.selection),
                         "match_counts": self.match_counts(expressions, typed=bool(group.typed)),
                         "trainable": trainable})
        backbone = loaded.tree.total_parameters
        return {
            "backbone": loaded.summary(),
            "groups": rows,
            "active_group": active,
            "marks": self.marks(groups),
            "totals": {
                "trainable": total,
                "backbone": backbone,
                "percent": 100.0 * total / backbone if backbone else 0.0,
                "checkpoint_bytes": saved,
                "memory": self.memory(total, weight_format),
            },
            "exports": {"peft": peft_availability(groups)},
            "unwrappable": self.unwrappable(next((g.method for g in groups if g.id == active), None)),
        }


#: the names the live line's select used before it shared the planner's formats (old autosaves)
_FORMAT_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "bf16", "int4": "nf4"}


def weight_format_named(name: str, fallback: str | None = None) -> str:
    """One of the planner's weight formats, from its name or an old alias; an unknown name is an
    error naming the choices (or ``fallback``, for restored state)."""
    chosen = _FORMAT_ALIASES.get(name, name)
    if chosen in WEIGHT_FORMATS:
        return chosen
    if fallback is not None:
        return fallback
    raise PayloadError(f"dtype must be one of {', '.join(WEIGHT_FORMATS)}; got {name!r}", "dtype")


def peft_availability(groups: list[Group]) -> dict[str, Any]:
    """Whether the design can be written as a PEFT adapter_config.json, and why not."""
    deltas = [g for g in groups if g.selection and g.method != UNFREEZE]
    if len(deltas) != 1:
        return {"available": False,
                "reason": f"PEFT holds one adapter per config; this design has {len(deltas)} delta groups"}
    if deltas[0].method != "lora":
        return {"available": False,
                "reason": f"PEFT export covers LoRA here; this design uses {deltas[0].method}"}
    return {"available": True, "reason": ""}


def method_catalogue() -> list[dict[str, Any]]:
    """Every registered method with its routes and hyper-parameter schema (plus 'unfreeze')."""
    from engine import registered_methods

    methods = [
        {"delta_type": name, "routes": list(cls.config_class.routes),
         "hyperparameters": cls.config_class.hyperparameters(),
         "defaults": list(cls.default_modified_modules)}
        for name, cls in sorted(registered_methods().items())
    ]
    methods.append({"delta_type": UNFREEZE, "routes": [], "hyperparameters": [], "defaults": []})
    return methods


def default_hyperparameters(method: str) -> dict[str, Any]:
    if method == UNFREEZE:
        return {}
    return {h["name"]: h["default"] for h in method_for(method).config_class.hyperparameters()}
