"""The block diagram: one folded layer drawn from the inferred roles, each delta drawn at its
module with its route and group colour, redrawn on every design change."""

from playwright.sync_api import Page, expect

from tests.e2e.helpers import group, load, wait_update

QUERY = "encoder.layer.*.attention.self.query"
VALUE = "encoder.layer.*.attention.self.value"


def delta(page: Page, node: str):
    return page.locator(f'[data-diagram] [data-diagram-delta][data-diagram-for="{node}"]')


def test_the_diagram_draws_each_delta_where_and_how_it_acts(designer: Page, artifacts):
    page = designer
    figure = page.locator("[data-diagram]")
    expect(figure).to_have_attribute("data-diagram", "encoder.layer.*")
    for node in (QUERY, VALUE, "encoder.layer.*.attention.output.dense", "encoder.layer.*.attention.output.LayerNorm",
                 "encoder.layer.*.intermediate.dense", "encoder.layer.*.output.dense"):
        expect(figure.locator(f'[data-diagram-node="{node}"]')).to_have_count(1)
    expect(page.locator("[data-diagram-caption]")).to_contain_text("One of 6 layers (encoder.layer.*)")
    expect(page.locator("[data-diagram-deltas-text]")).to_have_text("no delta in this layer yet")
    wait_update(page, lambda: group(page).locator("[data-expressions]").fill("attn.q"))
    expect(delta(page, QUERY)).to_have_attribute("data-diagram-route", "parallel")  # LoRA beside q
    expect(delta(page, QUERY)).to_have_attribute("data-mark", "full")
    expect(delta(page, VALUE)).to_have_count(0)
    # a layer range makes it partial; an adapter after the FFN is drawn below it, in its colour
    wait_update(page, lambda: page.click("[data-add-group]"))
    second = group(page, 1)
    wait_update(page, lambda: second.locator('[data-method]').select_option("adapter"))
    wait_update(page, lambda: second.locator("[data-expressions]").fill("ff.w2"))
    down = "encoder.layer.*.output.dense"
    expect(delta(page, down)).to_have_attribute("data-diagram-route", "after")
    colours = {delta(page, QUERY).get_attribute("fill"), delta(page, down).get_attribute("fill")}
    assert len(colours) == 2  # one colour per group
    wait_update(page, lambda: second.locator('[data-route]').select_option("before"))
    expect(delta(page, down)).to_have_attribute("data-diagram-route", "before")
    expect(page.locator("[data-diagram-deltas-text]")).to_contain_text("query")
    page.locator("[data-diagram]").screenshot(path=str(artifacts / "diagram.png"))
    wait_update(page, lambda: page.click("[data-undo]"))  # undo redraws too
    expect(delta(page, down)).to_have_attribute("data-diagram-route", "after")


def test_the_diagram_follows_the_backbone_shown(designer: Page):
    page = designer
    load(page, "catalog", "llama-3.1-405b")
    expect(page.locator("[data-tree]")).to_have_attribute("data-ready", "catalog:llama-3.1-405b")
    expect(page.locator("[data-diagram]")).to_have_attribute("data-diagram", "model.layers.*")
    expect(page.locator('[data-diagram] [data-diagram-node="model.layers.*.mlp.gate_proj"]')).to_have_count(1)
