"""JSON for everything a client sends (socket packets and REST bodies), with bounds that keep a
hostile message cheap and answerable.

* An integer literal longer than :data:`MAX_DIGITS` digits reads as ±infinity (not a number
  that costs seconds to convert or print): the field's validation then refuses it by name.
  The stock parser raised instead, so such a socket event got no answer at all.
* ``NaN`` and ``Infinity`` read as floats and are refused by the same validation.
* Nesting deeper than Python's parser allows is a ``ValueError`` ("nested too deeply"), not a
  ``RecursionError`` that surfaced as an internal error.
"""

from __future__ import annotations

import json
from json import JSONDecodeError, dumps  # noqa: F401 - the module interface Socket.IO expects
from typing import Any

MAX_DIGITS = 30


def _integer(text: str) -> int | float:
    if len(text.lstrip("-")) > MAX_DIGITS:
        return float("-inf") if text.startswith("-") else float("inf")
    return int(text)


def loads(text: str | bytes, **options: Any) -> Any:
    """``json.loads`` with the bounds above."""
    options.setdefault("parse_int", _integer)
    try:
        return json.loads(text, **options)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None
