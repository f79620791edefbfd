"""Structural inference of common roles (``attn.q``, ``ff.w2``, …) for any model.

Repeated layers are found structurally (siblings in a ModuleList with one fingerprint); inside each
layer, attention blocks are the outermost modules whose class is an attention (or that call
transformers' attention interface), their projections are named by well-known spellings (or, with
exactly four Linear layers, by order), and feed-forward layers are classified by dataflow: a
projection that reads the layer's residual width is w1/gate, one that writes back to it is w2
(whatever the intermediate width: DeepSeek-V3's shared experts are narrower than the residual).
Norms, input embeddings and the output head come from class names and the model's own accessors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import nn

from engine.roles.kinds import (
    is_attention,
    is_fused_experts,
    is_norm,
    is_pointwise_conv,
)
from engine.targets import inside_delta
from engine.tree import ModuleTree, all_modules

_Q = re.compile(r"^(q|q_proj|q_b_proj|query|query_proj|wq|q_lin|to_q|qproj|q_linear|linear_q|to_query)$", re.I)
_KV = re.compile(r"^(kv|kv_proj|kv_b_proj|key_value|wkv)$", re.I)  # fused k/v (e.g. latent attention)
_K = re.compile(r"^(k|k_proj|key|key_proj|wk|k_lin|to_k|kproj|k_linear|linear_k|to_key)$", re.I)
_V = re.compile(r"^(v|v_proj|value|value_proj|wv|v_lin|to_v|vproj|v_linear|linear_v|to_value)$", re.I)
_QKV = re.compile(r"^(qkv|qkv_proj|c_attn|query_key_value|w_pack|wqkv|in_proj|qkv_linear|att_proj|"
                  r"queries_keys_values)$", re.I)
_O = re.compile(r"^(o|o_proj|out_proj|wo|out_lin|dense|c_proj|proj|to_out|out|output_proj|o_linear|attn_out|"
                r"projection|projection_layer|linear_out|proj_out)$", re.I)
_CROSS = re.compile(r"(cross|encoder_attn|encdec)", re.I)
_GATE = re.compile(r"(gate|wi_0|^w1$)", re.I)
#: names of square feed-forward projections, which dataflow alone cannot place
_WRITES_BACK = re.compile(r"^(down|down_proj|w2|fc2|wo|c_proj|dense_4h_to_h|fc_out|out_proj)$", re.I)
_READS = re.compile(r"^(up|up_proj|w1|w3|fc1|wi|wi_0|wi_1|c_fc|dense_h_to_4h|fc_in|gate|gate_proj)$", re.I)
_NAMED = MappingProxyType({"attn.q": _Q, "attn.k": _K, "attn.v": _V, "attn.qkv": _QKV, "attn.o": _O})
#: a narrowing layer this small scores or gates (a router's, a shared expert's gate), it does not project
_MIN_PROJECTION_WIDTH = 8

LABELS = MappingProxyType({
    "attn": "attention block", "cross_attn": "cross-attention block", "attn.q": "query projection",
    "attn.k": "key projection", "attn.v": "value projection", "attn.qkv": "fused q, k, v projection",
    "attn.o": "attention output projection", "ff": "feed-forward block", "ff.w1": "feed-forward up-projection",
    "ff.gate": "feed-forward gate projection", "ff.w2": "feed-forward down-projection",
    "layer_norm": "normalisation", "attn.layer_norm": "attention's normalisation",
    "ff.layer_norm": "feed-forward's normalisation",
    "cross_attn.layer_norm": "cross-attention's normalisation", "embeddings": "input embeddings", "head": "output head",
    "moe": "mixture-of-experts block", "moe.experts": "mixture-of-experts experts (fused parameters)",
    "layers": "repeated layer", "tower.vision": "vision tower", "tower.text": "text tower",
    "tower.audio": "audio tower",
})


@dataclass
class Roles:
    """Role → module paths (model order), and the role of each path for display."""

    by_role: dict[str, list[str]] = field(default_factory=dict)

    def add(self, role: str, path: str) -> None:
        paths = self.by_role.setdefault(role, [])
        if path not in paths:
            paths.append(path)

    def of(self, path: str) -> list[str]:
        return [role for role, paths in self.by_role.items() if path in paths]

    def label(self, path: str) -> str:
        """The most specific description: a fused qkv projection is not also listed as q, k and v,
        and a feed-forward layer with a specific role is not also called the feed-forward block."""
        roles = self.of(path)
        if "attn.qkv" in roles:
            roles = [r for r in roles if r not in ("attn.q", "attn.k", "attn.v")]
        if len(roles) > 1 and "ff" in roles:
            roles.remove("ff")
        if "layer_norm" in roles and any(r.endswith(".layer_norm") for r in roles):
            roles.remove("layer_norm")
        return ", ".join(LABELS.get(role, role) for role in roles)


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a dense projection: Linear, transformers' Conv1D, or a pointwise convolution."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        return module.weight.shape[0], module.weight.shape[1]
    if is_pointwise_conv(module):
        return module.in_channels, module.out_channels
    return None


def _projection_roles(block: str, path: str) -> list[str]:
    """Roles a projection's name gives it; a wrapper's name counts (``q_proj.linear`` is q)."""
    segments = path[len(block) + 1:].split(".")
    for name in reversed(segments):
        found = [role for role, pattern in _NAMED.items() if pattern.match(name)]
        if _KV.match(name):
            found += ["attn.k", "attn.v"]
        if found:
            return found
    return []


def layer_paths(tree: ModuleTree) -> list[str]:
    """Every layer of every repeated-layer stack (outermost stacks only).

    A list holding a folded group is a stack; its other numbered members are layers too (T5's
    first block differs from the rest only by its relative position bias).
    """
    layers: list[str] = []

    def walk(node, inside: bool) -> None:  # noqa: ANN001
        stack = not inside and any(child.is_group for child in node.children)
        for child in node.children:
            numbered = child.is_group or child.name.isdigit()
            if stack and numbered:
                layers.extend(child.member_paths)
            walk(child, inside or (stack and numbered))

    walk(tree.collapse().root, False)
    order = tree.order()
    return sorted(layers, key=order.__getitem__)


def infer_roles(model: nn.Module, tree: ModuleTree | None = None) -> Roles:
    tree = tree if tree is not None else ModuleTree.from_model(model)
    every = all_modules(model)
    modules = {path: module for path, module in every.items() if not inside_delta(path, every)}
    roles = Roles()
    layers = layer_paths(tree)
    for layer, inside in _by_layer(layers, modules).items():
        roles.add("layers", layer)
        _classify_layer(layer, inside, roles)
    _add_towers(layers, roles)
    if not layers:  # one layer in this config, or layers shared (ALBERT): read the whole model
        _classify_layer("", modules, roles)
    for path, module in modules.items():
        if path and is_norm(module):
            roles.add("layer_norm", path)
    for role, getter in (("embeddings", "get_input_embeddings"), ("head", "get_output_embeddings")):
        target = _accessed(model, getter, modules)
        path = next((p for p, m in modules.items() if m is target), None) if target is not None else None
        if path:
            roles.add(role, path)
    # the grammar cannot address a path that is also the tail of a longer one (a top-level
    # ``norm`` beside ``embedder.norm``) on its own: roles hold addressable modules only
    tails, order = tree.tails(), tree.order()
    ambiguous = {p for p in order if len(tails.get(p, ())) > 1}
    roles.by_role = {r: sorted((p for p in ps if p not in ambiguous), key=order.__getitem__)
                     for r, ps in roles.by_role.items()}
    roles.by_role = {r: ps for r, ps in roles.by_role.items() if ps}
    return roles


def _accessed(model: nn.Module, getter: str, modules: dict[str, nn.Module]) -> nn.Module | None:
    """What the model's ``getter`` returns; for a user's wrapper without one, what the outermost
    model inside it that has one returns."""
    for path in ["", *sorted((p for p in modules if p), key=lambda p: p.count("."))]:
        accessor = getattr(model if not path else modules[path], getter, None)
        try:
            target = accessor() if callable(accessor) else None
        except (NotImplementedError, AttributeError, TypeError):
            target = None
        if isinstance(target, nn.Module):
            return target
    return None


def _by_layer(layers: list[str], modules: dict[str, nn.Module]) -> dict[str, dict[str, nn.Module]]:
    """Each layer's own modules (itself included), found in one pass over the model: layers
    never nest, so a path belongs to the layer that is one of its prefixes."""
    grouped: dict[str, dict[str, nn.Module]] = {layer: {} for layer in layers}
    for path, module in modules.items():
        parts = path.split(".")
        for end in range(1, len(parts) + 1):
            owner = grouped.get(".".join(parts[:end]))
            if owner is not None:
                owner[path] = module
                break
    return grouped


def _classify_layer(layer: str, modules: dict[str, nn.Module], roles: Roles) -> None:
    """Roles inside one layer; ``modules`` holds the layer's modules (or, for ``""``, all)."""
    prefix = layer + "." if layer else ""
    # the layer itself counts: XLM keeps its attention blocks in their own list (``attentions.3``)
    inside = [p for p in modules if p and (p == layer or p.startswith(prefix))]
    attention = [p for p in inside if is_attention(modules[p])
                 and not any(p.startswith(a + ".") for a in inside if a != p and is_attention(modules[a]))]
    attention = [_attention_core(block, modules) for block in attention]
    for block in attention:
        cross = _CROSS.search(block.rsplit(".", 1)[-1]) or _CROSS.search(type(modules[block]).__name__)
        roles.add("attn", block)
        if cross:
            roles.add("cross_attn", block)
        linears = [p for p in modules if p.startswith(block + ".") and _linear_shape(modules[p])]
        named = {path: _projection_roles(block, path) for path in linears}
        for path, found in named.items():
            for role in found:
                roles.add(role, path)
        if not any(role != "attn.o" for found in named.values() for role in found) and len(linears) == 4:
            for role, path in zip(("attn.q", "attn.k", "attn.v", "attn.o"), linears):
                roles.add(role, path)
    for path in roles.by_role.get("attn.qkv", []):
        if path.startswith(prefix):
            for role in ("attn.q", "attn.k", "attn.v"):
                roles.add(role, path)
    outside = [p for p in inside if not any(p == a or p.startswith(a + ".") for a in attention)]
    experts = [p for p in outside if is_fused_experts(modules[p])]
    for path in experts:
        roles.add("moe.experts", path)
    expert_counts = {modules[p]._parameters[n].shape[0] for p in experts
                     for n, t in modules[p].named_parameters(recurse=False) if t.dim() == 3}
    projections = {p: _linear_shape(modules[p]) for p in outside
                   if not any(p.startswith(e + ".") for e in experts)}
    projections = {p: shape for p, shape in projections.items()
                   if shape is not None and min(shape) >= _MIN_PROJECTION_WIDTH and shape[1] not in expert_counts}
    norms = [p for p in outside if p != layer and is_norm(modules[p])]
    direct = [p for p in norms if p.rsplit(".", 1)[0] == layer or (not layer and "." not in p)]
    # convolutional blocks put a norm after every convolution, so their norms do not tell the
    # residual width: those keep the width rule (right for inverted residuals, as in MobileNet)
    convolutional = any(is_pointwise_conv(modules[p]) for p in projections)
    residual = None if convolutional else _residual_width(direct or norms, modules)
    reading, writing = _split_by_dataflow(projections, residual)
    gates = [p for p in reading if _GATE.search(p.rsplit(".", 1)[-1])] if len(reading) > 1 else []
    for path in reading:
        roles.add("ff.gate" if path in gates else "ff.w1", path)
    for path in writing:
        roles.add("ff.w2", path)
    members = reading + writing + experts
    _classify_norms(layer, [p for p in inside if p != layer and is_norm(modules[p])], attention, members, roles)
    if members:
        common = _common_parent(members)
        if common and common != layer and common.startswith(prefix):
            roles.add("ff", common)  # the feed-forward block: an MLP, or a mixture of experts
            if experts:
                roles.add("moe", common)
        else:
            for path in members:
                roles.add("ff", path)


