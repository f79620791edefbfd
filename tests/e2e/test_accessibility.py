"""axe-core (from npm) inside the real page, in every state a person reaches: no violation of
WCAG 2.1 A/AA or axe's best practices. And the whole design task done with the keyboard only,
focus always visible and never dropped to <body>."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.e2e.helpers import expand, group, node, wait_update

AXE = Path(__file__).resolve().parents[2] / "node_modules" / "axe-core" / "axe.min.js"
RULES = {"runOnly": {"type": "tag", "values": ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"]}}


@pytest.fixture()
def page_with_axe(browser: Browser, live_server: str):
    """The designer in a context that may inject axe (the page's own CSP forbids any other script)."""
    context = browser.new_context(bypass_csp=True, viewport={"width": 1440, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_server)
    page = context.new_page()
    page.goto(live_server)
    page.wait_for_selector("[data-tree][data-ready]")
    page.wait_for_selector("body[data-design-version]")
    yield page
    context.close()


def violations(page: Page) -> list[str]:
    if not page.evaluate("typeof axe !== 'undefined'"):
        page.add_script_tag(path=str(AXE))
    found = page.evaluate(f"axe.run(document, {json.dumps(RULES)})")["violations"]
    return [f"{v['id']}: {v['help']} at {[n['target'] for n in v['nodes'][:3]]}" for v in found]


def test_every_page_state_has_no_axe_violation(page_with_axe: Page):
    page = page_with_axe
    states: dict[str, list[str]] = {"empty": violations(page)}
    expand(page, "encoder", "encoder.layer", "encoder.layer.*", "encoder.layer.*.attention",
           "encoder.layer.*.attention.self")
    states["tree expanded"] = violations(page)
    wait_update(page, lambda: group(page).locator("[data-expressions]").fill("attn.q\nattn.v"))
    wait_update(page, lambda: page.click("[data-add-group]"))
    wait_update(page, lambda: group(page, 1).locator("[data-method]").select_option("adapter"))
    wait_update(page, lambda: group(page, 1).locator("[data-expressions]").fill("ff.w2"))
    page.fill("[data-tree-search]", "attn.q")
    expect(node(page, "encoder.layer.*.attention.self.value")).to_be_hidden()
    states["groups, diagram, filter"] = violations(page)
    page.fill("[data-tree-search]", "")
    page.click("[data-build]")
    expect(page.locator("[data-built]")).to_be_visible()
    states["built"] = violations(page)
    page.locator("[data-designs-panel] > summary").click()
    for name in ("a11y-a", "a11y-b"):
        page.fill("[data-design-name]", name)
        page.click("[data-design-save]")
        expect(page.locator(f'[data-design-item="{name}"]')).to_be_visible()
        wait_update(page, lambda: group(page).locator("[data-expressions]").fill("attn.q"))
    page.select_option("[data-compare-a]", "a11y-a")
    page.select_option("[data-compare-b]", "a11y-b")
    page.click("[data-compare-run]")
    expect(page.locator("[data-compare-result]")).not_to_be_empty()
    states["compare"] = violations(page)
    page.locator("[data-import-panel] > summary").click()
    page.fill('[data-import="text"]', "{not json")
    page.click('[data-import="apply"]')
    expect(page.locator('[data-error="import"]')).to_contain_text("not JSON")
    states["import error"] = violations(page)
    page.fill('[data-import="text"]', json.dumps({"format": "delta-design/1", "backbone": {"source": "catalog:gpt2"},
                                                "deltas": []}))
    page.click('[data-import="apply"]')
    expect(page.locator("[data-switch-offer]")).to_be_visible()
    states["switch offer"] = violations(page)
    page.click("[data-switch-cancel]")
    page.locator("[data-memory-planner] > summary").click()
    page.fill('[data-plan="sequence"]', "512")
    page.locator('[data-plan="sequence"]').dispatch_event("change")
    expect(page.locator("[data-memory-planner]")).to_have_attribute("data-plan-state", "ready")
    page.click('[data-copy="expressions"]')
    expect(page.locator("[data-copied]")).to_be_visible()
    page.click('[data-copy="axolotl"]')  # two groups: refused, the reason shown
    expect(page.locator('[data-error="copy"]')).to_contain_text("PEFT holds one adapter")
    states["planner and share"] = violations(page)
    failing = {state: found for state, found in states.items() if found}
    assert not failing, json.dumps(failing, indent=1)


def test_the_whole_design_task_by_keyboard_alone(page_with_axe: Page):
    """Reach the tree, open the layers, tick q and v, narrow the layers, change the rank, add an
    adapter group, export — Tab, arrows, Space and Enter only; focus is never lost."""
    page = page_with_axe
    focused = lambda: page.evaluate("document.activeElement === document.body ? 'BODY' : document.activeElement.outerHTML.slice(0, 80)")  # noqa: E731

    def press(key: str, times: int = 1) -> None:
        for _ in range(times):
            page.keyboard.press(key)
            assert focused() != "BODY", f"focus dropped to <body> after {key}"

    def tab_to(selector: str, key: str = "Tab", limit: int = 80) -> None:
        for _ in range(limit):
            if page.evaluate(f"document.activeElement.matches({json.dumps(selector)})"):
                return
            press(key)
        raise AssertionError(f"Tab never reached {selector}")

    tab_to("[data-tree] .row[tabindex='0']")
    # the visible focus ring: an outline or a box shadow
    assert page.evaluate("(() => { const s = getComputedStyle(document.activeElement);"
                         " return s.outlineStyle !== 'none' || s.boxShadow !== 'none'; })()")
    for path in ("encoder", "encoder.layer", "encoder.layer.*", "encoder.layer.*.attention", "encoder.layer.*.attention.self"):
        while page.evaluate("document.activeElement.parentElement.dataset.nodePath") != path:
            press("ArrowDown")
        if node(page, path).get_attribute("aria-expanded") == "false":
            press("ArrowRight")
        expect(node(page, path)).to_have_attribute("aria-expanded", "true")
    for leaf in ("encoder.layer.*.attention.self.query", "encoder.layer.*.attention.self.value"):
        while page.evaluate("document.activeElement.parentElement.dataset.nodePath") != leaf:
            press("ArrowDown")
        wait_update(page, lambda: press("Space"))
    expect(page.locator("[data-total-trainable]")).to_have_text("73,728")
    expect(node(page, "encoder.layer.*.attention.self.query")).to_have_attribute("aria-checked", "true")
    expect(node(page, "encoder.layer.*.attention.self.key")).to_have_attribute("aria-checked", "false")
    expect(node(page, "encoder.layer.*.attention.self")).to_have_attribute("aria-checked", "mixed")
    tab_to("[data-node-layers]", "Shift+Tab")  # the folded group's layer box, above the leaves
    page.keyboard.press("Control+a")
    page.keyboard.type("0-2")
    wait_update(page, lambda: press("Enter"))
    expect(page.locator("[data-total-trainable]")).to_have_text("36,864")
    tab_to('[data-group-id] [data-hyper="lora_r"]')
    page.keyboard.press("Control+a")
    page.keyboard.type("16")
    wait_update(page, lambda: press("Tab"))
    expect(page.locator("[data-total-trainable]")).to_have_text("73,728")
    tab_to("[data-add-group]")
    wait_update(page, lambda: press("Enter"))
    expect(page.locator("[data-group-id]")).to_have_count(2)
    tab_to('[data-copy="expressions"]')
    press("Enter")
    expect(page.locator("[data-copied]")).to_have_attribute("data-copied", "expressions")
    assert focused() != "BODY"
