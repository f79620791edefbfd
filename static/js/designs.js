// Saved designs: the tab's design saved under a name; the workspace's designs listed (unreadable
// ones too, with why), opened in this tab, duplicated or renamed to the typed name, deleted.
import { $, el, showError } from "./dom.js";

export class DesignsView {
  constructor(panel, request) {
    this.panel = panel;
    this.request = request;  // (method, url, body) → parsed JSON, or throws with the server's message
    $("[data-design-save]", panel).addEventListener("click", () => this.act("POST", "/api/designs", { name: this.typed() }));
    $("[data-designs]", panel).addEventListener("click", (event) => this.onItem(event));
    panel.addEventListener("toggle", () => { if (panel.open) this.refresh(); });
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
