"""Compacter (Mahabadi et al., 2021): adapters whose projections are parameterised hypercomplex
multiplication (PHM) layers, W = Σᵢ Aᵢ ⊗ Bᵢ over n = hypercomplex_division terms.

The method's defining feature is that the rule matrices Aᵢ (n × n each) are **shared by every
Compacter layer** (``shared_phm_rule``, on by default as in the paper): one tensor, one checkpoint
key (``shared::phm_rule.…``). Each Bᵢ is a rank-``phm_rank`` product (``factorized_phm``) or a full
block. The options keep OpenDelta's names: ``factorized_phm_rule``, ``phm_c_init``,
``phm_init_range``, ``learn_phm``, ``hypercomplex_nonlinearity`` (Bᵢ's init),
``use_bias_down_sampler``, ``use_bias_up_sampler``. Unlike OpenDelta, the up-projection's Bᵢ
start at zero, so attaching changes no output (the design's zero-init rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from engine.config import DeltaConfig, one_of, positive_int, positive_number
from engine.delta import DeltaBase
from engine.errors import ConfigError, ModuleNotSupportedError
from engine.layers import DeltaModule
from engine.methods.adapter import ACTIVATIONS, AdapterLayer, route_dims
from engine.methods.low_rank_adapter import bottleneck
from engine.registry import register
from engine.roles.kinds import IOSizes

C_INITS = ("normal", "uniform")
W_INITS = ("glorot-uniform", "glorot-normal", "normal")


@dataclass
class CompacterConfig(DeltaConfig):
    delta_type: ClassVar[str] = "compacter"
    routes: ClassVar[tuple[str, ...]] = ("after", "before", "parallel")

    reduction_factor: int = field(default=16, metadata={"help": "bottleneck = width / reduction_factor"})
    hypercomplex_division: int = field(default=4, metadata={"help": "n: Kronecker terms and block size"})
    phm_rank: int = field(default=1, metadata={"help": "rank of each Bᵢ (with factorized_phm)"})
    non_linearity: str = field(default="gelu_new", metadata={
        "help": "activation between down and up", "choices": ACTIVATIONS})
    shared_phm_rule: bool = field(default=True, metadata={"help": "one set of rules Aᵢ for all layers"})
    factorized_phm: bool = field(default=True, metadata={"help": "Bᵢ as a rank-phm_rank product"})
    factorized_phm_rule: bool = field(default=False, metadata={"help": "Aᵢ as a rank-1 product"})
    phm_c_init: str = field(default="normal", metadata={"help": "init of the rules Aᵢ", "choices": C_INITS})
    phm_init_range: float = field(default=0.0001, metadata={"help": "std of Bᵢ when initialised 'normal'"})
    learn_phm: bool = field(default=True, metadata={"help": "train the rules Aᵢ"})
    hypercomplex_nonlinearity: str = field(default="glorot-uniform", metadata={
        "help": "init of the Bᵢ", "choices": W_INITS})
    use_bias_down_sampler: bool = field(default=True, metadata={"help": "bias on the down projection"})
    use_bias_up_sampler: bool = field(default=True, metadata={"help": "bias on the up projection"})

    def validate(self) -> None:
        for name in ("reduction_factor", "hypercomplex_division", "phm_rank"):
            positive_int("compacter", name, getattr(self, name))
        positive_number("compacter", "phm_init_range", self.phm_init_range)
        one_of("compacter", "non_linearity", self.non_linearity, ACTIVATIONS)
        one_of("compacter", "phm_c_init", self.phm_c_init, C_INITS)
        one_of("compacter", "hypercomplex_nonlinearity", self.hypercomplex_nonlinearity, W_INITS)
        for name in ("shared_phm_rule", "factorized_phm", "factorized_phm_rule", "learn_phm",
                     "use_bias_down_sampler", "use_bias_up_sampler"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"compacter: {name} must be true or false, got {getattr(self, name)!r}")


class PHMRule(nn.Module):
    """The n rule matrices Aᵢ (n × n), or their rank-1 factors; a buffer when not learned."""

    def __init__(self, config: CompacterConfig, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        n = config.hypercomplex_division
        shapes = ({"left": (n, n, 1), "right": (n, 1, n)} if config.factorized_phm_rule
                  else {"rule": (n, n, n)})
        for name, shape in shapes.items():
            tensor = torch.empty(shape, device=device, dtype=dtype)
            if not tensor.is_meta:
                if config.phm_c_init == "uniform":
                    tensor.uniform_(-0.01, 0.01)
                else:
                    tensor.normal_(0, 0.01)
            if config.learn_phm:
                self.register_parameter(name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)

    def matrices(self) -> torch.Tensor:
        """(n, n, n): the rules Aᵢ."""
        if "rule" in self._parameters or "rule" in self._buffers:
            return self.rule
        return torch.bmm(self.left, self.right)


class PHMLinear(nn.Module):
    """y = x · Σᵢ (Aᵢ ⊗ Bᵢ) + bias, with the rules Aᵢ its own or shared."""

    def __init__(self, in_dim: int, out_dim: int, config: CompacterConfig, zero: bool, bias: bool,
                 device: torch.device, dtype: torch.dtype, shared_rule: PHMRule | None) -> None:
        super().__init__()
        n, rank = config.hypercomplex_division, config.phm_rank
        if shared_rule is None:
            self.phm_rule = PHMRule(config, device, dtype)
        else:
            object.__setattr__(self, "_shared_rule", shared_rule)  # registered by its owner
        shapes = ({"left": (n, in_dim // n, rank), "right": (n, rank, out_dim // n)} if config.factorized_phm
                  else {"blocks": (n, in_dim // n, out_dim // n)})
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
        self.bias = nn.Parameter(torch.empty(out_dim, device=device, dtype=dtype)) if bias else None
        if device.type != "meta":
            self._initialise(config, zero)

    def _initialise(self, config: CompacterConfig, zero: bool) -> None:
        with torch.no_grad():
            for name in ("left", "right", "blocks"):
                tensor = self._parameters.get(name)
                if tensor is None:
                    continue
                for block in tensor:
                    if config.hypercomplex_nonlinearity == "glorot-uniform":
                        nn.init.xavier_uniform_(block)
                    elif config.hypercomplex_nonlinearity == "glorot-normal":
                        nn.init.xavier_normal_(block)
                    else:
                        block.normal_(0, config.phm_init_range)
            if zero:  # the up projection starts at zero: attaching changes nothing
                (self._parameters.get("right") if "right" in self._parameters else self.blocks).zero_()
            if self.bias is not None:
                self.bias.zero_()

    def rule(self) -> PHMRule:
        shared = self.__dict__.get("_shared_rule")
        return shared if shared is not None else self.phm_rule

    def weight(self) -> torch.Tensor:
        blocks = self.left @ self.right if "left" in self._parameters else self.blocks  # (n, in/n, out/n)
        rules = self.rule().matrices()  # (n, n, n)
        n, rows, columns = blocks.shape
        # Σᵢ Aᵢ ⊗ Bᵢ as one einsum: (n·rows) × (n·columns)
        return torch.einsum("iab,irc->arbc", rules, blocks).reshape(n * rows, n * columns)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = hidden @ self.weight()
        return out if self.bias is None else out + self.bias


@register
class CompacterModel(DeltaBase):
    config_class = CompacterConfig
    default_modified_modules: ClassVar[list[str]] = ["attn.o", "ff.w2"]

    def build_deltas(self, modules: dict[str, nn.Module]) -> dict[str, DeltaModule]:
        config: CompacterConfig = self.config  # type: ignore[assignment]
        shared: PHMRule | None = None
        if config.shared_phm_rule and modules:
            shared = PHMRule(config, *self.placement(next(iter(modules.values()))))
            self.shared_modules["phm_rule"] = shared
        built = super().build_deltas(modules)
        if shared is not None:
            next(iter(built.values())).phm_rule = shared  # registered once, in the first layer
        return built

    def make_delta(self, path: str, module: nn.Module, sizes: IOSizes) -> DeltaModule:
        device, dtype = self.placement(module)
        config: CompacterConfig = self.config  # type: ignore[assignment]
        n = config.hypercomplex_division
        in_dim, out_dim = route_dims(config.route, sizes)
        if in_dim % n or out_dim % n:
            raise ModuleNotSupportedError(
                f"compacter needs widths divisible by hypercomplex_division={n}; {path!r} has "
                f"{in_dim} → {out_dim}: choose another hypercomplex_division"
            )
        middle = bottleneck(in_dim, config.reduction_factor, n)
        shared = self.shared_modules["phm_rule"] if "phm_rule" in self.shared_modules else None
        down = PHMLinear(in_dim, middle, config, False, config.use_bias_down_sampler, device, dtype, shared)
        up = PHMLinear(middle, out_dim, config, True, config.use_bias_up_sampler, device, dtype, shared)
        return AdapterLayer(down, config.non_linearity, up).along_features_of(module)
