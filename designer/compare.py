"""Two saved designs on one backbone, side by side: trainable parameters per group and in total,
checkpoint size and training memory (the engine's exact counts, as the live preview computes them),
and which modules only one of them, or both, modify — per module and per collapsed tree node."""

from __future__ import annotations

from typing import Any

from designer.payloads import PayloadError
from designer.session import DesignSession
from engine import Design


def _scratch(session: DesignSession, document: dict[str, Any], name: str) -> tuple[dict[str, Any], set[str]]:
    """The snapshot a session would show for ``document``, and the modules it modifies, computed
    in a throw-away session on the same backbone (nothing saved, the caller's design untouched)."""
    loaded, preview = session.require()
    source = (document.get("backbone") or {}).get("source")
    if source and source != loaded.source:
        raise PayloadError(f"design {name!r} was made for {source}, not {loaded.source}: compare designs "
                           "of the backbone shown", "compare")
    scratch = DesignSession(f"compare-{name}", lambda state: None)
    scratch.loaded, scratch.preview = loaded, preview
    scratch.import_design(Design.from_dict(document))
    snapshot = scratch.snapshot()
    modified = {path for group in scratch.groups for path in group.selection}
    return snapshot, modified


def compare(session: DesignSession, named: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``named``: two names → documents. Counts of each, and the module difference."""
    (name_a, a), (name_b, b) = named.items()
    snapshot_a, modules_a = _scratch(session, a, name_a)
    snapshot_b, modules_b = _scratch(session, b, name_b)
    loaded, _ = session.require()
    order = loaded.tree.order()
    diff = {"only_a": sorted(modules_a - modules_b, key=order.__getitem__),
            "only_b": sorted(modules_b - modules_a, key=order.__getitem__),
            "both": sorted(modules_a & modules_b, key=order.__getitem__)}
    kind_of = {path: "only-a" for path in diff["only_a"]}
    kind_of.update({path: "only-b" for path in diff["only_b"]})
    kind_of.update({path: "both" for path in diff["both"]})
    marks = {}
    for node in loaded.collapsed.root.walk():
        if not node.path:
            continue
        kinds = {kind_of[p] for p in node.member_paths if p in kind_of}
        if kinds:
            marks[node.path] = kinds.pop() if len(kinds) == 1 else "mixed"
    sides = {}
    for side, name, snapshot in (("a", name_a, snapshot_a), ("b", name_b, snapshot_b)):
        sides[side] = {"name": name, "totals": snapshot["totals"],
                       "groups": [{"name": g["name"], "method": g["method"], "trainable": g["trainable"],
                                   "expressions": g["expressions"]} for g in snapshot["groups"]]}
    return {**sides, "diff": {k: len(v) for k, v in diff.items()}, "modules": diff, "marks": marks}
