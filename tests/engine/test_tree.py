import io

import pytest
from rich.console import Console
from torch import nn

from engine import (
    ModuleTree,
    Visualization,
    format_indices,
    load_backbone,
    parse_indices,
)
from tests.engine.toy_models import Toy


def render(model) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=100, color_system=None)
    Visualization(model).structure_graph(console=console)
    return buffer.getvalue()


def test_identical_layers_fold_into_one_group_with_exact_text():
    assert render(Toy()) == (
        "root (Toy) 128\n"
        "├── embed (Embedding) weight[10,4] 40\n"
        "├── layers (ModuleList) 80\n"
        "│   └── 0-3 ×4 (Block) 20 each\n"
        "│       ├── proj (Linear) weight[4,4] bias[4] 20\n"
        "│       └── act (ReLU)\n"
        "└── head (Linear) weight[2,4] 8\n"
    )


def test_a_layer_that_differs_is_not_folded_and_frozen_counts_show():
    model = Toy()
    model.layers[2].proj = nn.Linear(4, 6)
    model.layers[1].proj.weight.requires_grad_(False)
    assert render(model) == (
        "root (Toy) 138 (122 trainable)\n"
        "├── embed (Embedding) weight[10,4] 40\n"
        "├── layers (ModuleList) 90 (74 trainable)\n"
        "│   ├── 0,3 ×2 (Block) 20 each\n"
        "│   │   ├── proj (Linear) weight[4,4] bias[4] 20\n"
        "│   │   └── act (ReLU)\n"
        "│   ├── 1 (Block) 20 (4 trainable)\n"
        "│   │   ├── proj (Linear) weight[4,4] bias[4] 20 (4 trainable)\n"
        "│   │   └── act (ReLU)\n"
        "│   └── 2 (Block) 30\n"
        "│       ├── proj (Linear) weight[6,4] bias[6] 30\n"
        "│       └── act (ReLU)\n"
        "└── head (Linear) weight[2,4] 8\n"
    )


class Delta(nn.Module):
    """A one-Linear delta module, as the engine marks them."""

    is_delta_module = True

    def __init__(self):
        super().__init__()
        self.down = nn.Linear(4, 1, bias=False)


def test_delta_modules_are_marked_and_never_folded_with_plain_layers():
    model = Toy()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.layers[3].proj.add_module("lora", Delta())
    text = render(model)
    assert "│   ├── 0-2 ×3 (Block) 20 each frozen\n" in text
    assert "│   └── 3 (Block) 24 (4 trainable)\n" in text
    assert "│       ├── proj (Linear) weight[4,4] bias[4] 24 (4 trainable)\n" in text
    assert "│       │   └── lora (Delta) 4 delta\n" in text
    assert "│       │       └── down (Linear) weight[1,4] 4 delta\n" in text
    tree = ModuleTree.from_model(model)
    assert tree.root.delta_parameters == 4
    assert tree.node("layers.3.proj.lora.down").parameters[0].is_delta


def test_tree_records_parameters_paths_and_totals():
    tree = ModuleTree.from_model(Toy())
    assert tree.paths[:4] == ["embed", "layers", "layers.0", "layers.0.proj"]
    proj = tree.node("layers.1.proj")
    assert [(p.name, p.shape, p.numel, p.trainable) for p in proj.parameters] == [
        ("weight", (4, 4), 16, True),
        ("bias", (4,), 4, True),
    ]
    assert proj.parameters[0].dtype == "float32"
    assert tree.total_parameters == 128
    assert tree.node("layers.0.act").parameters == []  # parameter-free modules stay


def test_collapsed_group_paths_members_and_dict():
    collapsed = ModuleTree.from_model(Toy()).collapse()
    group = collapsed.node("layers.*")
    assert group.members == [0, 1, 2, 3] and group.label == "0-3 ×4"
    assert collapsed.node("layers.*.proj").member_paths == [f"layers.{i}.proj" for i in range(4)]
    as_dict = collapsed.to_dict()
    assert as_dict["total_parameters"] == 128 and as_dict["module_count"] == 15
    layers = as_dict["root"]["children"][1]
    assert layers["children"][0]["path"] == "layers.*"
    assert layers["children"][0]["count"] == 4
    assert layers["children"][0]["children"][0]["parameters"][0]["shape"] == [4, 4]


