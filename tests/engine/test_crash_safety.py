"""A checkpoint is replaced as one unit: killed at any moment, a save leaves the previous or the
new version, never new weights with an old config (and no temporary files once read again)."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
from pathlib import Path

import pytest
import torch

import engine
from engine import checkpoint
from engine.errors import CheckpointError
from tests.engine.tiny import tiny_model
from tests.kill_loop import kill_after_a_write


def _save_version(delta: engine.LoraModel, directory: Path, version: int) -> None:
    """Every tensor and lora_alpha carry ``version``, so a mix of two saves is visible."""
    with torch.no_grad():
        for parameter in delta.parameters():
            parameter.fill_(float(version))
    delta.config.lora_alpha = float(version)
    delta.save_finetuned(directory)


def _saver(directory: str, done: multiprocessing.Value) -> None:  # type: ignore[type-arg]
    """Child process: save versions 1, 2, 3, … for ever; ``done`` holds the last completed."""
    torch.set_num_threads(1)
    delta = engine.LoraModel(tiny_model("bert"), lora_r=2).freeze_module()
    version = done.value
    while True:
        version += 1
        _save_version(delta, Path(directory), version)
        done.value = version


def _versions(directory: Path) -> tuple[int, int]:
    config, tensors = checkpoint.read_checkpoint(directory)
    values = {float(t.flatten()[0]) for t in tensors.values()}
    assert len(values) == 1, values
    return int(config["lora_alpha"]), int(values.pop())


def test_save_finetuned_killed_100_times_always_leaves_a_loadable_version(tmp_path):
    # children fork from a clean, single-threaded server that has imported torch once: cheap to
    # start, and safe (forking this multi-threaded test process could deadlock the child)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "engine", "engine.methods.lora", __name__])
    directory = tmp_path / "delta"
    done = context.Value("q", 0, lock=False)  # no lock: a child killed while holding one would hang the test
    rng = random.Random(0)
    interrupted = 0
    for _ in range(100):
        last = kill_after_a_write(context, _saver, (str(directory),), done, rng.uniform(0, 0.02))
        interrupted += any(p.name.startswith(".") for p in directory.iterdir())
        config_version, weights_version = _versions(directory)  # finishes or discards the write
        assert config_version == weights_version, (config_version, weights_version)
        assert weights_version in (last, last + 1)
        assert not any(p.name.startswith(".") for p in directory.iterdir())
    fresh = tiny_model("bert")
    loaded = engine.LoraModel.from_finetuned(directory, fresh)
    assert loaded.config.lora_alpha == float(_versions(directory)[0])
    print(f"{interrupted} of 100 kills interrupted a save")
    assert interrupted > 0  # some kills really landed inside a save


def _crash_during(monkeypatch: pytest.MonkeyPatch, stage: str) -> None:
    """Make the next save stop at ``stage`` as a killed process would."""
    if stage == "before the commit marker":
        original = checkpoint.atomic_write_bytes

        def stop(path: Path, data: bytes) -> None:
            if path.name == checkpoint.COMMIT_FILE:
                raise KeyboardInterrupt("killed")
            original(path, data)

        monkeypatch.setattr(checkpoint, "atomic_write_bytes", stop)
    else:
        replace = os.replace
        calls = []

        def stop_after_first(source: str, target: str) -> None:
            calls.append(target)
            if len(calls) == 2:
                raise KeyboardInterrupt("killed")
            replace(source, target)

        monkeypatch.setattr(checkpoint.os, "replace", stop_after_first)


@pytest.mark.parametrize("stage, expected", [("before the commit marker", 1), ("between the two renames", 2)])
def test_a_save_stopped_at_each_stage_reads_as_one_whole_version(tmp_path, monkeypatch, stage, expected):
    delta = engine.LoraModel(tiny_model("bert"), lora_r=2).freeze_module()
    _save_version(delta, tmp_path, 1)
    with monkeypatch.context() as patch:
        _crash_during(patch, stage)
        with pytest.raises(KeyboardInterrupt):
            _save_version(delta, tmp_path, 2)
    assert _versions(tmp_path) == (expected, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "delta.safetensors"]


def test_an_interrupted_save_in_a_read_only_directory_is_a_clear_error(tmp_path, monkeypatch):
    delta = engine.LoraModel(tiny_model("bert"), lora_r=2).freeze_module()
    _save_version(delta, tmp_path, 1)
    (tmp_path / checkpoint.COMMIT_FILE).write_text(json.dumps(["config.json"]))
    (tmp_path / ".config.json.staged").write_text("{}")
    monkeypatch.setattr(checkpoint.os, "replace", lambda *a: (_ for _ in ()).throw(PermissionError("read-only")))
    with pytest.raises(CheckpointError, match="interrupted save that could not be finished"):
        checkpoint.read_checkpoint(tmp_path)


def test_an_exported_peft_adapter_is_written_as_one_unit_too(tmp_path):
    delta = engine.LoraModel(tiny_model("bert"), lora_r=2).freeze_module()
    engine.export_peft(delta, tmp_path / "adapter", "bert-base-uncased")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
