"""The one addressing grammar: select modules by dotted path.

* tail match — ``query``, ``attention.self.query``: a path equal to the expression or ending in
  ``.`` + expression (dot boundary: ``attn`` never matches ``c_attn``);
* regex — ``[r]PATTERN``: PATTERN fullmatches a dot-aligned tail of the path, matched by RE2
  (linear time; patterns RE2 cannot run are rejected, so a typed pattern never hangs a server).

An expression that matches nothing raises :class:`NoMatchError` — never a silent partial match.
"""

from __future__ import annotations

import bisect
import difflib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import re2
from torch import nn

from engine.errors import (
    AddressingError,
    InvalidExpressionError,
    NoMatchError,
    UnknownPathError,
)
from engine.tree import ModuleTree

REGEX_PREFIX = "[r]"

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False
_RE2_OPTIONS.never_nl = True  # paths are matched one per line of a joined text


@dataclass(frozen=True)
class Expression:
    """A parsed addressing expression."""

    text: str
    is_regex: bool
    body: str

    def matches(self, tree: ModuleTree) -> list[int]:
        """Indices into ``tree.paths`` (model order) of every path this expression matches."""
        if not self.is_regex:
            return tree.tails().get(self.body, [])
        return _regex_matches(tree, self.body)


def parse_expression(text: Any) -> Expression:
    """Parse and validate one expression; raise :class:`InvalidExpressionError` if malformed."""
    if not isinstance(text, str):
        raise InvalidExpressionError(
            f"an addressing expression must be a string, got {type(text).__name__} {text!r}"
        )
    stripped = text.strip()
    if stripped.startswith(REGEX_PREFIX):
        pattern = stripped[len(REGEX_PREFIX) :]
        if not pattern:
            raise InvalidExpressionError(
                f"{text!r} is an empty regex; write a pattern after [r], e.g. [r]layer\\.(0|1)\\.query"
            )
        try:
            re2.compile(pattern, _RE2_OPTIONS)
        except re2.error as exc:
            detail = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
            raise InvalidExpressionError(
                f"{text!r} is not a regex RE2 can run ({detail}); lookarounds and backreferences "
                "are not supported — use alternation such as (0|1|2) instead"
            ) from exc
        return Expression(text, True, pattern)
    if not stripped:
        raise InvalidExpressionError(
            "an addressing expression is empty; write a module name such as 'query' or "
            "'attention.self.query', or a regex such as '[r]layer\\.(0|1)\\.query'"
        )
    if stripped.startswith(".") or stripped.endswith(".") or ".." in stripped:
        raise InvalidExpressionError(
            f"{text!r} is not a dotted module name (empty segment); write e.g. 'attention.self.query'"
        )
    return Expression(text, False, stripped)


_JOINED_CACHE_ATTR = "_addressing_joined"


def _joined(tree: ModuleTree) -> tuple[str, list[int]]:
    """All paths as one newline-joined text, with each line's start offset (cached on the tree)."""
    cached = getattr(tree, _JOINED_CACHE_ATTR, None)
    if cached is None:
        starts, offset = [], 0
        for path in tree.paths:
            starts.append(offset)
            offset += len(path) + 1
        cached = ("\n".join(tree.paths), starts)
        setattr(tree, _JOINED_CACHE_ATTR, cached)
    return cached


def _regex_matches(tree: ModuleTree, pattern: str) -> list[int]:
    text, starts = _joined(tree)
    compiled = re2.compile(f"(?m)^(?:[^\\n]*\\.)?(?:{pattern})$", _RE2_OPTIONS)
    return [bisect.bisect_right(starts, m.start()) - 1 for m in compiled.finditer(text)]


@dataclass
class MatchReport:
    """What a set of expressions selected: the paths (model order) and each expression's share."""

    paths: list[str]
    matches: dict[str, list[str]] = field(default_factory=dict)
    excluded: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __contains__(self, path: object) -> bool:
        return path in set(self.paths)

    def counts(self) -> dict[str, int]:
        """How many modules each (include) expression matched."""
        return {expr: len(paths) for expr, paths in self.matches.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "paths": self.paths,
            "matches": self.matches,
            "excluded": self.excluded,
            "counts": self.counts(),
        }


def as_tree(target: nn.Module | ModuleTree) -> ModuleTree:
    """Accept a model or an already built tree."""
    if isinstance(target, ModuleTree):
        return target
    if isinstance(target, nn.Module):
        return ModuleTree.from_model(target)
    raise TypeError(f"expected a torch.nn.Module or a ModuleTree, got {type(target).__name__}")


def _as_list(expressions: str | Iterable[str]) -> list[str]:
    return [expressions] if isinstance(expressions, str) else list(expressions)


