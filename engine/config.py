"""Delta configurations: one dataclass per method, validated in ``__post_init__``.

Field names follow OpenDelta where it had one. ``to_dict()`` output is a valid ``from_dict()``
input, and is the per-delta entry of a ``delta-design/1`` document.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from engine import opendelta
from engine.errors import ConfigError

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
DELTA_DTYPES = ("auto", "backbone", "float32")


@dataclass
class DeltaConfig:
    """Fields every method shares: where the delta goes and how it is wired in."""

    delta_type: ClassVar[str] = ""
    #: Routes the method supports; the first is the default.
    routes: ClassVar[tuple[str, ...]] = ("after",)

    modified_modules: list[str] | None = None
    exclude_modules: list[str] = field(default_factory=list)
    route: str | None = None
    name: str | None = None
    #: what ``freeze_module()`` leaves trainable: ``"deltas"`` plus backbone modules (expressions)
    unfrozen_modules: list[str] = field(default_factory=lambda: ["deltas"])
    #: dtype of the delta's parameters: "auto" = float32 on a 16-bit backbone (small updates do not
    #: vanish in bfloat16), else the backbone's; "backbone" = always the backbone's; or "float32"
    delta_dtype: str = "auto"
    #: OpenDelta's flag: common names in ``modified_modules`` always mean their roles, even where
    #: the model has a real module of that name (which wins otherwise: BERT's ``embeddings``)
    common_structure: bool = False

    def __post_init__(self) -> None:
        self.modified_modules = _expression_list("modified_modules", self.modified_modules, True)
        self.exclude_modules = _expression_list("exclude_modules", self.exclude_modules, False) or []
        self.unfrozen_modules = _expression_list("unfrozen_modules", self.unfrozen_modules, False) or []
        one_of(self.delta_type or "delta", "delta_dtype", self.delta_dtype, DELTA_DTYPES)
        if self.common_structure is None:
            self.common_structure = False
        if not isinstance(self.common_structure, bool):
            raise ConfigError(f"common_structure must be true or false, got {self.common_structure!r}")
        if self.route is None:
            self.route = self.routes[0]
        if self.route not in self.routes:
            raise ConfigError(
                f"{self.delta_type} does not support route {self.route!r}; "
                f"it supports: {', '.join(self.routes)}"
            )
        #: the name was not given: a delta built from this config may suffix it (``lora_1``) so it
        #: does not collide with a delta already on the backbone (not a field: never saved)
        self.automatic_name = self.name is None
        if self.name is None:
            self.name = self.delta_type
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(
                f"delta name {self.name!r} must be a Python identifier (it names the delta "
                "module inside each modified module), e.g. 'lora_task_a'"
            )
        self.validate()

    def validate(self) -> None:
        """Method-specific checks; raise :class:`ConfigError`."""

    # --- conversion ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"delta_type": self.delta_type, **dataclasses.asdict(self)}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, strict: bool = True) -> DeltaConfig:
        """Build from a dict (``delta_type`` may be present). OpenDelta's own keys are read as
        OpenDelta meant them (``engine.opendelta``). Any other unknown key is an error; with
        ``strict=False`` it is listed in one warning and ignored (OpenDelta's example configs
        carry training settings) — unless it looks like a typo of a real option."""
        if not isinstance(data, dict):
            raise ConfigError(f"a delta config must be a JSON object, got {type(data).__name__}")
        given_type = data.get("delta_type", cls.delta_type)
        if given_type != cls.delta_type:
            raise ConfigError(f"config has delta_type {given_type!r}, expected {cls.delta_type!r}")
        values = opendelta.translate(cls.delta_type, {k: v for k, v in data.items() if k != "delta_type"})
        fields = cls.field_names()
        unknown = sorted(set(values) - set(fields))
        typos = {k: opendelta.closest(k, fields) for k in unknown}
        typos = {k: v for k, v in typos.items() if v is not None}
        if unknown and (strict or typos):
            hint = "; ".join(f"{k!r}: did you mean {v!r}?" for k, v in typos.items())
            raise ConfigError(
                f"unknown {cls.delta_type} option(s): {', '.join(typos or unknown)}"
                f"{' (' + hint + ')' if hint else ''}; valid options are: {', '.join(fields)}"
            )
        if unknown:
            logger.warning("ignoring %d key(s) that are not %s options (training or run settings?): %s",
                           len(unknown), cls.delta_type, ", ".join(unknown))
            values = {k: v for k, v in values.items() if k in fields}
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"invalid {cls.delta_type} config: {exc}") from exc

    @classmethod
    def hyperparameters(cls) -> list[dict[str, Any]]:
        """Method-specific fields (not the shared ones) with type, default and help text."""
        shared = {f.name for f in dataclasses.fields(DeltaConfig)}
        result = []
        for f in dataclasses.fields(cls):
            if f.name in shared:
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            annotation = str(f.type).split("[")[0].split(" |")[0]  # "dict[str, int]" → "dict"
            result.append(
                {
                    "name": f.name,
                    "type": annotation if annotation in ("int", "float", "bool", "str", "dict", "list") else "str",
                    "default": default,
                    "help": f.metadata.get("help", ""),
                    "choices": f.metadata.get("choices"),
                }
            )
        return result


def _expression_list(name: str, value: Any, allow_none: bool) -> list[str] | None:
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name} must be a list of addressing expressions, got {value!r}")
    if allow_none and not value:
        raise ConfigError(
            f"{name} is empty; give at least one expression, or leave it out for the defaults"
        )
    return list(value)


def positive_int(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{owner}: {name} must be a positive integer, got {value!r}")


def positive_number(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{owner}: {name} must be a positive, finite number, got {value!r}")


def finite_number(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{owner}: {name} must be a finite number, got {value!r}")


def probability(owner: str, name: str, value: Any) -> None:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not 0 <= value < 1):
        raise ConfigError(f"{owner}: {name} must be in [0, 1), got {value!r}")


def one_of(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{owner}: {name} must be one of {', '.join(choices)}; got {value!r}")