#: a layer's own norms, by name, where the layer holds them beside its blocks (Llama, GPT-2, OPT):
#: the feed-forward spellings are tried first (``post_attention_layernorm`` is the FFN's)
_FF_NORM = re.compile(r"(post_attention|ffn|mlp|ln_2|ln2|norm2|final_layer_norm|ff_|_ff|output_layer_norm|_after$)",
                      re.I)
_ATTN_NORM = re.compile(r"(attn|attention|input_layernorm|ln_1|ln1|norm1|^sa_|_before$)", re.I)
#: norms of queries and keys inside an attention block (Qwen3's, OLMoE's, MLA's latent norms) are
#: no block's normalisation
_INNER_NORM = re.compile(r"^(q|k|kv|q_a|kv_a|query|key)_(layer)?norm", re.I)


def _classify_norms(layer: str, norms: list[str], attention: list[str], feed_forward: list[str],
                    roles: Roles) -> None:
    """``attn.layer_norm`` / ``ff.layer_norm`` (OpenDelta's names): a norm inside an attention
    block, or in a sub-block holding one (T5's ``layer.0``), is the attention's; one in a
    sub-block holding feed-forward projections (BERT's ``output``, T5's ``layer.2``) is the FFN's;
    a norm the layer holds beside both is placed by its name (never a stack's final norm). A norm beside a cross-attention
    block is ``cross_attn.layer_norm``."""
    for norm in norms:
        if _INNER_NORM.match(norm.rsplit(".", 1)[-1]):
            continue
        owner = norm.rsplit(".", 1)[0] if "." in norm else ""
        found = None
        while found is None and owner != layer and owner:
            blocks = [a for a in attention if a == owner or a.startswith(owner + ".")]
            ffn = [f for f in feed_forward if f.startswith(owner + ".")]
            if blocks and not ffn:
                found = "cross_attn" if any(a in roles.by_role.get("cross_attn", ()) for a in blocks) else "attn"
            elif ffn and not blocks:
                found = "ff"
            owner = owner.rsplit(".", 1)[0] if "." in owner else ""
        parent = norm.rsplit(".", 1)[0] if "." in norm else ""
        beside_attention = any((a.rsplit(".", 1)[0] if "." in a else "") == parent for a in attention)
        if found is None and (layer or beside_attention):  # never a whole stack's final norm
            name = norm.rsplit(".", 1)[-1]
            found = ("ff" if _FF_NORM.search(name) else "cross_attn" if _CROSS.search(name)
                     else "attn" if _ATTN_NORM.search(name) else None)
        if found is not None:
            roles.add(f"{found}.layer_norm", norm)


