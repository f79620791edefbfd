"""The one validation layer for what clients send: a pydantic schema per socket event, with every
type, length, count and size limit stated here. A payload that fails gets a :class:`PayloadError`
naming the field and the limit, before anything changes.

Numbers inside ``hyperparameters`` are checked by the engine's config classes (they know each
option), and the size of the design they produce by :mod:`designer.session` (never more trainable
parameters than the backbone has).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)

#: longest expression, node path, name or layer range text
MAX_TEXT = 1_000
#: longest backbone source (a local directory path)
MAX_SOURCE = 4_096
#: most node paths one tick may carry (a 670B model's folded tree has far fewer nodes)
MAX_PATHS = 10_000
#: most expressions in one group
MAX_EXPRESSIONS = 512
#: most hyper-parameters one change may set
MAX_HYPERPARAMETERS = 32
#: most delta groups in one design (the page's and an imported one's)
MAX_GROUPS = 64

#: the most matching work one request may make the engine do: expressions × modules, an
#: expression counting one unit per started 64 characters (RE2 matches in linear time, so this
#: bounds the time: about half a second on a 2-core machine, measured on the 405B shape)
MAX_MATCH_WORK = 1_000_000
CHARS_PER_UNIT = 64

Text = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=MAX_TEXT)]
Source = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=MAX_SOURCE)]


class PayloadError(ValueError):
    """A malformed request; ``field`` names the control it came from."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


#: largest client sequence number (JavaScript's largest exact integer)
MAX_SEQ = 2**53 - 1


class Message(BaseModel):
    """Fields a client did not send are absent; unknown extra fields are ignored. ``seq`` is the
    client's count of the events it sent on this connection: the server refuses one that does not
    come after the last, and echoes it in the answer."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    seq: Annotated[int, Field(ge=0, le=MAX_SEQ)] | None = None


class ToggleNodes(Message):
    group_id: Text
    paths: Annotated[list[Text], Field(max_length=MAX_PATHS)]
    checked: StrictBool


class SetGroup(Message):
    group_id: Text
    name: Text | None = None
    method: Text | None = None
    route: Text | None = None
    hyperparameters: Annotated[dict[Text, Any], Field(max_length=MAX_HYPERPARAMETERS)] | None = None


class SetExpressions(Message):
    group_id: Text
    expressions: Annotated[list[Text], Field(max_length=MAX_EXPRESSIONS)]
    #: the expressions are common names meant as roles (a quick pick), even where a module has that name
    roles: bool = False


class SetLayers(Message):
    group_id: Text
    node_path: Text
    layers: Text


class AddGroup(Message):
    method: Text | None = None


class GroupId(Message):
    group_id: Text


class SetDtype(Message):
    dtype: Text


class LoadBackbone(Message):
    source: Source


class DesignBody(Message):
    """``POST /api/design/import``: the shape and sizes here; the engine checks the contents."""

    format: Text
    deltas: Annotated[list[dict[Text, Any]], Field(max_length=MAX_GROUPS)] = []
    unfrozen_modules: Annotated[list[Text], Field(max_length=MAX_EXPRESSIONS)] = []
    backbone: dict[Text, Any] | None = None


def _problem(error: dict[str, Any]) -> str:
    kind, context = error["type"], error.get("ctx") or {}
    if kind == "missing":
        return "is required"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_too_long":
        return f"must be at most {context.get('max_length')} characters"
    if kind == "too_long":
        return f"may hold at most {context.get('max_length')} entries"
    if kind == "string_type":
        return "must be a string"
    if kind == "bool_type":
        return "must be true or false"
    if kind in ("list_type", "dict_type"):
        return "must be a list" if kind == "list_type" else "must be an object"
    if kind == "value_error":  # a check of the engine's own: its message as it is
        return str(context.get("error", error["msg"]))
    return str(error["msg"])


def parse(model: type[Any], payload: Any, event: str) -> Any:
    """``payload`` validated against ``model`` (a schema here, or an engine dataclass that checks
    itself, strictly typed); a :class:`PayloadError` naming the first wrong field
    (``paths[3]``, ``hyperparameters``) and the limit otherwise."""
    if not isinstance(payload, dict):
        raise PayloadError(f"{event} expects a JSON object, got {type(payload).__name__}")
    try:
        if issubclass(model, BaseModel):
            return model.model_validate(payload)
        # JSON mode: strict types, and an object may stand for the dataclass
        return TypeAdapter(model).validate_json(json.dumps(payload), strict=True)
    except ValidationError as invalid:
        error = invalid.errors(include_url=False, include_input=False)[0]
        location = [str(part) for part in error["loc"]]
        field = location[0] if location else None
        if not location:  # a check of the whole object (an engine dataclass's own)
            raise PayloadError(f"{event}: {_problem(error)}", field) from None
        shown = location[0] + "".join(f"[{part}]" for part in location[1:])
        raise PayloadError(f"{event}: '{shown}' {_problem(error)}", field) from None


def check_match_work(modules: int, expressions: list[str], field: str) -> None:
    """Refuse, before any matching, expressions that would take more than :data:`MAX_MATCH_WORK`
    to match against ``modules`` modules."""
    units = sum(1 + len(e) // CHARS_PER_UNIT for e in expressions)
    if units * modules > MAX_MATCH_WORK:
        characters = sum(len(e) for e in expressions)
        raise PayloadError(
            f"matching {len(expressions):,} expressions ({characters:,} characters) against {modules:,} "
            f"modules is {units * modules:,} units of work, more than the {MAX_MATCH_WORK:,} one request "
            "may take; use fewer or shorter expressions (a common name such as attn.q selects a "
            "projection in every layer)", field)
