// Saved designs: the tab's design saved under a name; the workspace's designs listed (unreadable
// ones too, with why), opened in this tab, duplicated or renamed to the typed name, deleted.
import { $, $$, el, exact, humanBytes, showError } from "./dom.js";

export class DesignsView {
  constructor(panel, request) {
    this.panel = panel;
    this.request = request;  // (method, url, body) → parsed JSON, or throws with the server's message
    $("[data-design-save]", panel).addEventListener("click", () => this.act("POST", "/api/designs", { name: this.typed() }));
    $("[data-designs]", panel).addEventListener("click", (event) => this.onItem(event));
    panel.addEventListener("toggle", () => { if (panel.open) this.refresh(); });
    $("[data-compare-run]", panel).addEventListener("click", () => this.compare());
    $("[data-compare-clear]", panel).addEventListener("click", () => this.mark({}));
  }

  async compare() {
    showError(this.panel, "designs", "");
    const a = $("[data-compare-a]", this.panel).value;
    const b = $("[data-compare-b]", this.panel).value;
    try {
      const query = new URLSearchParams({ a, b });
      this.showComparison(await this.request("GET", `/api/designs/compare?${query}`));
    } catch (error) {
      showError(this.panel, "designs", error.message);
    }
  }

  showComparison(result) {
    const side = (key) => result[key];
    const row = (label, a, b, attribute) => el("tr", {}, [
      el("th", { scope: "row", text: label }),
      el("td", { [`${attribute}`]: "a", text: a }), el("td", { [`${attribute}`]: "b", text: b })]);
    const groups = (key) => side(key).groups.map((g) => `${g.name} (${g.method}): ${exact(g.trainable)}`).join("; ");
    const table = el("table", { class: "comparison" }, [
      el("tr", {}, [el("th", { scope: "col", text: "measure" }), el("th", { scope: "col", text: side("a").name }), el("th", { scope: "col", text: side("b").name })]),
      row("groups", groups("a"), groups("b"), "data-compare-groups"),
      row("trainable", exact(side("a").totals.trainable), exact(side("b").totals.trainable), "data-compare-total"),
      row("checkpoint", humanBytes(side("a").totals.checkpoint_bytes), humanBytes(side("b").totals.checkpoint_bytes),
          "data-compare-checkpoint"),
      row("memory", humanBytes(side("a").totals.memory.total_per_gpu), humanBytes(side("b").totals.memory.total_per_gpu),
          "data-compare-memory"),
    ]);
    const diff = result.diff;
    const summary = el("p", {}, [
      el("span", { class: "only-a", "data-compare-only-a": diff.only_a, text: `only ${side("a").name}: ${diff.only_a}` }), " · ",
      el("span", { class: "only-b", "data-compare-only-b": diff.only_b, text: `only ${side("b").name}: ${diff.only_b}` }), " · ",
      el("span", { class: "both", "data-compare-both": diff.both, text: `both: ${diff.both} modules` })]);
    $("[data-compare-result]", this.panel).replaceChildren(table, summary);
    this.mark(result.marks);
  }

  mark(marks) {
    for (const node of $$("[data-tree] [data-compare]")) node.removeAttribute("data-compare");
    for (const [path, kind] of Object.entries(marks)) {
      const node = document.querySelector(`[data-tree] [data-node-path="${CSS.escape(path)}"]`);
      if (node) node.dataset.compare = kind;
    }
  }

  typed() {
    return $("[data-design-name]", this.panel).value.trim();
  }

  async refresh() {
    await this.act("GET", "/api/designs");
  }

  async act(method, url, body) {
    showError(this.panel, "designs", "");
    try {
      const result = await this.request(method, url, body);
      if (result.designs) this.render(result.designs);
    } catch (error) {
      showError(this.panel, "designs", error.message);
    }
  }

  onItem(event) {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const name = encodeURIComponent(button.closest("[data-design-item]").dataset.designItem);
    const action = button.dataset.action;
    if (action === "open") this.act("POST", `/api/designs/${name}/open`).then(() => this.refresh());
    else if (action === "delete") this.act("DELETE", `/api/designs/${name}`);
    else this.act("POST", `/api/designs/${name}/${action}`, { new_name: this.typed() });
  }

  render(designs) {
    const readable = designs.filter((d) => d.readable).map((d) => d.name);
    for (const [index, select] of [$("[data-compare-a]", this.panel), $("[data-compare-b]", this.panel)].entries()) {
      const chosen = select.value;
      select.replaceChildren(...readable.map((name) => el("option", { value: name, text: name })));
      select.value = readable.includes(chosen) ? chosen : (readable[index] || "");
    }
    const list = $("[data-designs]", this.panel);
    list.replaceChildren(...designs.map((design) => {
      const about = design.readable
        ? `${design.source || "?"} · ${design.deltas} deltas`
        : `unreadable: ${design.error}`;
      const buttons = (design.readable ? ["open", "duplicate", "rename", "delete"] : ["rename", "delete"])
        .map((action) => el("button", { type: "button", "data-action": action, [`data-design-${action}`]: true,
                                        text: action, "aria-label": `${action} ${design.name}` }));
      return el("li", { "data-design-item": design.name, "data-readable": String(design.readable) },
                [el("strong", { text: design.name }), " ", el("span", { class: "muted", text: about }), " ", ...buttons]);
    }));
  }
}