def _residual_width(norms: list[str], modules: dict[str, nn.Module]) -> int | None:
    """The width of the layer's residual stream: what its norms normalise — the layer's own
    (pre/post-norms, its direct children) where it has them, else those outside attention — the
    most common width, the larger one on a tie. None when the layer has no such norm."""
    widths = [int(modules[p].weight.shape[0]) for p in norms
              if isinstance(getattr(modules[p], "weight", None), torch.Tensor)]
    if not widths:
        return None
    return max(set(widths), key=lambda w: (widths.count(w), w))


def _split_by_dataflow(projections: dict[str, tuple[int, int]], residual: int | None) -> tuple[list[str], list[str]]:
    """Feed-forward projections that read the residual stream (w1/gate) and that write back to it
    (w2). Which is which follows the data, not the widths: a projection from the residual width to
    another width reads, one from another width to the residual width writes — so an FFN narrower
    than the residual (DeepSeek-V3's shared experts) is classified right. A square projection is
    neither unless its name says which; without a known residual width, widening layers read and
    narrowing ones write."""
    reading: list[str] = []
    writing: list[str] = []
    for path, (fan_in, fan_out) in projections.items():
        name = path.rsplit(".", 1)[-1]
        if residual is not None and fan_in == residual and fan_out != residual:
            reading.append(path)
        elif residual is not None and fan_out == residual and fan_in != residual:
            writing.append(path)
        elif fan_in == fan_out:
            if _WRITES_BACK.search(name):
                writing.append(path)
            elif _READS.search(name):
                reading.append(path)
        elif residual is None:
            (reading if fan_out > fan_in else writing).append(path)
    # a feed-forward block's writer reads what its readers produce: where such pairs exist, a
    # projection outside them (ALBERT's embedding-to-hidden mapping) is no part of the FFN
    produced = {projections[p][1] for p in reading}
    consumed = {projections[p][0] for p in writing}
    if produced & consumed:
        reading = [p for p in reading if projections[p][1] in consumed]
        writing = [p for p in writing if projections[p][0] in produced]
    return reading, writing


