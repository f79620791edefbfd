"""The tree's filter box, evaluated by the engine with the expressions' one grammar: tail names,
common names (``attn.q``) and ``[r]`` regexes over module paths — and, in the same two forms,
class names (``Linear``, ``[r]Bert.*Attention``). Errors quote what the user typed."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import re2

from designer.payloads import MAX_TEXT, PayloadError
from engine import DeltaError, expand_common_names, resolve
from engine.addressing import REGEX_PREFIX

if TYPE_CHECKING:
    from designer.state import LoadedBackbone

_CLASS_REGEX = re2.Options()
_CLASS_REGEX.log_errors = False  # a bad regex is the user's to fix: reported, not logged


def filter_tree(loaded: LoadedBackbone, text: str) -> list[str]:
    """Collapsed node paths that ``text`` selects (a module it matches, or its class)."""
    text = text.strip()
    if not text:
        return []
    if len(text) > MAX_TEXT:
        raise PayloadError(f"a filter has at most {MAX_TEXT} characters", "search")
    matched: set[str] = set()
    problem = None
    try:
        matched = set(resolve(loaded.twin_tree, expand_common_names(loaded.structure, [text])).paths)
    except DeltaError as error:
        problem = str(error)
    is_class = _class_test(text)
    nodes = [node.path for node in loaded.collapsed.root.walk()
             if node.path and (is_class(node.class_name) or any(p in matched for p in node.member_paths))]
    if not nodes:
        raise PayloadError(problem or f"nothing matches {text!r}", "search")
    return nodes


def _class_test(text: str) -> Callable[[str], bool]:
    """Whether a class name is ``text`` (or fullmatches its ``[r]`` regex)."""
    if not text.startswith(REGEX_PREFIX):
        return lambda name: name == text
    try:
        pattern = re2.compile(text[len(REGEX_PREFIX):], _CLASS_REGEX)
    except re2.error:
        return lambda name: False  # the engine's error for the paths names the bad regex
    return lambda name: pattern.fullmatch(name) is not None
