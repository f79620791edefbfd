import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import (
    InvalidExpressionError,
    ModuleTree,
    NoMatchError,
    UnknownPathError,
    compile_selection,
    load_backbone,
    resolve,
)
from engine.addressing import index_pattern
from engine.errors import AddressingError
from tests.engine.toy_models import Toy

SHAPES = ["bert-base-uncased", "gpt2", "t5-base", "llama-3-8b", "mixtral-8x7b"]
_TREES: dict[str, ModuleTree] = {}


def tree_of(name: str) -> ModuleTree:
    if name not in _TREES:
        _TREES[name] = ModuleTree.from_model(load_backbone(f"catalog:{name}").model)
    return _TREES[name]


@pytest.fixture(scope="module")
def bert():
    return tree_of("bert-base-uncased")


def test_tail_match_respects_dot_boundaries():
    gpt2 = tree_of("gpt2")
    attn = resolve(gpt2, ["attn"]).paths
    assert attn == [f"transformer.h.{i}.attn" for i in range(12)]
    assert all(not p.endswith("c_attn") for p in attn)
    assert resolve(gpt2, "c_attn").paths[0] == "transformer.h.0.attn.c_attn"


def test_tail_match_with_several_segments_and_index(bert):
    assert resolve(bert, ["3.attention"]).paths == ["encoder.layer.3.attention"]
    report = resolve(bert, ["attention.self.query", "value"])
    assert len(report) == 24
    assert report.counts() == {"attention.self.query": 12, "value": 12}
    assert report.paths[:2] == [
        "encoder.layer.0.attention.self.query",
        "encoder.layer.0.attention.self.value",
    ]  # model order, not expression order


def test_regex_fullmatches_a_dot_aligned_tail(bert):
    report = resolve(bert, [r"[r]layer\.(0|1|2)\.attention\.self\.query"])
    assert report.paths == [f"encoder.layer.{i}.attention.self.query" for i in range(3)]
    assert resolve(bert, [r"[r]que.*"]).paths == resolve(bert, ["query"]).paths
    with pytest.raises(NoMatchError):
        resolve(bert, [r"[r]uery"])  # not dot-aligned: must not match 'query'


def test_excludes_remove_matches(bert):
    report = resolve(bert, ["query"], exclude=[r"[r]layer\.(0|11)\.attention\.self\.query"])
    assert len(report) == 10
    assert report.excluded[r"[r]layer\.(0|11)\.attention\.self\.query"] == [
        "encoder.layer.0.attention.self.query",
        "encoder.layer.11.attention.self.query",
    ]


def test_no_match_is_an_error_naming_the_expression_and_close_names(bert):
    with pytest.raises(NoMatchError) as caught:
        resolve(bert, ["query", "vaule"])
    assert "'vaule'" in str(caught.value)
    assert caught.value.expression == "vaule"
    assert "value" in caught.value.suggestions
    with pytest.raises(NoMatchError, match="'pooler.dens'"):
        resolve(bert, ["query"], exclude=["pooler.dens"])


@pytest.mark.parametrize(
    "expression, message",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("[r]", "empty regex"),
        ("[r](query", "not a regex RE2 can run"),
        (r"[r](?=query)q", "lookarounds"),
        (r"[r](a)\1", "backreferences"),
        ("encoder..layer", "empty segment"),
        (".query", "empty segment"),
        (42, "must be a string"),
    ],
)
def test_malformed_expressions_are_rejected(bert, expression, message):
    with pytest.raises(InvalidExpressionError, match=message):
        resolve(bert, [expression])


def test_catastrophic_regex_runs_in_linear_time():
    tree = ModuleTree.from_model(Toy())
    with pytest.raises(NoMatchError):
        resolve(tree, ["[r](a+)+b"])


def test_compile_selection_examples(bert):
    queries_and_values = resolve(bert, ["query", "value"]).paths
    assert compile_selection(bert, queries_and_values) == ["query", "value"]
    first_three = [f"encoder.layer.{i}.attention.self.query" for i in range(3)]
    assert compile_selection(bert, first_three) == [r"[r]layer\.(0|1|2)\.attention\.self\.query"]
    assert compile_selection(bert, ["pooler.dense"]) == ["pooler.dense"]
    assert compile_selection(bert, []) == []
    with pytest.raises(UnknownPathError, match="'encoder.layer.99'"):
        compile_selection(bert, ["encoder.layer.99"])


@settings(max_examples=300, deadline=None)
@given(st.sets(st.integers(0, 1100), min_size=1, max_size=60), st.integers(0, 1100), st.integers(0, 300))
def test_index_patterns_match_exactly_their_indices(scattered, start, length):
    for indices in (sorted(scattered), list(range(start, start + length + 1))):
        pattern = re.compile(index_pattern(indices))
        assert [i for i in range(1500) if pattern.fullmatch(str(i))] == indices
        assert not any(pattern.fullmatch(f"0{i}") for i in indices)  # never a leading zero


