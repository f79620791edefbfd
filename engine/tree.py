"""The module tree of a model, and its *collapsed* form with repeated layers folded into one.

Siblings in a ModuleList (numeric names) whose subtrees share a structural fingerprint (class,
children, parameter names/shapes/dtypes/trainability, delta marks) fold into one group node that
remembers its member indices. A layer that differs — a delta attached, another shape — forms its
own node. Nothing is hidden: parameter-free modules stay in the tree.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from engine.quantization import logical_shape

GROUP_WILDCARD = "*"


@dataclass(frozen=True)
class ParameterInfo:
    """One parameter owned directly by a module."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    trainable: bool
    is_delta: bool
    tied_to: str | None = None  # full name of the first owner when the tensor is shared

    @property
    def counted(self) -> int:
        """Elements this entry adds to totals (a tied parameter is counted at its first owner)."""
        return 0 if self.tied_to else self.numel

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "numel": self.numel,
            "trainable": self.trainable,
            "is_delta": self.is_delta,
            "tied_to": self.tied_to,
        }


@dataclass
class TreeNode:
    """A module, or (in a collapsed tree) a folded group of identical sibling modules.

    ``path`` is the dotted path; in a folded group the index segment is ``*`` (all members) or a
    range such as ``0-5,8``. ``member_paths`` are the real module paths the node stands for.
    Counts are per member.
    """

    path: str
    name: str
    class_name: str
    parameters: list[ParameterInfo]
    children: list[TreeNode] = field(default_factory=list)
    is_delta: bool = False
    members: list[int] | None = None
    member_paths: list[str] = field(default_factory=list)
    total_parameters: int = 0
    trainable_parameters: int = 0
    delta_parameters: int = 0
    fingerprint: int = 0
    #: why a folded group or a node in it is not uniform (T5's block 0 holds the relative
    #: position bias the other blocks reuse): shown beside the node
    note: str = ""

    @property
    def is_group(self) -> bool:
        return self.members is not None

    @property
    def label(self) -> str:
        """Display name: the module name, or ``0-11 ×12`` for a folded group."""
        if self.members is None:
            return self.name
        return f"{format_indices(self.members)} ×{len(self.members)}"

    def child(self, name: str) -> TreeNode | None:
        """The direct child called ``name``, if any."""
        return next((c for c in self.children if c.name == name), None)

    def walk(self) -> Iterator[TreeNode]:
        """This node and every descendant, depth first, in model order."""
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "name": self.name,
            "label": self.label,
            "class_name": self.class_name,
            "members": self.members,
            "count": len(self.member_paths),
            "is_delta": self.is_delta,
            "parameters": [p.to_dict() for p in self.parameters],
            "total_parameters": self.total_parameters,
            "trainable_parameters": self.trainable_parameters,
            "delta_parameters": self.delta_parameters,
            "note": self.note,
            "children": [child.to_dict() for child in self.children],
        }