_TOWER_KINDS = (("tower.vision", re.compile(r"vision|visual|image|pixel", re.I)),
                ("tower.text", re.compile(r"text|language", re.I)),
                ("tower.audio", re.compile(r"audio|speech|acoustic", re.I)))


def _add_towers(layers: list[str], roles: Roles) -> None:
    """Multimodal models: the outermost modules holding layer stacks, when two or more of them are
    named for a modality (CLIP's ``vision_model`` and ``text_model``, LLaVA's ``vision_tower``)."""
    holders: dict[str, str] = {}
    for layer in layers:
        parts = layer.split(".")
        start = 1 if parts[0] == "model" and len(parts) > 2 else 0
        holders.setdefault(".".join(parts[: start + 1]), parts[start])
    named = [(kind, path) for path, name in holders.items()
             for kind, pattern in _TOWER_KINDS if pattern.search(name)]
    if len(named) >= 2:
        for kind, path in named:
            roles.add(kind, path)


def _attention_core(block: str, modules: dict[str, nn.Module]) -> str:
    """The innermost attention module holding all of the block's projections: T5's
    ``layer.0.SelfAttention`` rather than its residual wrapper ``layer.0`` (a T5LayerSelfAttention
    with the norm and dropout), while BERT's ``attention`` stays whole (its output projection
    lies beside ``attention.self``)."""
    projections = [p for p in modules if p.startswith(block + ".") and _linear_shape(modules[p])]
    inner = [p for p in modules if p.startswith(block + ".") and is_attention(modules[p])
             and all(q.startswith(p + ".") for q in projections)]
    return max(inner, key=lambda p: p.count("."), default=block)


def _common_parent(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    common = []
    for segments in zip(*parts):
        if len(set(segments)) != 1:
            break
        common.append(segments[0])
    candidate = ".".join(common)
    return candidate if candidate not in paths or len(paths) > 1 else candidate.rsplit(".", 1)[0]
