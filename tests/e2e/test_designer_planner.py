"""The memory planner panel: the breakdown the engine computes, fits / does not fit per GPU, the
formulas on the page, errors at the panel, and a plan that follows the design."""

from playwright.sync_api import Page, expect

from tests.e2e.helpers import group, wait_update


def bytes_of(page: Page, part: str) -> int:
    return int(page.locator(f'[data-plan-part="{part}"]').get_attribute("data-bytes"))




def test_the_planner_shows_the_engines_breakdown_and_whether_it_fits(designer: Page):
    page = designer
    wait_update(page, lambda: group(page).locator("[data-expressions]").fill("attn.q\nattn.v"))
    planner = page.locator("[data-memory-planner]")
    expect(page.locator('[data-plan="sequence"]')).to_have_value("512")  # what MiniLM reads at most
    planner.locator("> summary").click()
    expect(planner).to_have_attribute("data-plan-state", "ready")
    expect(page.locator("[data-plan-fits]")).to_have_attribute("data-plan-fits", "yes")
    assert bytes_of(page, "weights") == 22_713_216 * 2  # MiniLM in bf16
    assert bytes_of(page, "trainable_states") == 73_728 * 16  # value, gradient, two AdamW moments
    first = bytes_of(page, "activations")
    assert first > 0
    # one memory model: the live line is the planner's weights + trainable states in the same format
    live = int(page.locator("[data-memory]").get_attribute("data-bytes"))
    assert live == bytes_of(page, "weights") + bytes_of(page, "trainable_states")
    assert bytes_of(page, "total_per_gpu") == live + first
    expect(page.locator('[data-plan-part="activations"] td').nth(1)).to_contain_text("running forward and backward on the meta device")
    # the same setup through the API gives the same numbers the page shows
    api = page.request.post(page.url.split("#")[0].rstrip("/") + "/api/memory-plan",
                            data={"gpu_bytes": 80 * 2**30, "batch": 1, "sequence": 512},
                            headers={"X-Delta-Tab": page.evaluate("sessionStorage.getItem('delta-designer-tab')")})
    assert api.json()["activations"] == first
    # formats, optimizer and batch change it; a large enough batch does not fit
    page.select_option('[data-plan="weight-format"]', "nf4")
    expect(page.locator('[data-plan-part="weights"]')).not_to_have_attribute("data-bytes", str(22_713_216 * 2))
    expect(page.locator("[data-dtype]")).to_have_value("nf4")  # the live line follows the planner's format
    expect(page.locator("[data-memory]")).to_have_attribute(
        "data-bytes", str(bytes_of(page, "weights") + 73_728 * 16))
    page.select_option('[data-plan="optimizer"]', "sgd")
    expect(page.locator('[data-plan-part="trainable_states"]')).to_have_attribute("data-bytes", str(73_728 * 8))
    page.select_option('[data-plan="gpu"]', "24")
    page.select_option('[data-plan="attention"]', "eager")
    page.fill('[data-plan="batch"]', "512")
    page.locator('[data-plan="batch"]').dispatch_event("change")
    expect(page.locator("[data-plan-fits]")).to_have_attribute("data-plan-fits", "no")
    expect(page.locator("[data-plan-fits]")).to_contain_text("does not fit")
    page.check('[data-plan="checkpointing"]')
    expect(planner).to_have_attribute("data-plan-state", "ready")
    expect(page.locator('[data-plan-part="activations"] td').nth(1)).to_contain_text("gradient checkpointing (each layer recomputed")
    # a bad value is an error at the panel, naming the limit; the design is untouched
    page.fill('[data-plan="sequence"]', "4096")
    page.locator('[data-plan="sequence"]').dispatch_event("change")
    expect(page.locator('[data-error="plan"]')).to_contain_text(
        "sequence 4,096 is longer than BertModel reads (max_position_embeddings = 512)")
    page.fill('[data-plan="sequence"]', "512")
    page.fill('[data-plan="gpus"]', "0")
    page.locator('[data-plan="gpus"]').dispatch_event("change")
    expect(page.locator('[data-error="plan"]')).to_contain_text("gpus must be an integer from 1 to 4,096")
    page.fill('[data-plan="gpus"]', "8")
    page.select_option('[data-plan="sharding"]', "fsdp")
    expect(planner).to_have_attribute("data-plan-state", "ready")
    expect(page.locator('[data-plan-part="gathered_layer"]')).to_be_visible()
    # the open planner follows the design
    states = bytes_of(page, "trainable_states")
    wait_update(page, lambda: group(page).locator("[data-expressions]").fill("attn.q"))
    expect(page.locator('[data-plan-part="trainable_states"]')).to_have_attribute("data-bytes", str(states // 2))
