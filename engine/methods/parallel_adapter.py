"""Parallel adapters (He et al., 2022): an adapter beside a module, h_out ← h_out + A(h_in).

Route ``parallel`` wraps one module (default: the FFN block). Route ``parallel_pair`` reads the
input of one module (A, default: the attention block) and adds to the output of a later one
(B, ``pair_modules``, default: the FFN down-projection) — the pairs are matched layer by layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from engine.addressing import resolve
from engine.config import DeltaConfig, finite_number, one_of, positive_int
from engine.delta import DeltaBase
from engine.errors import ConfigError
from engine.layers import DeltaModule
from engine.methods.adapter import ACTIVATIONS, AdapterLayer
from engine.registry import register
from engine.roles import ModelStructure, expand_common_names
from engine.roles.kinds import declared_sizes
from engine.routing import RouteHandle, attach_route
from engine.sizing import probe_sizes
from engine.tree import all_modules


@dataclass
class ParallelAdapterConfig(DeltaConfig):
    delta_type: ClassVar[str] = "parallel_adapter"
    routes: ClassVar[tuple[str, ...]] = ("parallel", "parallel_pair")

    bottleneck_dim: int = field(default=24, metadata={"help": "width of the bottleneck"})
    non_linearity: str = field(default="gelu_new", metadata={
        "help": "activation between down and up", "choices": ACTIVATIONS})
    scaled: float = field(default=1.0, metadata={"help": "factor on the adapter's output (OpenDelta's)"})
    pair_modules: list[str] | None = field(default=None, metadata={
        "help": "parallel_pair: the modules whose output receives the adapter (default ff.w2)"})

    def validate(self) -> None:
        positive_int("parallel_adapter", "bottleneck_dim", self.bottleneck_dim)
        finite_number("parallel_adapter", "scaled", self.scaled)
        one_of("parallel_adapter", "non_linearity", self.non_linearity, ACTIVATIONS)


@register
class ParallelAdapterModel(DeltaBase):
    config_class = ParallelAdapterConfig
    default_modified_modules: ClassVar[list[str]] = ["ff"]

    @classmethod
    def _resolve(cls, structure: ModelStructure, config: DeltaConfig) -> list[str]:
        """parallel_pair reads attention inputs by default (the FFN is the default for parallel)."""
        if config.route == "parallel_pair" and config.modified_modules is None:
            config = type(config).from_dict({**config.to_dict(), "modified_modules": ["attn"]})
        return super()._resolve(structure, config)

    def pairs(self) -> dict[str, str]:
        """Module A (input side) → module B (output side), layer by layer."""
        if self.config.route != "parallel_pair":
            return {}
        model = self.backbone_model
        structure = ModelStructure(model)
        inputs = self.planned_paths  # all of them, also when building a few (estimates)
        partners = resolve(structure.tree, expand_common_names(
            structure, list(self.config.pair_modules or ["ff.w2"]))).paths
        if len(partners) != len(inputs):
            raise ConfigError(
                f"parallel_pair needs one output module per input module: {len(inputs)} "
                f"inputs ({inputs[0]} …) but {len(partners)} pair_modules"
            )
        order = structure.tree.order()
        for a, b in zip(inputs, partners):
            if order[b] < order[a] and not b.startswith(a + "."):
                raise ConfigError(f"parallel_pair: {b!r} comes before {a!r}; B must run after A")
        pairs = dict(zip(inputs, partners))
        return {a: pairs[a] for a in self.modified_paths}

    def build_deltas(self, modules: dict[str, nn.Module]) -> dict[str, DeltaModule]:
        self.pair_paths = self.pairs()
        sizes = self.module_sizes(modules)
        every = all_modules(self.backbone_model)
        partner_sizes = {b: declared_sizes(every[b]) for b in self.pair_paths.values()}
        missing = [b for b, size in partner_sizes.items() if size is None]
        if missing:
            partner_sizes.update(probe_sizes(self.backbone_model, missing))
        result: dict[str, DeltaModule] = {}
        for path, module in modules.items():
            device, dtype = self.placement(module)
            out_dim = partner_sizes[self.pair_paths[path]].output_dim if self.pair_paths else sizes[path].output_dim
            result[path] = AdapterLayer.linear(sizes[path].input_dim, self.config.bottleneck_dim, out_dim,
                                               self.config.non_linearity, device, dtype).along_features_of(module)
            result[path].scale = float(self.config.scaled)
        return result


    def wire(self, path: str, module: nn.Module, delta: DeltaModule) -> RouteHandle:
        if not self.pair_paths:
            return attach_route("parallel", module, delta, select=self.row_selector)
        partner = all_modules(self.backbone_model)[self.pair_paths[path]]
        return attach_route("parallel_pair", module, delta, partner=partner, select=self.row_selector)
