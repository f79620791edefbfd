"""What a module *is*: its kind (``kinds``), its role in the model (``inference``: attention,
projections, feed-forward, norms, …) and the common names built on those roles
(``common_names``: ``attn.q``, ``ff.w2``, … and each method's default positions)."""

from engine.roles.common_names import (
    ATTENTION_FREE_FALLBACKS,
    COMMON_NAME_MAP,
    COMMON_NAMES,
    DEFAULT_FALLBACKS,
    ModelStructure,
    available_roles,
    default_positions,
    expand_common_names,
)
from engine.roles.inference import LABELS, Roles, infer_roles, layer_paths
from engine.roles.kinds import IOSizes, declared_sizes

__all__ = [
    "ATTENTION_FREE_FALLBACKS",
    "COMMON_NAMES",
    "COMMON_NAME_MAP",
    "DEFAULT_FALLBACKS",
    "IOSizes",
    "LABELS",
    "ModelStructure",
    "Roles",
    "available_roles",
    "declared_sizes",
    "default_positions",
    "expand_common_names",
    "infer_roles",
    "layer_paths",
]