def all_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module by dotted path, as the tree records them: a module instance reachable by two
    paths (shared between towers, say) appears under both, unlike ``named_modules()``."""
    return dict(model.named_modules(remove_duplicate=False))


class ModuleTree:
    """Every module of a model with its parameters and subtree totals.

    ``paths`` lists the real module paths in ``named_modules()`` order (root excluded);
    :meth:`tails` indexes them by every dot-aligned tail for addressing.
    """

    def __init__(self, root: TreeNode, paths: list[str], collapsed: bool = False) -> None:
        self.root = root
        self.paths = paths
        self.collapsed = collapsed
        self._nodes: dict[str, TreeNode] | None = None
        self._tails: dict[str, list[int]] | None = None
        self._order: dict[str, int] | None = None

    @classmethod
    def from_model(cls, model: nn.Module) -> ModuleTree:
        """Record ``model``'s modules and parameters (shared parameters counted once)."""
        interner: dict[tuple[Any, ...], int] = {}
        seen: dict[int, str] = {}
        paths: list[str] = []

        def build(module: nn.Module, path: str, name: str, in_delta: bool) -> TreeNode:
            is_delta = in_delta or bool(getattr(module, "is_delta_module", False))
            params = []
            for pname, param in module.named_parameters(recurse=False):
                full = f"{path}.{pname}" if path else pname
                tied = seen.get(id(param))
                if tied is None:
                    seen[id(param)] = full
                params.append(
                    ParameterInfo(
                        name=pname,
                        shape=tuple(logical_shape(param)),
                        dtype=str(param.dtype).removeprefix("torch."),
                        numel=logical_shape(param).numel(),
                        trainable=param.requires_grad,
                        is_delta=is_delta,
                        tied_to=tied,
                    )
                )
            children = []
            for child_name, child in module.named_children():
                child_path = f"{path}.{child_name}" if path else child_name
                paths.append(child_path)
                children.append(build(child, child_path, child_name, is_delta))
            node = TreeNode(path, name, type(module).__name__, params, children, is_delta)
            node.member_paths = [path]
            _fill_totals(node)
            key = (
                node.class_name,
                is_delta,
                tuple((p.name, p.shape, p.dtype, p.trainable, p.tied_to is None) for p in params),
                tuple((c.name, c.fingerprint) for c in children),
            )
            node.fingerprint = interner.setdefault(key, len(interner))
            return node

        root = build(model, "", "", False)
        return cls(root, paths)

    # --- lookups ---------------------------------------------------------------------------

    @property
    def nodes(self) -> dict[str, TreeNode]:
        """Every node by its (display) path."""
        if self._nodes is None:
            self._nodes = {node.path: node for node in self.root.walk()}
        return self._nodes

    def node(self, path: str) -> TreeNode:
        return self.nodes[path]

    def tails(self) -> dict[str, list[int]]:
        """Every dot-aligned tail of every path → indices into :attr:`paths` (model order)."""
        if self._tails is None:
            index: dict[str, list[int]] = {}
            for position, path in enumerate(self.paths):
                parts = path.split(".")
                for start in range(len(parts)):
                    index.setdefault(".".join(parts[start:]), []).append(position)
            self._tails = index
        return self._tails

    def order(self) -> dict[str, int]:
        """Position of each real path in model order."""
        if self._order is None:
            self._order = {path: i for i, path in enumerate(self.paths)}
        return self._order

    @property
    def total_parameters(self) -> int:
        return self.root.total_parameters

    # --- collapsing ------------------------------------------------------------------------

    def collapse(self) -> ModuleTree:
        """A new tree where identical ModuleList siblings are folded into group nodes."""
        root = _collapse([self.root], self.root.path, self.root.name, None)
        return ModuleTree(root, self.paths, collapsed=True)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the designer."""
        return {
            "collapsed": self.collapsed,
            "total_parameters": self.root.total_parameters,
            "trainable_parameters": self.root.trainable_parameters,
            "module_count": len(self.paths),
            "root": self.root.to_dict(),
        }


def _fill_totals(node: TreeNode) -> None:
    node.total_parameters = sum(p.counted for p in node.parameters) + sum(
        c.total_parameters for c in node.children
    )
    node.trainable_parameters = sum(p.counted for p in node.parameters if p.trainable) + sum(
        c.trainable_parameters for c in node.children
    )
    node.delta_parameters = sum(p.counted for p in node.parameters if p.is_delta) + sum(
        c.delta_parameters for c in node.children
    )


def _collapse(
    parallel: list[TreeNode], path: str, name: str, members: list[int] | None
) -> TreeNode:
    """Collapse ``parallel`` nodes (one per member) into one node. Their children are aligned by
    name: a child some members lack (T5's relative position bias, only in block 0) becomes a
    node of the members that have it, with a note."""
    first = _base(parallel)
    prefix = f"{path}." if path else ""
    children: list[TreeNode] = []
    groups = _fold_groups(first.children)
    numeric_count = sum(len(g) for g in groups)
    grouped = {position: group for group in groups for position in group}
    for position, child in enumerate(first.children):
        if not child.name.isdigit() or len(grouped[position]) == 1:
            aligned = [node.child(child.name) for node in parallel]
            children.append(_collapse(aligned, prefix + child.name, child.name, None))
            continue
        group = grouped[position]
        if group[0] != position:
            continue
        indices = [int(first.children[p].name) for p in group]
        segment = GROUP_WILDCARD if len(group) == numeric_count else format_indices(indices)
        aligned = [node.child(first.children[p].name) for node in parallel for p in group]
        folded = _collapse(aligned, prefix + segment, segment, indices)
        extended = sorted(i for i, p in zip(indices, group) if first.children[p].fingerprint != folded.fingerprint)
        if extended:
            folded.note = (f"{name or 'layer'} {format_indices(extended)} also hold"
                           f"{'s' if len(extended) == 1 else ''} modules the others lack; they fold with the rest")
        children.append(folded)
    known = {child.name for child in first.children}
    for extra in dict.fromkeys(c.name for node in parallel for c in node.children if c.name not in known):
        having = [node.child(extra) for node in parallel if node.child(extra) is not None]
        node = _collapse(having, prefix + extra, extra, None)
        node.note = f"only in {len(having)} of {len(parallel)} members: {', '.join(h.path for h in having[:3])}"
        children.append(node)
    return TreeNode(
        path=path,
        name=name,
        class_name=first.class_name,
        parameters=first.parameters,
        children=children,
        is_delta=first.is_delta,
        members=members,
        member_paths=[p for node in parallel for p in node.member_paths],
        total_parameters=first.total_parameters,
        trainable_parameters=first.trainable_parameters,
        delta_parameters=first.delta_parameters,
        fingerprint=first.fingerprint,
    )


def _base(parallel: list[TreeNode]) -> TreeNode:
    """The member the others extend: the most common structure (its counts are the node's)."""
    counts: dict[int, int] = {}
    for node in parallel:
        counts[node.fingerprint] = counts.get(node.fingerprint, 0) + 1
    return max(parallel, key=lambda node: counts[node.fingerprint])


def _fold_groups(children: list[TreeNode]) -> list[list[int]]:
    """Positions of numbered siblings that fold together: identical structures, plus a sibling
    next to them whose structure only adds modules to theirs (T5's block 0)."""
    groups: dict[int, list[int]] = {}
    for position, child in enumerate(children):
        groups.setdefault(child.fingerprint if child.name.isdigit() else -1 - position, []).append(position)
    merged = [g for g in groups.values() if len(g) > 1]
    for single in [g for g in groups.values() if len(g) == 1 and children[g[0]].name.isdigit()]:
        position = single[0]
        home = next((g for g in merged if position in (g[0] - 1, g[-1] + 1)
                     and _extends(children[position], children[g[0]])), None)
        if home is not None:
            home.append(position)
            home.sort()
        else:
            merged.append(single)
    singles = [[p] for p, c in enumerate(children) if not c.name.isdigit()]
    return sorted(merged + singles)


def _extends(node: TreeNode, base: TreeNode) -> bool:
    """``node`` is ``base`` with plain modules added somewhere below: the same classes and
    parameters (shape, trainable, delta) for everything ``base`` has, no delta in what it adds,
    and what it adds frozen or trainable as ``base`` is (a layer holding a delta, or one unfrozen
    differently, never folds with plain ones)."""
    def signature(n: TreeNode) -> list[tuple[Any, ...]]:
        return [(p.name, p.shape, p.trainable, p.is_delta) for p in n.parameters]

    if node.class_name != base.class_name or node.is_delta != base.is_delta or signature(node) != signature(base):
        return False
    mine = {child.name: child for child in node.children}
    theirs = {child.name for child in base.children}
    added = [mine[name] for name in mine if name not in theirs]
    if any(n.is_delta or n.delta_parameters for child in added for n in child.walk()):
        return False
    # what it adds is frozen or trained alike with the rest (an unfrozen extra never folds away)
    frozen = base.trainable_parameters == 0
    trained = base.trainable_parameters == base.total_parameters
    for extra in added:
        if not ((frozen and extra.trainable_parameters == 0)
                or (trained and extra.trainable_parameters == extra.total_parameters)):
            return False
    return all(c.name in mine and (mine[c.name].fingerprint == c.fingerprint or _extends(mine[c.name], c))
               for c in base.children)


def format_indices(indices: list[int]) -> str:
    """``[0,1,2,3,4,5,8]`` → ``"0-5,8"``: runs of two or more become ranges."""
    parts: list[str] = []
    ordered = sorted(indices)
    start = prev = ordered[0]
    for value in ordered[1:] + [None]:  # type: ignore[list-item]
        if value is not None and value == prev + 1:
            prev = value
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if value is not None:
            start = prev = value
    return ",".join(parts)


def parse_indices(text: str, limit: int | None = None) -> list[int]:
    """Inverse of :func:`format_indices`: ``"0-5,8"`` → ``[0,1,2,3,4,5,8]``.

    With ``limit`` (e.g. the number of layers), an index at or above it is an error raised
    before any range is expanded, so ``0-999999999`` costs nothing.
    """
    values: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        low, sep, high = part.partition("-")
        if not low.strip().isdigit() or (sep and not high.strip().isdigit()):
            raise ValueError(f"{text!r} is not a layer range like 0-5,8")
        first, last = int(low), int(high) if sep else int(low)
        if last < first:
            raise ValueError(f"{part!r} in {text!r} runs backwards; write {last}-{first}")
        if limit is not None and last >= limit:
            named = f"layers {first}-{last} are" if sep else f"layer {first} is"
            raise ValueError(f"{named} not in 0-{limit - 1}")
        values.update(range(first, last + 1))
    if not values:
        raise ValueError(f"{text!r} names no layer; write a range like 0-5,8")
    return sorted(values)