def resolve(
    target: nn.Module | ModuleTree,
    expressions: str | Iterable[str],
    exclude: str | Iterable[str] = (),
) -> MatchReport:
    """Resolve include and exclude expressions to module paths, in model order.

    Every expression (include or exclude) must match at least one module of the model.
    """
    tree = as_tree(target)
    include = [parse_expression(e) for e in _as_list(expressions)]
    excludes = [parse_expression(e) for e in _as_list(exclude)]
    selected: set[int] = set()
    report = MatchReport(paths=[])
    for expression in include:
        indices = _matches_or_raise(tree, expression)
        selected.update(indices)
        report.matches[expression.text] = [tree.paths[i] for i in indices]
    for expression in excludes:
        indices = _matches_or_raise(tree, expression)
        removed = selected.intersection(indices)
        selected.difference_update(indices)
        report.excluded[expression.text] = [tree.paths[i] for i in sorted(removed)]
    report.paths = [tree.paths[i] for i in sorted(selected)]
    return report


def resolve_each(target: nn.Module | ModuleTree, expressions: Iterable[str]) -> list[list[str]]:
    """Each expression's matched paths (model order), every one required to match something.

    For many expressions at once (per-module rank patterns): tail names are index lookups, and all
    regexes run in one RE2 set over the paths, so the cost grows with the model and the matches,
    not with expressions × modules.
    """
    tree = as_tree(target)
    parsed = [parse_expression(e) for e in _as_list(expressions)]
    regexes = [e for e in parsed if e.is_regex]
    by_regex: dict[int, list[int]] = {id(e): [] for e in regexes}
    if regexes:
        patterns = re2.Set.FullMatchSet(_RE2_OPTIONS)
        for expression in regexes:
            patterns.Add(f"(?:.*\\.)?(?:{expression.body})")
        patterns.Compile()
        for position, path in enumerate(tree.paths):
            for hit in patterns.Match(path) or ():
                by_regex[id(regexes[hit])].append(position)
    result = []
    for expression in parsed:
        indices = by_regex[id(expression)] if expression.is_regex else expression.matches(tree)
        if not indices:
            _matches_or_raise(tree, expression)  # raises, naming the closest modules
        result.append([tree.paths[i] for i in indices])
    return result


def _matches_or_raise(tree: ModuleTree, expression: Expression) -> list[int]:
    indices = expression.matches(tree)
    if indices:
        return indices
    suggestions = closest_names(tree, expression.body)
    hint = f"; the closest existing names are: {', '.join(suggestions)}" if suggestions else ""
    kind = "regex" if expression.is_regex else "expression"
    raise NoMatchError(
        f"{kind} {expression.text!r} matches no module of this model{hint}. An expression "
        "matches a dotted module path or its tail at a dot boundary (e.g. 'query' matches "
        "'encoder.layer.0.attention.self.query'); [r]PATTERN matches a regex",
        expression.text,
        suggestions,
    )


def closest_names(tree: ModuleTree, text: str, limit: int = 5) -> list[str]:
    """Existing tail names (up to three segments, not starting with an index) closest to text."""
    candidates = {
        tail
        for tail in tree.tails()
        if tail.count(".") < 3 and not tail.split(".", 1)[0].isdigit()
    }
    lowered = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(text.lower(), list(lowered), n=limit, cutoff=0.6)
    return [lowered[c] for c in close]


# --- compiling a selection back to expressions ----------------------------------------------


def compile_selection(target: nn.Module | ModuleTree, paths: Iterable[str]) -> list[str]:
    """The shortest readable expressions that resolve to exactly ``paths``.

    Each path gets its shortest tail that matches nothing outside the selection; tails that differ
    only in one layer index merge into one ``[r]`` regex with an index alternation (or ``\\d+``
    when every existing index is chosen). Invariant: ``resolve(compile_selection(S)).paths == S``.
    """
    tree = as_tree(target)
    order = tree.order()
    wanted = list(dict.fromkeys(paths))
    unknown = [p for p in wanted if p not in order]
    if unknown:
        raise UnknownPathError(
            f"{len(unknown)} selected path(s) are not modules of this model: "
            f"{', '.join(map(repr, unknown[:5]))}; select paths from named_modules()"
        )
    selected = {order[p] for p in wanted}
    tails = tree.tails()
    fits: dict[str, bool] = {}
    chosen: list[tuple[str, ...]] = []
    covered: set[int] = set()
    for index in sorted(selected):
        if index in covered:
            continue
        parts = tree.paths[index].split(".")
        choice = None
        for start in range(len(parts) - 1, -1, -1):
            tail = ".".join(parts[start:])
            if tail not in fits:
                fits[tail] = all(i in selected for i in tails[tail])
            if fits[tail]:
                # a tail that starts at a layer index reads better with its container's name
                if parts[start].isdigit() and start > 0:
                    start -= 1
                choice = tuple(parts[start:])
                break
        if choice is None:
            others = [tree.paths[i] for i in tails[tree.paths[index]] if i not in selected]
            raise AddressingError(
                f"{tree.paths[index]!r} cannot be selected without {others[0]!r}: every "
                "expression matching it matches that module too (a path is also the tail of "
                "a longer one); add it to the selection"
            )
        chosen.append(choice)
        covered.update(tails[".".join(choice)])
    return _merge_indices(chosen, tails)