def test_partial_group_uses_range_segment_in_its_path():
    model = Toy(layers=9)
    model.layers[6].proj = nn.Linear(4, 5)
    model.layers[7].proj = nn.Linear(4, 5)
    collapsed = ModuleTree.from_model(model).collapse()
    labels = [c.label for c in collapsed.node("layers").children]
    assert labels == ["0-5,8 ×7", "6-7 ×2"]
    assert collapsed.node("layers.0-5,8.proj").member_paths[-1] == "layers.8.proj"


def test_tied_parameters_are_counted_once_at_their_first_owner():
    tree = ModuleTree.from_model(load_backbone("catalog:gpt2").model)
    head = tree.node("lm_head").parameters[0]
    assert head.tied_to == "transformer.wte.weight" and head.counted == 0
    assert tree.total_parameters == 124_439_808


def test_llama_405b_collapses_to_one_layer_group():
    collapsed = ModuleTree.from_model(load_backbone("catalog:llama-3.1-405b").model).collapse()
    group = collapsed.node("model.layers.*")
    assert group.label == "0-125 ×126"
    assert collapsed.total_parameters == 405_853_388_800
    assert len(collapsed.nodes) == 20


@pytest.mark.parametrize(
    "indices, text",
    [([0, 1, 2, 3, 4, 5, 8], "0-5,8"), ([3], "3"), ([1, 2], "1-2"), ([0, 2, 4], "0,2,4")],
)
def test_index_ranges_round_trip(indices, text):
    assert format_indices(indices) == text
    assert parse_indices(text) == indices


@pytest.mark.parametrize("bad", ["", "a-3", "5-2", "1-", ","])
def test_bad_index_ranges_are_rejected(bad):
    with pytest.raises(ValueError):
        parse_indices(bad)


def test_a_huge_layer_range_is_refused_before_it_is_expanded():
    import time

    from engine import parse_indices

    start = time.perf_counter()
    with pytest.raises(ValueError, match="layers 0-999999999999 are not in 0-11"):
        parse_indices("0-999999999999", limit=12)
    assert time.perf_counter() - start < 0.05
    assert parse_indices("0-2,11", limit=12) == [0, 1, 2, 11]


def test_t5_block_0_folds_with_the_rest_and_its_extra_module_stays_selectable():
    from engine import load_backbone, resolve

    model = load_backbone("catalog:t5-base").model
    tree = ModuleTree.from_model(model)
    collapsed = tree.collapse()
    encoder = collapsed.nodes["encoder.block.*"]
    assert encoder.label == "0-11 ×12" and encoder.member_paths == [f"encoder.block.{i}" for i in range(12)]
    assert "block 0 also holds modules the others lack" in encoder.note
    assert encoder.total_parameters == tree.nodes["encoder.block.1"].total_parameters  # counts of the common block
    bias = collapsed.nodes["encoder.block.*.layer.0.SelfAttention.relative_attention_bias"]
    assert bias.member_paths == ["encoder.block.0.layer.0.SelfAttention.relative_attention_bias"]
    assert bias.note.startswith("only in 1 of 12 members")
    query = collapsed.nodes["encoder.block.*.layer.0.SelfAttention.q"]
    assert query.member_paths == [f"encoder.block.{i}.layer.0.SelfAttention.q" for i in range(12)]
    assert query.to_dict()["note"] == "" and encoder.to_dict()["note"] == encoder.note
    # every real module is still in exactly one node of the collapsed tree
    covered = [p for node in collapsed.root.walk() if node.path for p in node.member_paths]
    assert sorted(covered) == sorted(tree.paths)
    assert resolve(tree, ["relative_attention_bias"]).paths == [
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias"]


def test_an_extra_module_unfrozen_unlike_its_layer_keeps_that_layer_apart():
    from engine import load_backbone

    model = load_backbone("catalog:t5-base").model
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    assert "encoder.block.*" in ModuleTree.from_model(model).collapse().nodes  # all frozen: folds
    model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.requires_grad_(True)
    nodes = ModuleTree.from_model(model).collapse().nodes
    assert "encoder.block.0" in nodes and "encoder.block.1-11" in nodes


def test_a_frozen_delta_still_keeps_its_layer_apart():
    model = Toy()
    model.layers[3].proj.add_module("lora", Delta())
    for parameter in model.parameters():
        parameter.requires_grad_(False)  # a delta loaded for inference: frozen like the rest
    nodes = ModuleTree.from_model(model).collapse().nodes
    assert "layers.0-2" in nodes and "layers.3" in nodes and "layers.*" not in nodes
