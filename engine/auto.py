"""AutoDeltaConfig / AutoDeltaModel: pick the method class from ``delta_type`` (the registry)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from engine.checkpoint import RECORD_KEYS, read_config
from engine.config import DeltaConfig
from engine.delta import DeltaBase
from engine.errors import ConfigError
from engine.persistence import locate
from engine.registry import method_for


class AutoDeltaConfig:
    """Build the right config dataclass from a dict or a saved checkpoint."""

    @staticmethod
    def from_dict(data: dict[str, Any], *, strict: bool = False) -> DeltaConfig:
        """The method's config. As OpenDelta's: keys that are no delta option (an example
        config's training settings) are listed in one warning and ignored; ``strict=True`` makes
        them an error. A key that looks like a typo of an option is an error either way."""
        if not isinstance(data, dict) or "delta_type" not in data:
            raise ConfigError(
                'a delta config needs a "delta_type", e.g. {"delta_type": "lora"}'
            )
        return method_for(data["delta_type"]).config_class.from_dict(data, strict=strict)

    @staticmethod
    def from_finetuned(directory: str | Path, *, strict: bool = False, local_files_only: bool = False,
                       cache_dir: str | Path | None = None) -> DeltaConfig:
        """The config of a saved delta (this library's checkpoint or an OpenDelta ``config.json``);
        ``cache_dir`` and ``local_files_only`` as OpenDelta's (see :func:`engine.persistence.locate`)."""
        raw = read_config(locate(directory, cache_dir=cache_dir, local_files_only=local_files_only))
        return AutoDeltaConfig.from_dict({k: v for k, v in raw.items() if k not in RECORD_KEYS}, strict=strict)


class AutoDeltaModel:
    """Build or load a delta of whichever method a config names."""

    @staticmethod
    def from_config(
        config: DeltaConfig | dict[str, Any], backbone_model: nn.Module, attach: bool = True
    ) -> DeltaBase:
        if isinstance(config, dict):
            config = AutoDeltaConfig.from_dict(config)
        return method_for(config.delta_type)(backbone_model, config=config, attach=attach)

    @staticmethod
    def from_finetuned(directory: str | Path, backbone_model: nn.Module, *, is_trainable: bool = False,
                       check_hash: bool = True, local_files_only: bool = False,
                       cache_dir: str | Path | None = None) -> DeltaBase:
        """Load a checkpoint of any method (see :meth:`DeltaBase.from_finetuned`)."""
        return DeltaBase.from_finetuned(directory, backbone_model, is_trainable=is_trainable, check_hash=check_hash,
                                        local_files_only=local_files_only, cache_dir=cache_dir)
