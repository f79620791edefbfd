"""Steps 4–8: methods, routes and hyper-parameters from the registry, live counts, typed
expressions, several groups with unfrozen modules, and the engine's build equal to the preview."""

import json

from playwright.sync_api import Page, expect

from engine import registered_methods
from tests.e2e.helpers import expand, group, load, node, number, tick, wait_update


def test_methods_routes_and_hyperparameters_come_from_the_registry(designer: Page):
    page = designer
    panel = group(page)
    options = panel.locator("[data-method] option")
    expect(options).to_have_count(len(registered_methods()) + 1)
    assert options.all_text_contents() == sorted(registered_methods()) + ["unfreeze"]
    from engine import LoraConfig

    expect(panel.locator("[data-hyper]")).to_have_count(len(LoraConfig.hyperparameters()))
    expect(panel.locator('[data-hyper="lora_alpha"]')).to_have_attribute("step", "any")  # a float
    expect(panel.locator('[data-hyper="rank_pattern"]')).to_have_value("{}")
    expect(panel.locator("[data-route]")).to_be_hidden()  # lora has one route
    wait_update(page, lambda: panel.locator("[data-method]").select_option("adapter"))
    expect(panel.locator("[data-route] option")).to_have_text(["after", "before", "parallel"])
    expect(panel.locator('[data-hyper="bottleneck_dim"]')).to_have_value("24")
    expect(panel.locator('[data-hyper="non_linearity"]')).to_have_value("gelu_new")
    wait_update(page, lambda: panel.locator("[data-method]").select_option("prefix"))
    expect(panel.locator('[data-hyper="reparameterize"]')).to_be_checked()


def test_hyperparameters_change_counts_and_bad_values_show_at_their_field(designer: Page):
    page = designer
    expand(page, "encoder.layer.*.attention", "encoder.layer.*.attention.self")
    tick(page, "encoder.layer.*.attention.self.query")
    assert number(page, "[data-total-trainable]") == 6 * 8 * 768
    panel = group(page)
    wait_update(page, lambda: (panel.locator('[data-hyper="lora_r"]').fill("16"),
                               panel.locator('[data-hyper="lora_r"]').press("Enter")))
    assert number(page, "[data-group-trainable]") == 6 * 16 * 768
    expect(page.locator("[data-total-percent]")).to_have_text(f"{100 * 6 * 16 * 768 / 22713216:.4f}")
    expect(page.locator("[data-checkpoint-size]")).to_have_text("288.0 KiB")  # 73,728 × 4 bytes
    bf16 = page.locator("[data-memory]").text_content()
    wait_update(page, lambda: page.select_option("[data-dtype]", "fp32"))
    assert page.locator("[data-memory]").text_content() != bf16
    expect(page.locator("[data-memory]")).to_have_text("87.8 MiB")  # 22,713,216 × 4 + 73,728 × 16
    panel.locator('[data-hyper="lora_r"]').fill("0")
    panel.locator('[data-hyper="lora_r"]').press("Enter")
    expect(panel.locator('[data-error="hyper:lora_r"]')).to_contain_text("lora_r must be a positive integer")
    assert number(page, "[data-group-trainable]") == 6 * 16 * 768  # the last valid design stays


def test_typed_expressions_light_up_nodes_and_errors_keep_the_design(designer: Page):
    page = designer
    panel = group(page)
    box = panel.locator("[data-expressions]")
    wait_update(page, lambda: box.fill("attn.q\nattn.v"))  # common names work too
    assert number(page, "[data-group-trainable]") == 73_728
    expect(node(page, "encoder.layer.*.attention.self.query")).to_have_class("node selected")
    expect(node(page, "encoder.layer.*.attention.self").locator("> .row [data-mark-group]")).to_have_class("mark partial")
    box.fill("query\nqeury")
    expect(panel.locator('[data-error="expressions"]')).to_contain_text("'qeury' matches no module")
    expect(panel.locator('[data-error="expressions"]')).to_contain_text("query")
    page.wait_for_timeout(400)
    assert number(page, "[data-group-trainable]") == 73_728
    expect(node(page, "encoder.layer.*.attention.self.value")).to_have_class("node selected")
    wait_update(page, lambda: box.fill(r"[r]layer\.0\.attention\.self\.key"))
    assert number(page, "[data-group-trainable]") == 8 * 768
    expect(node(page, "encoder.layer.*.attention.self.key").locator("> .row [data-node-check]")).to_have_js_property(
        "indeterminate", True)


