"""A schematic of one folded layer of the loaded backbone, for the page's block diagram: its
attention, cross-attention and feed-forward sections with their projections and norms, drawn
from the engine's inferred roles. The page draws each delta on it from the design's marks and
routes, so a tick redraws without asking the server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from designer.state import LoadedBackbone

#: role prefix → section, in the order a layer runs them
SECTIONS = (("attn", "attention"), ("crossattn", "cross-attention"), ("ff", "feed-forward"))
#: roles of a section's output projection (drawn on the row below the others)
OUTPUTS = {"attn.o", "attn.proj", "crossattn.o", "crossattn.proj", "ff.w2"}


def layer_schematic(loaded: LoadedBackbone) -> dict[str, Any] | None:
    """The first layer stack's folded layer as sections of blocks (collapsed node paths), or
    None when the model has no recognised layers (the page then shows why)."""
    roles = loaded.structure.roles
    layers = roles.by_role.get("layers") or []
    if not layers:
        return None
    first = layers[0]
    stack = first.rsplit(".", 1)[0]
    node_of = {m: node.path for node in loaded.collapsed.root.walk() if node.path for m in node.member_paths}
    inside = [p for p in loaded.tree.paths if p.startswith(first + ".")]
    sections = []
    for prefix, name in SECTIONS:
        # the section's own module (Llama's mlp); none where its projections sit loose (BERT's FFN)
        container = next((p for p in inside if prefix in roles.of(p)
                          and not any(r.startswith(prefix + ".") for r in roles.of(p))), None)
        blocks, norm, output = [], None, None
        for path in inside:
            mine = [r for r in roles.of(path) if r.split(".")[0] == prefix and "." in r]
            if not mine:
                continue
            if mine[0].endswith("layer_norm"):
                norm = path
            else:
                blocks.append({"node": node_of[path], "role": mine[0], "label": roles.label(path),
                               "output": mine[0] in OUTPUTS})
                output = path if mine[0] in OUTPUTS else output
        if blocks or container:
            # post-norm (BERT): the norm sits beside the output projection; pre-norm otherwise
            post = bool(norm and output and _parent(norm) == _parent(output))
            sections.append({"name": name, "node": node_of.get(container) if container else None,
                             "blocks": blocks, "norm": node_of[norm] if norm else None,
                             "norm_position": "after" if post else "before"})
    stack_node = node_of.get(first)
    return {"stack": stack, "layer": stack_node, "layers": len([p for p in layers if p.startswith(stack + ".")]),
            "sections": sections, "other_stacks": sorted({p.rsplit(".", 1)[0] for p in layers} - {stack})}


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0]

