// Delta group panels: method, route, a hyper-parameter form generated from the method's config
// dataclass (no per-method code here), expressions, match counts and the group's trainable count.
import { $, $$, el, exact } from "./dom.js";
import { colourOf } from "./tree.js";

const FIELDS = ["name", "method", "route", "expressions", "selection", "layers", "hyperparameters"];

function hyperInput(spec, value) {
  const attributes = { "data-hyper": spec.name, "aria-label": spec.name, title: spec.help || spec.name };
  if (spec.choices) {
    return el("select", attributes, spec.choices.map((choice) =>
      el("option", { value: choice, text: choice, selected: choice === value })));
  }
  if (spec.type === "bool") return el("input", { ...attributes, type: "checkbox", checked: Boolean(value) });
  if (spec.type === "dict") {
    return el("input", { ...attributes, type: "text", class: "json", value: JSON.stringify(value ?? {}),
      placeholder: '{"expression": value}' });
  }
  if (spec.type === "int" || spec.type === "float") {
    return el("input", { ...attributes, type: "number", step: spec.type === "int" ? "1" : "any", value });
  }
  return el("input", { ...attributes, type: "text", value: value ?? "" });
}

function readHyper(input, spec) {
  if (spec.type === "bool") return input.checked;
  if (spec.type === "dict") {
    try { return JSON.parse(input.value || "{}"); } catch { return input.value; }  // the server names the error
  }
  if (spec.type === "int" || spec.type === "float") {
    const number = Number(input.value);
    return input.value.trim() === "" || Number.isNaN(number) ? input.value : number;
  }
  return input.value;
}

export class GroupsView {
  constructor(container, send) {
    this.container = container;
    this.send = send;
    this.methods = [];
    this.panels = new Map();
    this.timers = new Map();
  }

  setMethods(methods) {
    this.methods = methods;
  }

  method(name) {
    return this.methods.find((m) => m.delta_type === name) || { routes: [], hyperparameters: [] };
  }

  update(groups, activeId) {
    const seen = new Set();
    groups.forEach((group, index) => {
      seen.add(group.id);
      let panel = this.panels.get(group.id);
      if (!panel) {
        panel = this.build(group);
        this.panels.set(group.id, panel);
      }
      // keep the server's order, moving a panel only when it is out of place: moving the panel
      // that holds the focus would drop the focus to <body>
      if (this.container.children[index] !== panel) this.container.insertBefore(panel, this.container.children[index] || null);
      this.patch(panel, group, index, group.id === activeId);
    });
    for (const [id, panel] of this.panels) {
      if (!seen.has(id)) { panel.remove(); this.panels.delete(id); }
    }
  }

