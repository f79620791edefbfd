"""Sharing a design: copy buttons (what they copy equals the export), a link that opens the same
design in a fresh browser, and a design made for another backbone offered a switch, not applied
to the wrong model."""

import json

import yaml
from playwright.sync_api import Browser, Page, expect

from tests.e2e.helpers import group, number, wait_update


def design_qv(page: Page) -> None:
    wait_update(page, lambda: group(page).locator("[data-expressions]").fill("attn.q\nattn.v"))
    assert number(page, "[data-total-trainable]") == 73_728


def copy(page: Page, kind: str) -> str:
    """Click a copy button; the clipboard and the shown text must agree."""
    page.click(f'[data-copy="{kind}"]')
    expect(page.locator("[data-copied]")).to_have_attribute("data-copied", kind)
    expect(page.locator("[data-copy-status]")).to_contain_text("copied")
    shown = page.locator("[data-copied]").text_content()
    assert page.evaluate("navigator.clipboard.readText()") == shown
    return shown


def test_copy_buttons_copy_what_the_exports_hold(designer: Page, live_server: str):
    page = designer
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_server)
    design_qv(page)
    assert copy(page, "expressions") == "attn.q\nattn.v\n"  # as typed
    peft = json.loads(copy(page, "peft"))
    assert peft["target_modules"] == ["query", "value"] and peft["r"] == 8
    assert "delta-design/1" in copy(page, "python")
    assert yaml.safe_load(copy(page, "llamafactory"))["lora_target"] == "query,value"
    assert yaml.safe_load(copy(page, "axolotl"))["lora_target_modules"] == ["query", "value"]
    # what cannot be expressed is said at the buttons, and nothing stale stays shown
    wait_update(page, lambda: page.click("[data-add-group]"))
    wait_update(page, lambda: group(page, 1).locator("[data-expressions]").fill("attn.k"))
    page.click('[data-copy="axolotl"]')
    expect(page.locator('[data-error="copy"]')).to_contain_text("PEFT holds one adapter per config")
    expect(page.locator("[data-copied]")).to_be_hidden()


def test_a_link_opens_the_same_design_in_a_fresh_browser(designer: Page, browser: Browser, live_server: str):
    page = designer
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_server)
    design_qv(page)
    link = copy(page, "link")
    assert link.startswith(live_server + "/#design=")
    other = browser.new_context()  # another person: no cookie, no session
    try:
        opened = other.new_page()
        opened.goto(link)
        expect(group(opened).locator("[data-expressions]")).to_have_attribute("data-expressions", "attn.q\nattn.v")
        expect(opened.locator("[data-total-trainable]")).to_have_text("73,728")
        assert "#design=" not in opened.url  # imported once: a reload keeps later edits
    finally:
        other.close()


def test_a_design_for_another_backbone_offers_a_switch(designer: Page):
    page = designer
    design_qv(page)
    document = {"format": "delta-design/1", "backbone": {"source": "catalog:bert-base-uncased"},
                "deltas": [{"delta_type": "lora", "name": "lora", "modified_modules": ["attn.q"]}]}
    page.locator("[data-import-panel] > summary").click()
    page.fill('[data-import="text"]', json.dumps(document))
    page.click('[data-import="apply"]')
    offer = page.locator("[data-switch-offer]")
    expect(offer).to_be_visible()
    expect(offer).to_have_attribute("data-switch-source", "catalog:bert-base-uncased")
    expect(page.locator("[data-switch-text]")).to_contain_text("made for catalog:bert-base-uncased")
    assert number(page, "[data-total-trainable]") == 73_728  # nothing applied yet
    page.click("[data-switch-cancel]")
    expect(page.locator('[data-error="import"]')).to_contain_text("not imported")
    page.click('[data-import="apply"]')
    page.click("[data-switch-accept]")
    expect(page.locator("[data-tree]")).to_have_attribute("data-ready", "catalog:bert-base-uncased")
    expect(group(page).locator("[data-expressions]")).to_have_attribute("data-expressions", "attn.q")
    expect(page.locator("[data-total-trainable]")).to_have_text("147,456")
    # switching back restores the design kept for MiniLM
    page.select_option("[data-backbone-kind]", "default")
    page.click("[data-backbone-load]")
    expect(page.locator("[data-tree]")).to_have_attribute("data-ready", "minilm")
    expect(page.locator("[data-total-trainable]")).to_have_text("73,728")
