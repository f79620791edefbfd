"""The wheel `make dist` builds holds everything the page needs: installed into a fresh virtualenv
outside the repository, its `delta-designer` serves a page that works in Chromium (templates,
ES modules, the socket.io client copied from node_modules at build time)."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.e2e.conftest import start_server
from tests.e2e.helpers import group, number, wait_update

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``make dist``, then the wheel alone (no dependencies) in a fresh virtualenv whose other
    packages (torch, transformers, flask …) come from this environment's site-packages — a plain
    path, so this checkout's editable install is not visible there."""
    built = tmp_path_factory.mktemp("dist")  # never into the checkout
    subprocess.run(["make", "dist", f"DIST_DIR={built}"], cwd=ROOT, check=True, capture_output=True, timeout=600)
    wheels = sorted(built.glob("delta_designer-*.whl"))
    assert len(wheels) == 1, wheels
    outside = tmp_path_factory.mktemp("outside")
    venv = outside / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with zipfile.ZipFile(wheels[0]) as wheel:  # a wheel is a zip: installing it is unpacking it
        wheel.extractall(purelib)
    Path(purelib, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (venv / "bin" / "delta-designer").write_text(
        f"#!{python}\nimport sys\nfrom designer.cli import main\nsys.exit(main())\n")
    (venv / "bin" / "delta-designer").chmod(0o755)
    yield venv


def test_the_wheel_holds_the_page_and_not_the_checkout(installed: Path):
    python = installed / "bin" / "python"
    where = subprocess.run([str(python), "-c", "import designer, engine.interop.peft, engine.methods.lora; "
                            "from designer.resources import resource_dir, socketio_client_dir; "
                            "print(designer.__file__, resource_dir('static'), socketio_client_dir())"],
                           capture_output=True, text=True, check=True, cwd=installed.parent).stdout
    assert str(ROOT) not in where and str(installed) in where, where
    assert "static/vendor/socket.io" in where  # the client travels in the wheel, not node_modules
    assert not (ROOT / "static" / "vendor").exists()  # copied at build time, never left in the tree


def test_the_installed_designer_serves_a_working_page(installed: Path, page: Page, tmp_path: Path):
    process, url = start_server("catalog:gpt2", ["--workspace", str(tmp_path / "workspace")],
                                program=[str(installed / "bin" / "delta-designer")], cwd=installed.parent)
    try:
        page.goto(url)
        expect(page.locator("[data-tree]")).to_have_attribute("data-ready", "catalog:gpt2")
        panel = group(page)
        wait_update(page, lambda: panel.locator("[data-expressions]").fill("c_attn"))
        assert number(page, "[data-total-trainable]") == 12 * 8 * (768 + 3 * 768)  # LoRA r=8 on c_attn
    finally:
        process.terminate()
        process.wait(timeout=30)
