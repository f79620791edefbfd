"""Steps 9–11 and the guarantees around them: exports that work the first time, imports that
refuse stale designs, autosave across reloads, isolation, escaping, the README screenshot."""

import json
import subprocess
import sys
from pathlib import Path

from playwright.sync_api import Browser, Page, expect

from tests.designer.evil_models import EVIL_NAME
from tests.e2e.conftest import start_server
from tests.e2e.helpers import expand, group, node, number, tick, wait_update

ROOT = Path(__file__).resolve().parents[2]


def design_lora_qv(page: Page) -> None:
    wait_update(page, lambda: group(page).locator("[data-expressions]").fill("query\nvalue"))
    assert number(page, "[data-total-trainable]") == 73_728


def save_and_compare(page: Page, *designs: tuple[str, str]) -> None:
    """Save a design per (name, expressions) from the open designs panel, then compare the two."""
    for name, expressions in designs:
        wait_update(page, lambda expressions=expressions: group(page).locator("[data-expressions]").fill(expressions))
        page.fill("[data-design-name]", name)
        page.click("[data-design-save]")
        expect(page.locator(f'[data-design-item="{name}"]')).to_be_visible()
    page.select_option("[data-compare-a]", designs[0][0])
    page.select_option("[data-compare-b]", designs[1][0])
    page.click("[data-compare-run]")


def download(page: Page, kind: str, tmp_path: Path) -> Path:
    with page.expect_download() as info:
        page.click(f'[data-export="{kind}"]')
    target = tmp_path / info.value.suggested_filename
    info.value.save_as(target)
    return target


