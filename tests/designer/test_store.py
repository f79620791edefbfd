"""Autosaves survive a killed server: the file is only ever replaced by a rename, and the
temporary files a kill leaves behind are removed when the server starts again."""

from __future__ import annotations

import json

from designer.app import create_app


def test_temporary_files_of_interrupted_autosaves_are_removed_on_start(tmp_path):
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    kept = sessions / ("A" * 24 + ".json")
    kept.write_text(json.dumps({"backbone": "catalog:gpt2", "groups": []}))
    leftovers = [sessions / f".{'A' * 24}.json.k3j9x2", sessions / f".{'B' * 24}.json.0q1w2e"]
    for leftover in leftovers:
        leftover.write_text('{"half": ')
    unrelated = sessions / "notes.txt"
    unrelated.write_text("mine")
    create_app({"BACKBONE": "catalog:gpt2", "WORKSPACE": str(tmp_path)})
    assert not any(leftover.exists() for leftover in leftovers)
    assert kept.exists() and unrelated.read_text() == "mine"
