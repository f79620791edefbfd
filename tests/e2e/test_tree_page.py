from playwright.sync_api import Page, expect


def test_page_shows_the_collapsed_tree_of_the_default_backbone(page: Page, live_server, artifacts):
    page.set_viewport_size({"width": 1280, "height": 720})
    page.goto(live_server)
    expect(page.locator("[data-backbone-parameters]")).to_have_attribute(
        "data-backbone-parameters", "22713216"
    )
    group = page.locator('[data-node-path="encoder.layer.*"]')
    expect(group).to_have_count(1)
    expect(group.locator("> details > summary .node-name")).to_have_text("0-5 ×6")
    expect(page.locator('[data-node-path="encoder.layer.0"]')).to_have_count(0)  # folded
    query = page.locator('[data-node-path="encoder.layer.*.attention.self.query"]')
    expect(query).to_have_count(1)
    expect(query.locator(".node-param").first).to_have_text("weight[384,384]")
    # every node is addressable: root + embeddings (6) + encoder (20) + pooler (3)
    nodes = page.locator("[data-node-path]")
    assert nodes.count() == 30
    page.screenshot(path=str(artifacts / "tree-page.png"))


def test_nodes_expand_and_collapse_with_mouse_and_keyboard(page: Page, live_server):
    page.goto(live_server)
    attention = page.locator('[data-node-path="encoder.layer.*.attention"]')
    summary = attention.locator("> details > summary")
    expect(attention).to_have_attribute("aria-expanded", "false")
    query = page.locator('[data-node-path="encoder.layer.*.attention.self.query"]')
    expect(query).to_be_hidden()
    summary.click()
    expect(attention).to_have_attribute("aria-expanded", "true")
    summary.focus()
    page.keyboard.press("ArrowLeft")
    expect(attention).to_have_attribute("aria-expanded", "false")
    page.keyboard.press("ArrowRight")
    expect(attention).to_have_attribute("aria-expanded", "true")
    page.keyboard.press("ArrowDown")
    expect(page.locator(":focus .node-name").first).to_have_text("self")


def test_page_runs_no_failing_scripts(page: Page, live_server):
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto(live_server)
    page.wait_for_load_state("networkidle")
    assert errors == []
