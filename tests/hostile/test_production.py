"""`delta-designer serve --host 0.0.0.0` runs on gunicorn; the token is needed on every route and
the socket handshake, exchanged for a cookie once and never logged; foreign origins are refused."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import requests
import socketio

from tests.e2e.conftest import free_port


@pytest.fixture(scope="module")
def public_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, subprocess.Popen]]:
    port = free_port()
    log = tmp_path_factory.mktemp("log") / "server.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "designer.cli", "serve", "--host", "0.0.0.0", "--port", str(port),
         "--backbone", "catalog:gpt2", "--workspace", str(tmp_path_factory.mktemp("workspace"))],
        stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    url, deadline, token = f"http://127.0.0.1:{port}", time.monotonic() + 90, None
    while time.monotonic() < deadline:
        found = re.search(r"\?token=([\w-]+)", log.read_text())
        if found:
            token = found.group(1)
            try:
                health = requests.get(url + "/api/health", headers={"X-Delta-Designer-Token": token}, timeout=2)
                if health.json()["backbone"]["state"] == "ready":
                    break
            except (requests.ConnectionError, ValueError):
                pass
        time.sleep(0.2)
    assert token, log.read_text()
    yield url, token, process
    process.terminate()
    process.wait(timeout=10)
    text = log.read_text()
    assert text.count(token) == 1, "the token reached the log beyond the one line that prints it"


def test_it_runs_on_gunicorn_and_every_route_needs_the_token(public_server):
    url, token, _ = public_server
    for path in ("/", "/api/health", "/api/tree", "/static/designer.css"):
        assert requests.get(url + path, timeout=5).status_code == 403, path
    answer = requests.get(url + "/api/health", headers={"X-Delta-Designer-Token": token}, timeout=5)
    assert answer.status_code == 200 and answer.headers["Server"].startswith("gunicorn")


def test_the_token_is_exchanged_for_a_cookie_and_opens_the_socket(public_server):
    url, token, _ = public_server
    browser = requests.Session()
    page = browser.get(f"{url}/?token={token}", timeout=10)
    assert page.status_code == 200 and page.url == url + "/"  # redirected: the token left the URL
    received: list[str] = []
    client = socketio.Client(http_session=browser)
    client.on("design_updated", lambda data: received.append("design"))
    client.connect(url, transports=["websocket"], wait_timeout=10)
    deadline = time.monotonic() + 10
    while not received and time.monotonic() < deadline:
        time.sleep(0.05)
    client.disconnect()
    assert received


@pytest.mark.parametrize("case", ["no token", "foreign origin"])
def test_sockets_without_the_token_or_from_a_foreign_origin_are_refused(public_server, case):
    url, token, _ = public_server
    browser = requests.Session()
    headers = {}
    if case == "foreign origin":
        browser.get(f"{url}/?token={token}", timeout=10)
        headers = {"Origin": "http://attacker.example"}
    client = socketio.Client(http_session=browser)
    with pytest.raises(socketio.exceptions.ConnectionError):
        client.connect(url, transports=["websocket"], headers=headers, wait_timeout=5)
