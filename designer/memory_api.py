"""``POST /api/memory-plan``: what one GPU would hold while this tab's design trains — weights in
their format, trainable states, activations traced on the meta device — and whether it fits
(see :mod:`engine.memory_plan`). Plans are memoised per backbone, design and setup."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from designer.payloads import parse
from designer.state import attached
from designer.views import current_session
from engine import (
    TrainingSetup,
    computing_in,
    plan_memory,
    trace_activations,
    weight_bytes,
)

api = Blueprint("memory", __name__)

@api.post("/api/memory-plan")
def memory_plan() -> Response:
    """The body holds :class:`TrainingSetup`'s fields (GPU memory in bytes); the engine checks them."""
    body = request.get_json(silent=True)
    setup = parse(TrainingSetup, body if body is not None else {}, "memory-plan")
    session = current_session()
    loaded, _ = session.require()
    design = session.design()
    key = (json.dumps([c.to_dict() for c in design.deltas], sort_keys=True, default=str),
           tuple(design.unfrozen_modules), setup)
    previewer = current_app.extensions["delta_designer"].previewer(loaded)
    return jsonify(previewer.plans.get(key, lambda: _plan(loaded, design, setup)))


def _plan(loaded: Any, design: Any, setup: TrainingSetup) -> dict[str, Any]:
    model = loaded.planning_model()
    # the design is attached to a shared weight-free model, in the setup's compute dtype, for the trace
    with loaded.lock, computing_in(model, setup.compute_dtype):
        weights = weight_bytes(model, setup)
        with attached(model, design) as applied:
            trainable = applied.num_trainable_parameters()
            trace = trace_activations(model, setup.batch, setup.sequence, attention=setup.attention,
                                      checkpointing=setup.checkpointing)
    return {**plan_memory(weights, trainable, trace, setup), "trainable": trainable}