def test_several_groups_unfrozen_modules_marks_and_build(designer: Page, artifacts):
    page = designer
    lora = group(page, 0)
    wait_update(page, lambda: lora.locator("[data-expressions]").fill("query\nvalue"))
    wait_update(page, lambda: page.click("[data-add-group]"))
    adapter = group(page, 1)
    wait_update(page, lambda: adapter.locator("[data-method]").select_option("adapter"))
    wait_update(page, lambda: adapter.locator("[data-expressions]").fill("ff.w2"))
    wait_update(page, lambda: page.click("[data-add-group]"))
    bitfit = group(page, 2)
    wait_update(page, lambda: bitfit.locator("[data-method]").select_option("bitfit"))
    wait_update(page, lambda: bitfit.locator("[data-expressions]").fill("LayerNorm"))
    wait_update(page, lambda: page.click("[data-add-group]"))
    unfreeze = group(page, 3)
    wait_update(page, lambda: unfreeze.locator("[data-method]").select_option("unfreeze"))
    wait_update(page, lambda: unfreeze.locator("[data-expressions]").fill("pooler"))
    counts = [number(page, f"[data-group-id] >> nth={i} >> [data-group-trainable]") for i in range(4)]
    assert counts == [73_728, 6 * (384 * 24 + 24 + 24 * 384 + 384), 13 * 384, 384 * 384 + 384]
    assert number(page, "[data-total-trainable]") == sum(counts)
    marks = node(page, "encoder.layer.*.output").locator("> .row [data-mark-group]")
    expect(marks).to_have_count(2)  # adapter on output.dense, bitfit on output.LayerNorm
    expect(node(page, "pooler").locator("> .row [data-mark-group]")).to_have_count(1)
    page.click("[data-build]")
    result = page.locator("[data-build-result]")
    expect(result).to_have_attribute("data-build-trainable", str(sum(counts)))
    expect(result).to_have_attribute("data-preview-trainable", str(sum(counts)))
    built = page.locator("[data-built-tree]")
    expect(built.locator('[data-node-path="encoder.layer.*.attention.self.query.lora_1"]')).to_be_visible()
    expect(built.locator('[data-node-path="encoder.layer.*.output.dense.adapter_2"]')).to_be_visible()
    expect(built.locator('[data-node-path="embeddings.LayerNorm.bitfit_3"]')).to_be_visible()
    # lora on query and value: 2 × (layer, lora_A, lora_B, dropout); adapter: layer, down,
    # activation, up; bitfit: a bias module on 3 folded LayerNorms
    expect(built.locator(".node-delta")).to_have_count(2 * 4 + 4 + 3)
    page.screenshot(path=str(artifacts / "designer-groups.png"), full_page=True)


def test_every_registered_method_can_be_designed_without_designer_code(designer: Page):
    page = designer
    methods = sorted(registered_methods())
    for index, method in enumerate(methods):
        if index:
            wait_update(page, lambda: page.click("[data-add-group]"))
        panel = group(page, index)
        wait_update(page, lambda: panel.locator("[data-method]").select_option(method))
        wait_update(page, lambda: panel.locator("[data-use-defaults]").click())
        assert number(page, f"[data-group-id] >> nth={index} >> [data-group-trainable]") > 0, method
        assert panel.locator("[data-expressions]").input_value(), method
    page.click("[data-build]")
    total = page.locator("[data-total-trainable]").text_content().replace(",", "")
    expect(page.locator("[data-build-result]")).to_have_attribute("data-build-trainable", total)


