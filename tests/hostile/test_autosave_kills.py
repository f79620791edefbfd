"""The designer killed while a client saves: the autosave file is only ever replaced by a rename,
so after any of 100 SIGKILLs the session restores — with the last change or the one before."""

from __future__ import annotations

import json
import multiprocessing
import random
from pathlib import Path

from tests.kill_loop import kill_after_a_write

SESSION = "K" * 24
BACKBONE = "python:tests.designer.slow_models:tiny"  # instant to load, so each child saves at once


def _editor(workspace: str, done: multiprocessing.Value) -> None:  # type: ignore[type-arg]
    """Child: the server's session store, applying a client's edits (lora_r = 1, 2, 3, …) for ever."""
    from designer.state import BackboneCache
    from designer.store import SessionStore

    store = SessionStore(Path(workspace), BackboneCache(BACKBONE))
    session = store.get(SESSION)
    if session.loaded is None:
        store.use(session, store.backbones.get(BACKBONE))
    group = session.groups[0].id
    version = done.value
    while True:
        version += 1
        session.set_group(group, hyperparameters={"lora_r": version})  # autosaved on every change
        done.value = version


def test_a_server_killed_100_times_while_saving_always_restores_the_session(tmp_path):
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "designer.store", "designer.state", "tests.designer.slow_models",
                                    __name__])
    done = context.Value("q", 0, lock=False)  # no lock: a child killed while holding one would hang the test
    rng = random.Random(1)
    saved = tmp_path / "sessions" / f"{SESSION}.json"
    interrupted = 0
    for _ in range(100):
        last = kill_after_a_write(context, _editor, (str(tmp_path),), done, rng.uniform(0, 0.03))
        interrupted += any(p.name.startswith(".") for p in saved.parent.iterdir())
        version = json.loads(saved.read_text())["groups"][0]["hyperparameters"]["lora_r"]  # valid JSON
        assert version in (last, last + 1), (version, last)
    assert not list(saved.parent.glob("*.unrestorable-*"))
    print(f"{interrupted} of 100 kills interrupted an autosave")
    assert interrupted > 0  # some kills really landed inside a write

    from designer.state import BackboneCache
    from designer.store import SessionStore

    restored = SessionStore(tmp_path, BackboneCache(BACKBONE)).get(SESSION)  # also cleans temp files
    assert restored.groups[0].hyperparameters["lora_r"] == version
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]
