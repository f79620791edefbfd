"""The three export formats of a design: ``delta-design/1`` JSON, a runnable Python script, and
PEFT's ``adapter_config.json`` (when the design is expressible in PEFT)."""

from __future__ import annotations

import json
from typing import Any

from flask import render_template

from designer.payloads import PayloadError
from designer.preview import peft_availability
from designer.session import DesignSession
from engine import ConfigError, base_model_id, method_for, peft_adapter_config

FORMATS = {
    "json": ("delta-design.json", "application/json"),
    "python": ("delta_design.py", "text/x-python"),
    "peft": ("adapter_config.json", "application/json"),
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
    return filename, mime, json.dumps(_peft(session, document), indent=2)


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