def test_dict_hyperparameters_are_edited_as_json(designer: Page):
    page = designer
    panel = group(page)
    wait_update(page, lambda: panel.locator("[data-expressions]").fill("query"))
    field = panel.locator('[data-hyper="rank_pattern"]')
    wait_update(page, lambda: (field.fill('{"[r]layer\\\\.0\\\\..*": 16}'), field.press("Enter")))
    assert number(page, "[data-group-trainable]") == 5 * 8 * 768 + 16 * 768
    field.fill('{"qeury": 4}')
    field.press("Enter")
    expect(panel.locator('[data-error="hyper:rank_pattern"]')).to_contain_text("'qeury' matches no module")


def test_roles_show_on_nodes_and_quick_picks_keep_their_common_names(designer: Page):
    page = designer
    expect(node(page, "encoder.layer.*.attention.self.query")).to_have_attribute("data-node-role", "query projection")
    expect(node(page, "encoder.layer.*.output.dense")).to_have_attribute(
        "data-node-role", "feed-forward down-projection")
    wait_update(page, lambda: page.click('[data-quick-pick="attn.q,attn.v"]'))
    assert number(page, "[data-total-trainable]") == 73_728
    expect(group(page).locator("[data-expressions]")).to_have_attribute("data-expressions", "attn.q\nattn.v")
    page.select_option("[data-backbone-kind]", "arch")
    page.fill("[data-backbone-input]", "gpt2")
    page.click("[data-backbone-load]")
    expect(page.locator("[data-tree]")).to_have_attribute("data-ready", "arch:gpt2")
    expect(node(page, "h.*.attn.c_attn")).to_have_attribute("data-node-role", "fused q, k, v projection")


def test_fused_moe_experts_are_labelled_and_selectable(designer: Page):
    page = designer
    expect(page.locator('[data-quick-pick="moe.experts"]')).to_be_hidden()  # MiniLM has no experts
    load(page, "catalog", "mixtral-8x7b")
    expect(page.locator("[data-tree]")).to_have_attribute("data-ready", "catalog:mixtral-8x7b")
    expect(node(page, "model.layers.*.mlp.experts")).to_have_attribute(
        "data-node-role", "mixture-of-experts experts (fused parameters)")
    expect(node(page, "model.layers.*.mlp")).to_have_attribute("data-node-role", "mixture-of-experts block")
    wait_update(page, lambda: page.click('[data-quick-pick="moe.experts"]'))
    expect(group(page).locator("[data-expressions]")).to_have_attribute("data-expressions", "moe.experts")
    # LoRA r=8 on 32 layers × 8 experts × (gate_up (28672 × 4096) + down (4096 × 14336))
    assert number(page, "[data-total-trainable]") == 32 * 8 * 8 * ((28672 + 4096) + (4096 + 14336))


def test_building_an_empty_design_shows_why_at_the_build_button(designer: Page):
    page = designer
    page.click("[data-build]")
    expect(page.locator('[data-error="build"]')).to_contain_text("no delta and unfreezes no module")
    expect(page.locator("[data-build-result]")).not_to_have_attribute("data-build-trainable", "22713216")


def test_undo_and_redo_by_button_and_keyboard(designer: Page):
    page = designer
    expect(page.locator("[data-undo]")).to_be_disabled()
    wait_update(page, lambda: group(page).locator("[data-expressions]").fill("query"))
    chosen = number(page, "[data-total-trainable]")
    assert chosen > 0
    wait_update(page, lambda: page.click("[data-add-group]"))
    expect(page.locator("[data-group-id]")).to_have_count(2)
    wait_update(page, lambda: page.click("[data-undo]"))  # the added group goes again
    expect(page.locator("[data-group-id]")).to_have_count(1)
    expect(page.locator("[data-redo]")).to_be_enabled()
    page.locator("[data-undo]").focus()
    wait_update(page, lambda: page.keyboard.press("Control+z"))  # outside a text field: the design's undo
    assert number(page, "[data-total-trainable]") == 0
    expect(page.locator("[data-undo]")).to_be_disabled()
    wait_update(page, lambda: page.keyboard.press("Control+Shift+z"))
    assert number(page, "[data-total-trainable]") == chosen
    redos = page.evaluate("window.deltaDesigner.state.design.history.redo")
    field = group(page).locator("[data-expressions]")
    field.focus()
    page.keyboard.press("Control+z")  # inside a text field it stays the field's own undo
    page.wait_for_timeout(600)
    # the design's undo would add a redo step; the field's own undo is at most a new edit
    # (whatever text the browser restores), which never does
    assert page.evaluate("window.deltaDesigner.state.design.history.redo") <= redos
    expect(field).to_be_focused()



