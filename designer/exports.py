"""The export formats of a design: ``delta-design/1`` JSON, a runnable Python script, PEFT's
``adapter_config.json``, and the LoRA lines of a LLaMA-Factory or an axolotl training config (the
last three when the design is expressible there; otherwise an error saying why)."""

from __future__ import annotations

import json
from typing import Any

from flask import render_template

from designer.payloads import PayloadError
from designer.preview import peft_availability
from designer.session import DesignSession
from engine import (
    ConfigError,
    base_model_id,
    format_indices,
    method_for,
    peft_adapter_config,
)

FORMATS = {
    "json": ("delta-design.json", "application/json"),
    "python": ("delta_design.py", "text/x-python"),
    "peft": ("adapter_config.json", "application/json"),
    "llamafactory": ("llamafactory_lora.yaml", "text/yaml"),
    "axolotl": ("axolotl_lora.yaml", "text/yaml"),
}


def design_document(session: DesignSession) -> dict[str, Any]:
    loaded, _ = session.require()
    return session.design().to_dict(loaded.twin, loaded.twin_tree)


def export(session: DesignSession, kind: str) -> tuple[str, str, str]:
    """``(file name, mime type, text)`` for an export ``kind``."""
    if kind not in FORMATS:
        raise PayloadError(f"export format must be one of {', '.join(FORMATS)}", "format")
    filename, mime = FORMATS[kind]
    document = design_document(session)
    if kind == "json":
        return filename, mime, json.dumps(document, indent=2)
    if kind == "python":
        deltas = ", ".join(f"{d['name']} ({d['delta_type']})" for d in document["deltas"]) or "no deltas"
        text = render_template(
            "export_script.py.jinja",
            # the summary sits in a docstring: keep quotes and backslashes out of it
            summary=f"{deltas} on {document['backbone']['source']}".replace("\\", "/").replace('"', "'"),
            design_json=repr(json.dumps(document, indent=2)),
        )
        return filename, mime, text
    peft = _peft(session, document)
    if kind == "peft":
        return filename, mime, json.dumps(peft, indent=2)
    return filename, mime, trainer_lines(kind, peft)


def trainer_lines(kind: str, peft: dict[str, Any]) -> str:
    """LLaMA-Factory's or axolotl's YAML lines for the LoRA a PEFT config describes; a design
    they cannot express (a regex target, per-module ranks, trained biases, layers for LLaMA-Factory) is
    refused by name rather than written as something else."""
    tool = {"llamafactory": "LLaMA-Factory", "axolotl": "axolotl"}[kind]
    targets = peft["target_modules"]
    layers = peft.get("layers_to_transform") or []
    unsupported = [
        (isinstance(targets, str), f"its modules need a regex ({targets!r}); {tool} takes module names"),
        (bool(peft["rank_pattern"] or peft["alpha_pattern"]), f"{tool} has one rank and alpha for every module"),
        (bool(layers) and kind == "llamafactory",
         f"it picks layers {format_indices(layers) if layers else ''}; LLaMA-Factory's lora_target has no layer choice "
         "(use the axolotl or PEFT export)"),
        (peft["bias"] != "none", f"it trains biases ({peft['bias']}); {tool} trains none with LoRA"),
    ]
    for refused, why in unsupported:
        if refused:
            raise PayloadError(f"{tool} cannot express this design: {why}", kind)
    saved = peft.get("modules_to_save") or []
    if kind == "llamafactory":
        lines = ["finetuning_type: lora", f"lora_target: {','.join(targets)}", f"lora_rank: {peft['r']}",
                 f"lora_alpha: {peft['lora_alpha']}", f"lora_dropout: {peft['lora_dropout']}"]
        lines += [f"additional_target: {','.join(saved)}"] if saved else []
        lines += ["use_rslora: true"] if peft["use_rslora"] else []
        lines += ["use_dora: true"] if peft["use_dora"] else []
    else:
        lines = ["adapter: lora", f"lora_r: {peft['r']}", f"lora_alpha: {peft['lora_alpha']}",
                 f"lora_dropout: {peft['lora_dropout']}", "lora_target_modules:", *(f"  - {t}" for t in targets)]
        lines += [f"peft_layers_to_transform: {list(layers)}"] if layers else []
        lines += ["lora_modules_to_save:", *(f"  - {m}" for m in saved)] if saved else []
        lines += ["peft_use_rslora: true"] if peft["use_rslora"] else []
        lines += ["peft_use_dora: true"] if peft["use_dora"] else []
    return "\n".join(lines) + "\n"


def _peft(session: DesignSession, document: dict[str, Any]) -> dict[str, Any]:
    availability = peft_availability(session.groups)
    if not availability["available"]:
        raise PayloadError(availability["reason"], "peft")
    loaded, _ = session.require()
    entry = document["deltas"][0]
    config = method_for(entry["delta_type"]).config_class.from_dict(
        {k: v for k, v in entry.items() if k not in ("resolved_modules", "trainable_parameters")})
    delta = method_for("lora")(loaded.twin, config=config, attach=False)
    try:
        return peft_adapter_config(delta, base_model_id(loaded.source), document["unfrozen_modules"] or None)
    except ConfigError as error:
        raise PayloadError(str(error), "peft") from error
