"""The server listens before its backbone is built: the page shows the load, then the designer."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

from designer.app import create_app
from tests.designer import slow_models
from tests.e2e.conftest import free_port

SLOW = "python:tests.designer.slow_models:waits_for_release"


def test_the_page_waits_with_progress_while_the_backbone_loads_then_opens_the_designer(tmp_path):
    slow_models.RELEASE.clear()
    app, _ = create_app({"BACKBONE": SLOW, "WORKSPACE": str(tmp_path)})
    client = app.test_client()
    loader = app.extensions["delta_designer"].backbones.preload(SLOW)
    page = client.get("/")
    html = page.get_data(as_text=True)
    assert page.status_code == 503 and page.headers["Retry-After"] == "1"
    assert f'data-backbone-loading="{SLOW}"' in html and "data-loading-progress" in html
    assert '<meta http-equiv="refresh" content="1">' in html
    assert client.get("/api/health").get_json()["backbone"] == {
        "source": SLOW, "state": "loading", "done": 0, "total": 1}
    slow_models.RELEASE.set()
    loader.join(timeout=30)
    page = client.get("/")
    assert page.status_code == 200 and "data-backbone-summary" in page.get_data(as_text=True)
    assert client.get("/api/health").get_json()["backbone"]["state"] == "ready"


def test_a_backbone_that_fails_to_load_shows_its_error_and_the_server_keeps_answering(tmp_path):
    source = "python:tests.designer.slow_models:fails"
    app, _ = create_app({"BACKBONE": source, "WORKSPACE": str(tmp_path)})
    client = app.test_client()
    app.extensions["delta_designer"].backbones.preload(source).join(timeout=30)
    page = client.get("/")
    assert page.status_code == 500
    assert "the checkpoint on disk is truncated" in page.get_data(as_text=True)
    assert client.get("/api/health").get_json()["backbone"]["state"] == "failed"


def test_serve_answers_before_the_backbone_is_built():
    """`delta-designer serve` on a real process: /api/health answers while loading."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from designer.cli import main; sys.exit(main())",
         "serve", "--port", str(port), "--backbone", SLOW],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, states = time.monotonic() + 60, []
        while time.monotonic() < deadline and not states:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as response:
                    states.append(response.read().decode())
            except OSError:
                time.sleep(0.1)
        assert states and '"state":"loading"' in states[0].replace(" ", "")  # never released here
    finally:
        process.kill()
        process.wait(timeout=10)