def _merge_indices(chosen: list[tuple[str, ...]], tails: dict[str, list[int]]) -> list[str]:
    """Merge tails that differ only at their first numeric segment into one regex each."""
    groups: dict[tuple[Any, ...], list[tuple[str, ...]]] = {}
    order: list[tuple[Any, ...]] = []
    for parts in chosen:
        position = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        key: tuple[Any, ...]
        if position is None:
            key = ("tail", parts)
        else:
            key = ("index", position, parts[:position], parts[position + 1 :])
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(parts)
    result: list[str] = []
    for key in order:
        members = groups[key]
        if len(members) == 1:
            result.append(".".join(members[0]))
            continue
        _, position, before, after = key
        indices = sorted({int(parts[position]) for parts in members})
        existing = _existing_indices(before, after, tails)
        alternation = r"\d+" if set(indices) == existing else index_pattern(indices)
        segments = [re.escape(s) for s in before] + [alternation] + [re.escape(s) for s in after]
        result.append(REGEX_PREFIX + r"\.".join(segments))
    return result


def index_pattern(indices: list[int]) -> str:
    """A regex group matching exactly ``indices`` (sorted, distinct, non-negative): runs of
    consecutive indices as digit ranges — ``63-125`` reads ``(6[3-9]|[7-9]\d|1[01]\d|12[0-5])``,
    not 63 alternatives — and the rest listed, whichever form is shorter."""
    listed = "(" + "|".join(map(str, indices)) + ")"
    pieces: list[str] = []
    start = 0
    for end in range(len(indices)):
        if end + 1 == len(indices) or indices[end + 1] != indices[end] + 1:
            low, high = indices[start], indices[end]
            pieces += [str(low), str(high)] if high == low + 1 else _digit_ranges(low, high)
            start = end + 1
    ranged = "(" + "|".join(pieces) + ")"
    return ranged if len(ranged) < len(listed) else listed


def _digit_ranges(low: int, high: int) -> list[str]:
    """Regex alternatives matching the decimal numbers ``low..high`` (no leading zeros)."""
    pieces: list[str] = []
    while low <= high:
        top = min(high, 10 ** len(str(low)) - 1)  # one number of digits at a time
        pieces += _same_width(str(low), str(top))
        low = top + 1
    return pieces


def _same_width(low: str, high: str) -> list[str]:
    """Alternatives matching the equally long digit strings ``low..high``."""
    common = 0
    while common < len(low) and low[common] == high[common]:
        common += 1
    prefix, low, high = low[:common], low[common:], high[common:]
    if not low:
        return [prefix]
    rest = len(low) - 1
    if low[1:] == "0" * rest and high[1:] == "9" * rest:
        return [prefix + _digit_class(low[0], high[0]) + r"\d" * rest]
    pieces: list[str] = []
    first, last = int(low[0]), int(high[0])
    if low[1:] != "0" * rest:
        pieces += [prefix + low[0] + p for p in _same_width(low[1:], "9" * rest)]
        first += 1
    if high[1:] != "9" * rest:
        last -= 1
    if first <= last:
        pieces.append(prefix + _digit_class(str(first), str(last)) + r"\d" * rest)
    if high[1:] != "9" * rest:
        pieces += [prefix + high[0] + p for p in _same_width("0" * rest, high[1:])]
    return pieces


def _digit_class(low: str, high: str) -> str:
    if low == high:
        return low
    return r"\d" if (low, high) == ("0", "9") else f"[{low}-{high}]"


def _existing_indices(
    before: tuple[str, ...], after: tuple[str, ...], tails: dict[str, list[int]]
) -> set[int]:
    """Every index i for which the tail ``before.i.after`` exists in the model."""
    prefix = ".".join(before) + "." if before else ""
    suffix = "." + ".".join(after) if after else ""
    found = set()
    for tail in tails:
        if tail.startswith(prefix) and tail.endswith(suffix):
            middle = tail[len(prefix) : len(tail) - len(suffix)] if suffix else tail[len(prefix) :]
            if middle.isdigit():
                found.add(int(middle))
    return found