def test_layer_ranges_compile_to_compact_ranges_on_a_405b_shape():
    tree = tree_of("llama-3.1-405b")
    upper_half = [f"model.layers.{i}.self_attn.q_proj" for i in range(63, 126)]
    expressions = _assert_round_trip(tree, set(upper_half))
    assert expressions == [r"[r]layers\.(6[3-9]|[7-9]\d|1[0-1]\d|12[0-5])\.self_attn\.q_proj"]
    assert index_pattern([0, 1, 2, 3, 7, 9]) == "([0-3]|7|9)"
    assert index_pattern([2, 5]) == "(2|5)"


def test_compile_selection_refuses_a_path_that_no_expression_can_isolate():
    from torch import nn

    model = nn.Module()
    model.add_module("proj", nn.Linear(2, 2))
    inner = nn.Module()
    inner.add_module("proj", nn.Linear(2, 2))
    model.add_module("block", inner)
    with pytest.raises(AddressingError, match="cannot be selected without 'block.proj'"):
        compile_selection(model, ["proj"])


# --- properties on real architecture shapes ---------------------------------------------------


def _assert_round_trip(tree: ModuleTree, selection: set[str]) -> list[str]:
    expressions = compile_selection(tree, selection)
    ordered = [p for p in tree.paths if p in selection]
    assert resolve(tree, expressions).paths == ordered, expressions
    return expressions


@pytest.mark.parametrize("shape", SHAPES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_selections_round_trip(shape, data):
    tree = tree_of(shape)
    selection = data.draw(st.sets(st.sampled_from(tree.paths), min_size=1, max_size=40))
    _assert_round_trip(tree, selection)


def _layer_groups(tree: ModuleTree) -> list:
    """Collapsed nodes inside exactly one folded group: one submodule in every layer of a stack."""
    found = []

    def walk(node, groups: int) -> None:
        groups += node.is_group
        if groups == 1 and not node.is_group and len(node.member_paths) > 2:
            found.append(node)
        for child in node.children:
            walk(child, groups)

    walk(tree.collapse().root, 0)
    return found


def _exact_tail_exists(tree: ModuleTree, paths: list[str]) -> bool:
    wanted = {tree.order()[p] for p in paths}
    parts = paths[0].split(".")
    return any(
        set(tree.tails()[".".join(parts[i:])]) == wanted for i in range(len(parts))
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_one_submodule_in_every_layer_compiles_to_one_expression(shape):
    tree = tree_of(shape)
    plain_tails = 0
    for node in _layer_groups(tree):
        expressions = _assert_round_trip(tree, set(node.member_paths))
        assert len(expressions) == 1, (node.path, expressions)
        if _exact_tail_exists(tree, node.member_paths):
            assert not expressions[0].startswith("[r]"), (node.path, expressions)
            plain_tails += 1
    # single-stack models have plain names (q/k/v projections…); T5's encoder and decoder share them
    assert plain_tails >= (0 if shape == "t5-base" else 4)


@pytest.mark.parametrize("shape", SHAPES)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_some_layers_compile_to_one_regex(shape, data):
    tree = tree_of(shape)
    node = data.draw(st.sampled_from(_layer_groups(tree)))
    count = len(node.member_paths)
    contiguous = data.draw(st.booleans())
    if contiguous:
        start = data.draw(st.integers(0, count - 2))
        stop = data.draw(st.integers(start + 1, min(count, start + count - 1)))
        chosen = set(range(start, stop)) if stop - start < count else set(range(start, stop - 1))
    else:
        chosen = data.draw(st.sets(st.integers(0, count - 1), min_size=1, max_size=count - 1))
    selection = {node.member_paths[i] for i in chosen}
    expressions = _assert_round_trip(tree, selection)
    assert len(expressions) == 1 and (expressions[0].startswith("[r]") or len(chosen) == 1)


def test_resolve_each_agrees_with_resolve_and_refuses_what_matches_nothing():
    from engine.addressing import resolve_each

    tree = ModuleTree.from_model(load_backbone("catalog:bert-base-uncased").model)
    expressions = ["query", r"[r]layer\.(0|3)\.attention\.self\.value", r"[r].*dense", "attention.output",
                   r"[r]layer\.1[01]\..*LayerNorm"]
    assert resolve_each(tree, expressions) == [resolve(tree, [e]).paths for e in expressions]
    with pytest.raises(NoMatchError, match="'qeury'"):
        resolve_each(tree, ["query", "qeury"])
    with pytest.raises(NoMatchError, match=r"regex .*nothing.* matches no module"):
        resolve_each(tree, [r"[r]nothing\d"])