  build(group) {
    const id = group.id;
    const panel = el("article", { class: "group", "data-group-id": id, tabindex: "-1" });
    const methodSelect = el("select", { "data-method": true, "aria-label": "method" },
      this.methods.map((m) => el("option", { value: m.delta_type, text: m.delta_type })));
    const routeSelect = el("select", { "data-route": true, "aria-label": "route" });
    panel.append(
      el("header", {}, [
        el("span", { class: "swatch", "aria-hidden": "true" }),
        el("input", { "data-group-name": true, "aria-label": "group name", size: 12 }),
        methodSelect, routeSelect,
        el("button", { type: "button", class: "link", "data-select-group": true, text: "select" }),
        el("button", { type: "button", class: "link", "data-use-defaults": true, text: "defaults",
          title: "select the method's default positions" }),
        el("button", { type: "button", class: "link danger", "data-remove-group": true, text: "remove",
          "aria-label": `remove group ${group.name}` }),
      ]),
      el("div", { class: "hyper", "data-hyperparameters": true }),
      el("label", { class: "block", text: "Expressions (one per line)" }),
      el("textarea", { "data-expressions": true, rows: 2, spellcheck: "false", "aria-label": "expressions" }),
      el("ul", { class: "matches", "data-match-counts": true }),
      el("div", { class: "count" }, [el("span", { class: "label", text: "trainable " }),
        el("strong", { "data-group-trainable": true, text: "0" }),
        el("span", { class: "muted", "data-group-modules": true })]),
      ...FIELDS.map((field) => el("span", { class: "error", "data-error": field, role: "alert" })),
    );
    // a group becomes active when it is clicked or edited, never because focus passed through it
    const activate = () => { if (!panel.classList.contains("active")) this.send("select_group", { group_id: id }); };
    panel.addEventListener("pointerdown", activate);
    panel.addEventListener("input", activate);
    panel.addEventListener("change", activate);
    $("[data-select-group]", panel).addEventListener("click", () => this.send("select_group", { group_id: id }));
    $("[data-remove-group]", panel).addEventListener("click", () => this.send("remove_group", { group_id: id }));
    $("[data-use-defaults]", panel).addEventListener("click", () => this.send("set_expressions",
      { group_id: id, expressions: this.method(panel.dataset.method).defaults, roles: true }));
    methodSelect.addEventListener("change", () => this.send("set_group", { group_id: id, method: methodSelect.value }));
    routeSelect.addEventListener("change", () => this.send("set_group", { group_id: id, route: routeSelect.value }));
    $("[data-group-name]", panel).addEventListener("change", (event) =>
      this.send("set_group", { group_id: id, name: event.target.value.trim() }));
    $("[data-expressions]", panel).addEventListener("input", (event) => this.debounce(id, () =>
      this.send("set_expressions", { group_id: id, expressions: event.target.value.split("\n").map((s) => s.trim()).filter(Boolean) })));
    panel.addEventListener("change", (event) => {
      const input = event.target.closest("[data-hyper]");
      if (!input) return;
      const spec = this.method(panel.dataset.method).hyperparameters.find((h) => h.name === input.dataset.hyper);
      this.send("set_group", { group_id: id, hyperparameters: { [spec.name]: readHyper(input, spec) } });
    });
    return panel;
  }

  debounce(id, action) {
    clearTimeout(this.timers.get(id));
    this.timers.set(id, setTimeout(action, 250));
  }

  patch(panel, group, index, active) {
    const setValue = (node, value) => { if (document.activeElement !== node) node.value = value; };
    panel.classList.toggle("active", active);
    panel.dataset.active = String(active);
    panel.style.setProperty("--group", colourOf(index));
    panel.dataset.method = group.method;
    $("[data-use-defaults]", panel).hidden = !this.method(group.method).defaults.length;
    setValue($("[data-group-name]", panel), group.name);
    setValue($("[data-method]", panel), group.method);
    const method = this.method(group.method);
    const routeSelect = $("[data-route]", panel);
    if (routeSelect.dataset.forMethod !== group.method) {
      routeSelect.replaceChildren(...method.routes.map((r) => el("option", { value: r, text: r })));
      routeSelect.dataset.forMethod = group.method;
      routeSelect.hidden = method.routes.length < 2;
    }
    setValue(routeSelect, group.route || "");
    const hyper = $("[data-hyperparameters]", panel);
    if (hyper.dataset.forMethod !== group.method) {
      hyper.replaceChildren(...method.hyperparameters.map((spec) => el("label", { class: "field" }, [
        el("span", { text: spec.name }), hyperInput(spec, group.hyperparameters[spec.name]),
        el("span", { class: "error", "data-error": `hyper:${spec.name}`, role: "alert" })])));
      hyper.dataset.forMethod = group.method;
    }
    for (const input of $$("[data-hyper]", hyper)) {
      const value = group.hyperparameters[input.dataset.hyper];
      if (document.activeElement === input) continue;
      if (input.type === "checkbox") input.checked = Boolean(value);
      else input.value = input.classList.contains("json") ? JSON.stringify(value ?? {}) : value;
    }
    setValue($("[data-expressions]", panel), group.expressions.join("\n"));
    $("[data-expressions]", panel).setAttribute("data-expressions", group.expressions.join("\n"));
    $("[data-match-counts]", panel).replaceChildren(...Object.entries(group.match_counts).map(([expression, count]) =>
      el("li", { "data-match-count": count }, [el("code", { text: expression }), el("span", { text: ` → ${count} module${count === 1 ? "" : "s"}` })])));
    $("[data-group-trainable]", panel).textContent = exact(group.trainable);
    $("[data-group-modules]", panel).textContent = group.modules ? ` on ${group.modules} selected module${group.modules === 1 ? "" : "s"}` : " (nothing selected)";
  }
}
