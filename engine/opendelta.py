"""OpenDelta's configuration keys, read as OpenDelta meant them.

OpenDelta's configs (its ``config.json`` files, its example configs, its constructors' keyword
arguments) carry keys this library spells differently, records elsewhere, or does not need. Each
is listed here with what it becomes: a field of ours, a record, or a refusal that names the key
when the value asks for behaviour this library does not have. Keys that are not delta options at
all (training settings in OpenDelta's example configs) are the caller's business: see
:func:`split_unknown`.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from engine.errors import ConfigError

logger = logging.getLogger(__name__)

Translation = Callable[[str, Any, dict[str, Any]], None]
"""Reads one OpenDelta key's value into ``values`` (our fields), or raises naming the key."""


def _record(reason: str) -> Translation:
    """A key that records something about the run, not the delta: dropped (logged)."""
    def translate(key: str, value: Any, values: dict[str, Any]) -> None:
        logger.info("OpenDelta option %s=%r is not a delta option here: %s", key, value, reason)
    return translate


def _only(allowed: tuple[Any, ...], reason: str) -> Translation:
    """A key whose only supported values are ``allowed`` (they change nothing here)."""
    def translate(key: str, value: Any, values: dict[str, Any]) -> None:
        if value not in allowed:
            raise ConfigError(f"OpenDelta option {key}={value!r} is not supported: {reason}")
    return translate


def _route_from_sequential(key: str, value: Any, values: dict[str, Any]) -> None:
    """OpenDelta's ``sequential=True`` is the ``after`` route (its only one for these methods)."""
    if value not in (True, None):
        raise ConfigError(f"OpenDelta option {key}={value!r} is not supported: OpenDelta's non-sequential "
                          "adapters were never implemented; use route='parallel' for a parallel adapter")
    values.setdefault("route", "after")


_SHARED: Mapping[str, Translation] = MappingProxyType({
    "backbone_class": _record("the checkpoint records the backbone class itself"),
    "backbone_checkpoint_name": _record("a note about the backbone, kept by the caller"),
    "backbone_hash": _record("checkpoints here record a structure hash (see from_finetuned(check_hash=...))"),
    "opendelta_version": _record("a version note"),
    "transformers_version": _record("a version note"),
    "interactive_modify": _only((False, None, 0), "OpenDelta's interactive picker is `delta-designer serve` here"),
    "backend": _only(("hf", None), "only transformers/PyTorch backbones (bmtrain is not supported)"),
})

_PER_METHOD: Mapping[str, Mapping[str, Translation]] = MappingProxyType({
    "adapter": MappingProxyType({"sequential": _route_from_sequential}),
    "compacter": MappingProxyType({
        "sequential": _route_from_sequential,
        # OpenDelta sizes the bottleneck by reduction_factor and never reads bottleneck_dim
        "bottleneck_dim": _record("OpenDelta's compacter sizes its bottleneck by reduction_factor"),
        "shared_W_phm": _only((False, None), "OpenDelta itself refuses it (assert shared_W_phm == False)"),
        # the Kronecker product and the block-wise product compute the same layer
        "kronecker_prod": _only((True, False, None), "it is a flag (true or false)"),
    }),
    "soft_prompt": MappingProxyType({
        "other_expand_ids": _only((None, {}), "this library pads attention masks and labels itself"),
    }),
})


def opendelta_keys(delta_type: str) -> set[str]:
    """Every OpenDelta key that :func:`translate` reads for ``delta_type``."""
    return set(_SHARED) | set(_PER_METHOD.get(delta_type, {}))


def translate(delta_type: str, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with OpenDelta's keys read into this library's fields (a new dict)."""
    table = {**_SHARED, **_PER_METHOD.get(delta_type, {})}
    result = {k: v for k, v in values.items() if k not in table}
    for key, value in values.items():
        if key in table:
            table[key](key, value, result)
    return result


def closest(key: str, fields: list[str]) -> str | None:
    """The option ``key`` is most likely a typo of, if any: such a key is never ignored (a config
    that says ``lora_alhpa`` wants ``lora_alpha``, and a warning would lose that)."""
    found = difflib.get_close_matches(key, fields, n=1, cutoff=0.8)
    return found[0] if found else None