def test_an_older_answer_never_replaces_a_newer_design(designer: Page):
    page = designer
    wait_update(page, lambda: group(page).locator("[data-expressions]").fill("query"))
    chosen = number(page, "[data-total-trainable]")
    sent = page.evaluate("window.deltaDesigner.state.seq")
    assert sent >= 1  # the page numbers what it sends
    # an answer that arrives late, older than the design shown (as a slow REST reply can): ignored
    page.evaluate("""() => {
        const { state, socket } = window.deltaDesigner;
        const stale = { ...state.design, version: state.version - 1,
                        totals: { ...state.design.totals, trainable: 1 } };
        for (const listener of socket.listeners("design_updated")) listener(stale);
    }""")
    assert number(page, "[data-total-trainable]") == chosen
    wait_update(page, lambda: page.click("[data-add-group]"))  # newer answers still show
    expect(page.locator("[data-group-id]")).to_have_count(2)
    assert page.evaluate("window.deltaDesigner.state.seq") == sent + 1

def test_focus_passing_through_a_panel_never_changes_the_active_group(designer: Page):
    page = designer
    wait_update(page, lambda: group(page).locator("[data-expressions]").fill("query"))
    wait_update(page, lambda: page.click("[data-add-group]"))
    expect(group(page, 1)).to_have_attribute("data-active", "true")
    group(page, 0).locator("[data-group-name]").focus()  # keyboard focus walks through the first panel
    for _ in range(4):
        page.keyboard.press("Shift+Tab")
        page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    page.wait_for_timeout(300)
    expect(group(page, 1)).to_have_attribute("data-active", "true")
    wait_update(page, lambda: page.click('[data-quick-pick="attn.q,attn.v"]'))  # applies to the active group
    expect(group(page, 0).locator("[data-expressions]")).to_have_attribute("data-expressions", "query")
    expect(group(page, 1).locator("[data-expressions]")).to_have_attribute("data-expressions", "attn.q\nattn.v")
    wait_update(page, lambda: group(page, 0).locator("[data-expressions]").fill("key"))  # editing activates
    expect(group(page, 0)).to_have_attribute("data-active", "true")


def test_two_tabs_of_one_browser_are_two_independent_designs(designer: Page, tmp_path):
    first = designer
    wait_update(first, lambda: group(first).locator("[data-expressions]").fill("query"))
    second = first.context.new_page()  # a second tab: same cookies, its own sessionStorage
    second.goto(first.url)
    second.wait_for_selector("body[data-design-version]")
    expect(group(second).locator("[data-expressions]")).to_have_attribute("data-expressions", "query")  # a copy
    wait_update(second, lambda: group(second).locator("[data-expressions]").fill("value"))
    load(second, "catalog", "gpt2")  # switching backbone in one tab leaves the other alone
    expect(second.locator("[data-tree]")).to_have_attribute("data-ready", "catalog:gpt2")
    first.wait_for_timeout(300)
    expect(group(first).locator("[data-expressions]")).to_have_attribute("data-expressions", "query")
    first.reload()  # a reload keeps the tab's own design
    first.wait_for_selector("body[data-design-version]")
    expect(first.locator("[data-tree]")).to_have_attribute("data-ready", "minilm")
    expect(group(first).locator("[data-expressions]")).to_have_attribute("data-expressions", "query")
    with first.expect_download() as info:
        first.click('[data-export="json"]')
    path = tmp_path / "first.json"
    info.value.save_as(path)
    assert json.loads(path.read_text())["deltas"][0]["modified_modules"] == ["query"]
    second.close()