def test_exports_download_and_the_python_script_prints_the_page_counts(designer: Page, tmp_path):
    page = designer
    design_lora_qv(page)
    document = json.loads(download(page, "json", tmp_path).read_text())
    assert document["format"] == "delta-design/1"
    assert document["backbone"] == {"source": "minilm", "class": "BertModel", "parameters": 22_713_216}
    assert document["deltas"][0]["resolved_modules"][:2] == [
        "encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"]
    assert document["totals"]["trainable_parameters"] == 73_728
    script = download(page, "python", tmp_path)
    assert script.name == "delta_design.py"
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "lora_1 (lora): 73,728 trainable parameters" in run.stdout
    assert f"total trainable: {page.locator('[data-total-trainable]').text_content()}" in run.stdout
    peft = json.loads(download(page, "peft", tmp_path).read_text())
    assert peft["peft_type"] == "LORA" and peft["r"] == 8 and peft["target_modules"] == ["query", "value"]
    assert peft["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"  # not "minilm"
    from peft import LoraConfig

    assert LoraConfig(**{k: v for k, v in peft.items() if k != "peft_type"}).r == 8
    wait_update(page, lambda: group(page).locator("[data-method]").select_option("adapter"))
    link = page.locator('[data-export="peft"]')
    expect(link).to_have_attribute("aria-disabled", "true")
    expect(page.locator("[data-export-note]")).to_contain_text("this design uses adapter")


def test_import_ticks_the_tree_and_refuses_designs_that_no_longer_match(designer: Page, browser: Browser, tmp_path):
    page = designer
    design_lora_qv(page)
    exported = download(page, "json", tmp_path)
    other = browser.new_context(viewport={"width": 1280, "height": 720}).new_page()
    other.goto(page.url)
    other.wait_for_selector("body[data-design-version]")
    assert number(other, "[data-total-trainable]") == 0
    wait_update(other, lambda: other.set_input_files('[data-import="file"]', str(exported)))
    assert number(other, "[data-total-trainable]") == 73_728
    expect(node(other, "encoder.layer.*.attention.self.query")).to_have_class("node selected")
    stale = json.loads(exported.read_text())
    stale["deltas"][0]["resolved_modules"].append("encoder.layer.6.attention.self.query")
    other.click("[data-import-panel] summary")
    other.fill('[data-import="text"]', json.dumps(stale))
    other.click('[data-import="apply"]')
    expect(other.locator('[data-error="import"]')).to_contain_text("encoder.layer.6.attention.self.query")
    other.fill('[data-import="text"]', "{not json")
    other.click('[data-import="apply"]')
    expect(other.locator('[data-error="import"]')).to_contain_text("not JSON")
    assert number(other, "[data-total-trainable]") == 73_728  # nothing lost


def test_reload_restores_the_design_and_contexts_are_isolated(designer: Page, browser: Browser):
    page = designer
    design_lora_qv(page)
    layers = node(page, "encoder.layer.*").locator("> .row [data-node-layers]")
    wait_update(page, lambda: (layers.fill("0-3"), layers.press("Enter")))
    page.reload()
    page.wait_for_selector("body[data-design-version]")
    assert number(page, "[data-total-trainable]") == 4 * 2 * 8 * 768
    expect(group(page).locator("[data-expressions]")).to_have_attribute(
        "data-expressions", "[r]layer\\.([0-3])\\.attention\\.self\\.query\n[r]layer\\.([0-3])\\.attention\\.self\\.value")
    expect(node(page, "encoder.layer.*").locator("> .row [data-node-layers]")).to_have_value("0-3")
    stranger = browser.new_context().new_page()
    stranger.goto(page.url)
    stranger.wait_for_selector("body[data-design-version]")
    assert number(stranger, "[data-total-trainable]") == 0
    wait_update(stranger, lambda: group(stranger).locator("[data-expressions]").fill("key"))
    assert number(stranger, "[data-total-trainable]") == 6 * 8 * 768
    page.reload()
    page.wait_for_selector("body[data-design-version]")
    assert number(page, "[data-total-trainable]") == 4 * 2 * 8 * 768


def test_module_names_are_escaped_in_the_page(page: Page, tmp_path):
    process, url = start_server("python:tests.designer.evil_models:evil", ["--workspace", str(tmp_path)])
    try:
        dialogs = []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(url)
        page.wait_for_selector("[data-tree][data-ready]")
        names = page.locator("[data-tree] .node-name").filter(has_text="onerror")
        expect(names).to_have_count(1)
        expect(names).to_have_text(EVIL_NAME)
        expect(page.locator("[data-tree] img")).to_have_count(0)
        page.wait_for_timeout(300)
        assert dialogs == []
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_screenshot_for_the_readme(designer: Page, docs_images: Path):
    page = designer
    expand(page, "encoder.layer.*.attention", "encoder.layer.*.attention.self")
    tick(page, "encoder.layer.*.attention.self.query")
    tick(page, "encoder.layer.*.attention.self.value")
    wait_update(page, lambda: page.click("[data-add-group]"))
    wait_update(page, lambda: group(page, 1).locator("[data-method]").select_option("adapter"))
    wait_update(page, lambda: group(page, 1).locator("[data-expressions]").fill("ff.w2"))
    wait_update(page, lambda: group(page, 0).locator("[data-select-group]").click())
    page.screenshot(path=str(docs_images / "designer.png"))
    assert (docs_images / "designer.png").stat().st_size > 20_000


def test_screenshots_of_the_compare_view_and_the_memory_planner_for_the_readme(designer: Page, docs_images: Path):
    page = designer
    page.set_viewport_size({"width": 1440, "height": 900})
    page.locator("[data-designs-panel] > summary").click()
    save_and_compare(page, ("readme-qv", "attn.q\nattn.v"), ("readme-all", "attn.q\nattn.k\nattn.v\nattn.o"))
    expect(page.locator("[data-compare-result]")).not_to_be_empty()
    expand(page, "encoder.layer.*.attention", "encoder.layer.*.attention.self")
    page.locator("[data-compare-result]").scroll_into_view_if_needed()
    page.screenshot(path=str(docs_images / "designer-compare.png"))
    page.locator("[data-designs-panel] > summary").click()
    page.locator("[data-memory-planner] > summary").click()
    page.fill('[data-plan="sequence"]', "512")
    page.fill('[data-plan="batch"]', "32")
    page.select_option('[data-plan="gpu"]', "24")
    page.locator('[data-plan="batch"]').dispatch_event("change")
    expect(page.locator("[data-memory-planner]")).to_have_attribute("data-plan-state", "ready")
    page.locator("[data-memory-planner]").scroll_into_view_if_needed()
    page.locator("[data-memory-planner]").screenshot(path=str(docs_images / "designer-planner.png"))
    for name in ("designer-compare.png", "designer-planner.png"):
        assert (docs_images / name).stat().st_size > 10_000


def test_saved_designs_are_listed_opened_duplicated_renamed_and_deleted(designer: Page, live_workspace):
    page = designer
    page.click("[data-designs-panel] > summary")
    wait_update(page, lambda: group(page).locator("[data-expressions]").fill("query"))
    page.fill("[data-design-name]", "just-query")
    page.click("[data-design-save]")
    item = page.locator('[data-design-item="just-query"]')
    expect(item).to_have_attribute("data-readable", "true")
    expect(item).to_contain_text("minilm · 1 deltas")
    wait_update(page, lambda: group(page).locator("[data-expressions]").fill("value"))
    wait_update(page, lambda: item.locator("[data-design-open]").click())
    expect(group(page).locator("[data-expressions]")).to_have_attribute("data-expressions", "query")
    page.fill("[data-design-name]", "copy")
    item.locator("[data-design-duplicate]").click()
    expect(page.locator('[data-design-item="copy"]')).to_be_visible()
    page.fill("[data-design-name]", "renamed")
    page.locator('[data-design-item="copy"] [data-design-rename]').click()
    expect(page.locator('[data-design-item="renamed"]')).to_be_visible()
    expect(page.locator('[data-design-item="copy"]')).to_have_count(0)
    page.locator('[data-design-item="renamed"] [data-design-delete]').click()
    expect(page.locator('[data-design-item="renamed"]')).to_have_count(0)
    (live_workspace / "designs" / "broken.json").write_text("{not json")
    page.fill("[data-design-name]", "just-query")
    page.click("[data-design-save]")  # exists: an error at the panel, the list still there
    expect(page.locator('[data-error="designs"]')).to_contain_text("exists")
    page.click("[data-designs-panel] > summary")
    page.click("[data-designs-panel] > summary")  # reopening lists again, the broken file included
    expect(page.locator('[data-design-item="broken"]')).to_have_attribute("data-readable", "false")
    expect(page.locator('[data-design-item="broken"]')).to_contain_text("unreadable")
    page.locator('[data-design-item="broken"] [data-design-delete]').click()
    expect(page.locator('[data-design-item="broken"]')).to_have_count(0)
    page.locator('[data-design-item="just-query"] [data-design-delete]').click()


def test_two_saved_designs_compare_with_marks_on_the_tree(designer: Page):
    page = designer
    page.click("[data-designs-panel] > summary")
    save_and_compare(page, ("cmp-q", "query"), ("cmp-qv", "query\nvalue"))
    result = page.locator("[data-compare-result]")
    expect(result.locator('[data-compare-total="a"]')).to_have_text("36,864")
    expect(result.locator('[data-compare-total="b"]')).to_have_text("73,728")
    expect(result.locator("[data-compare-only-b]")).to_have_attribute("data-compare-only-b", "6")
    expect(result.locator("[data-compare-both]")).to_have_attribute("data-compare-both", "6")
    expect(node(page, "encoder.layer.*.attention.self.value")).to_have_attribute("data-compare", "only-b")
    expect(node(page, "encoder.layer.*.attention.self.query")).to_have_attribute("data-compare", "both")
    page.click("[data-compare-clear]")
    expect(page.locator("[data-tree] [data-compare]")).to_have_count(0)
    for name in ("cmp-q", "cmp-qv"):
        page.locator(f'[data-design-item="{name}"] [data-design-delete]').click()
        expect(page.locator(f'[data-design-item="{name}"]')).to_have_count(0)
