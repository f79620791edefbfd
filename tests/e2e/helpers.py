"""Shared steps of the browser tests: they act through the data-* UI contract only."""

from __future__ import annotations

from playwright.sync_api import Page, expect


def node(page: Page, path: str):
    return page.locator(f'[data-node-path="{path}"]')


def expand(page: Page, *paths: str) -> None:
    for path in paths:
        item = node(page, path)
        if item.get_attribute("aria-expanded") == "false":
            item.locator("> .row [data-node-toggle]").click()
        expect(item).to_have_attribute("aria-expanded", "true")



def version(page: Page) -> str:
    return page.locator("body").get_attribute("data-design-version") or "0"


def wait_update(page: Page, action) -> None:
    """Run ``action`` and wait for the server's next design_updated to be applied.

    (The page's CSP forbids eval, so waits go through locator assertions, not wait_for_function.)
    """
    before = version(page)
    action()
    expect(page.locator("body")).not_to_have_attribute("data-design-version", before)


def tick(page: Page, path: str, checked: bool = True) -> None:
    box = node(page, path).locator("> .row [data-node-check]")
    wait_update(page, lambda: box.set_checked(checked))


def number(page: Page, selector: str) -> int:
    return int(page.locator(selector).first.text_content().replace(",", ""))


def group(page: Page, index: int = 0):
    return page.locator("[data-group-id]").nth(index)


def load(page: Page, kind: str, value: str = "") -> None:
    page.select_option("[data-backbone-kind]", kind)
    if value:
        page.fill("[data-backbone-input]", value)
    page.click("[data-backbone-load]")
