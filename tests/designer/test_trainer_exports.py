"""LLaMA-Factory and axolotl LoRA lines: the same modules, rank, alpha and dropout as the PEFT
export, read back as YAML; what they cannot express is refused by name."""

import pytest
import yaml
from peft import LoraConfig

from designer.app import create_app


@pytest.fixture()
def http(tmp_path):
    app, _ = create_app({"BACKBONE": "catalog:llama-3-8b", "WORKSPACE": str(tmp_path)})
    client = app.test_client()
    client.get("/")
    return client


def _import(http, **delta) -> None:
    document = {"format": "delta-design/1", "deltas": [{"delta_type": "lora", "name": "lora", **delta}]}
    assert http.post("/api/design/import", json=document).status_code == 200


def _export(http, kind: str):
    return http.get(f"/api/design/export?format={kind}")


def test_both_carry_the_peft_exports_modules_and_sizes(http):
    _import(http, modified_modules=["attn.q", "attn.v", "ff.w2"], lora_r=16, lora_alpha=32, lora_dropout=0.1)
    peft = _export(http, "peft").get_json()
    factory = yaml.safe_load(_export(http, "llamafactory").get_data(as_text=True))
    assert factory == {"finetuning_type": "lora", "lora_target": ",".join(peft["target_modules"]),
                       "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.1}
    assert sorted(factory["lora_target"].split(",")) == ["down_proj", "q_proj", "v_proj"]
    axolotl = yaml.safe_load(_export(http, "axolotl").get_data(as_text=True))
    assert axolotl == {"adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.1,
                       "lora_target_modules": peft["target_modules"]}
    response = _export(http, "axolotl")
    assert response.headers["Content-Disposition"] == 'attachment; filename="axolotl_lora.yaml"'


def test_layers_go_to_axolotl_and_are_refused_by_llamafactory(http):
    _import(http, modified_modules=[r"[r]layers\.([0-9]|1[0-5])\.self_attn\.q_proj"])
    axolotl = yaml.safe_load(_export(http, "axolotl").get_data(as_text=True))
    assert axolotl["lora_target_modules"] == ["q_proj"]
    assert axolotl["peft_layers_to_transform"] == list(range(16))
    # the same choice read by PEFT's own config selects the same layers
    config = LoraConfig(r=axolotl["lora_r"], target_modules=axolotl["lora_target_modules"],
                        layers_to_transform=axolotl["peft_layers_to_transform"])
    assert config.layers_to_transform == _export(http, "peft").get_json()["layers_to_transform"]
    refused = _export(http, "llamafactory")
    assert refused.status_code == 400 and refused.get_json()["field"] == "llamafactory"
    assert "picks layers 0-15; LLaMA-Factory's lora_target has no layer choice" in refused.get_json()["error"]


def test_per_module_ranks_and_other_methods_are_refused_by_name(http):
    _import(http, modified_modules=["q_proj"], rank_pattern={"q_proj": 4})
    for kind, tool in (("llamafactory", "LLaMA-Factory"), ("axolotl", "axolotl")):
        refused = _export(http, kind)
        assert refused.status_code == 400
        assert refused.get_json()["error"] == f"{tool} cannot express this design: {tool} has one rank and alpha for every module"
    document = {"format": "delta-design/1", "deltas": [{"delta_type": "adapter", "name": "a", "modified_modules": ["mlp"]}]}
    assert http.post("/api/design/import", json=document).status_code == 200
    assert "PEFT export covers LoRA here" in _export(http, "axolotl").get_json()["error"]
