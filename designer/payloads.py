"""Validation of socket payloads and REST bodies: every field checked, errors name the field."""

from __future__ import annotations

from typing import Any

MAX_LIST = 10_000
MAX_TEXT = 10_000


class PayloadError(ValueError):
    """A malformed request; ``field`` names the control it came from."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def as_object(payload: Any, event: str) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise PayloadError(f"{event} expects a JSON object, got {type(payload).__name__}")
    return payload


def text(payload: dict[str, Any], name: str, *, optional: bool = False, empty: bool = False) -> str | None:
    value = payload.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or (not empty and not value.strip()) or len(value) > MAX_TEXT:
        raise PayloadError(f"'{name}' must be a non-empty string (at most {MAX_TEXT} characters)", name)
    return value


def boolean(payload: dict[str, Any], name: str) -> bool:
    value = payload.get(name)
    if not isinstance(value, bool):
        raise PayloadError(f"'{name}' must be true or false", name)
    return value


def text_list(payload: dict[str, Any], name: str, *, optional: bool = False) -> list[str] | None:
    value = payload.get(name)
    if value is None and optional:
        return None
    if (not isinstance(value, list) or len(value) > MAX_LIST
            or not all(isinstance(v, str) and len(v) <= MAX_TEXT for v in value)):
        raise PayloadError(f"'{name}' must be a list of strings", name)
    return value


def mapping(payload: dict[str, Any], name: str, *, optional: bool = False) -> dict[str, Any] | None:
    value = payload.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise PayloadError(f"'{name}' must be an object", name)
    return value
