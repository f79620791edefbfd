"""Browser-test fixtures: a real designer server on a free loopback port, and Debian's Chromium.

The server is the CLI itself (what ``make run`` starts), in a subprocess. Playwright drives the
system Chromium; ``playwright install`` is never needed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: screenshots and traces of failing browser tests: outside the repository (tests never write into it)
ARTIFACTS = Path(os.environ.get("DELTA_TEST_ARTIFACTS", Path(tempfile.gettempdir()) / "delta-designer-test-results"))


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict) -> dict:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get)")
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "args": CHROMIUM_ARGS}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(backbone: str, extra: list[str] | None = None, program: list[str] | None = None,
                 cwd: Path | None = None) -> tuple[subprocess.Popen, str]:
    """Run ``delta-designer serve`` (this checkout's, or ``program``, e.g. an installed
    ``delta-designer``) and wait until /api/health says its backbone is ready."""
    port = free_port()
    command = [*(program or [sys.executable, "-m", "designer.cli"]), "serve", "--port", str(port),
               "--backbone", backbone, *(extra or [])]
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS.joinpath(f"server-{port}.log"), "w")  # noqa: SIM115
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"designer server exited with {process.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(f"{url}/api/health", timeout=2) as response:
                state = json.load(response)["backbone"]["state"]
                if state == "ready":  # it listens at once and loads its backbone meanwhile
                    return process, url
                if state == "failed":
                    raise RuntimeError(f"designer server could not load {backbone}; see {log.name}")
                time.sleep(0.2)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"designer server did not answer within 120 s; see {log.name}")


@pytest.fixture(scope="session")
def live_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The live server's workspace (sessions, saved designs)."""
    return tmp_path_factory.mktemp("workspace")


@pytest.fixture(scope="session")
def live_server(live_workspace: Path) -> Iterator[str]:
    """The designer on the embedded default backbone, as `make run` serves it."""
    ARTIFACTS.mkdir(exist_ok=True)
    process, url = start_server("minilm", ["--workspace", str(live_workspace)])
    yield url
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture()
def designer(page, live_server: str):
    """The page opened on the live server, its tree rendered (a fresh session per test)."""
    page.set_viewport_size({"width": 1280, "height": 720})
    page.goto(live_server)
    page.wait_for_selector("[data-tree][data-ready]")
    page.wait_for_selector("body[data-design-version]")
    return page


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def docs_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the README's screenshots go: ``docs/`` only under ``make docs`` (DELTA_DOCS_DIR),
    a temporary folder otherwise — a test run never writes into the repository."""
    chosen = os.environ.get("DELTA_DOCS_DIR")
    return Path(chosen) if chosen else tmp_path_factory.mktemp("docs")
