// The collapsed module tree: render once per backbone, then update ticks and marks in place.
import { $, $$, el, humanCount, exact } from "./dom.js";

const GROUP_COLOURS = ["#5b4bdb", "#0e7490", "#c2410c", "#15803d", "#a21caf", "#b45309"];

export function colourOf(index) {
  return GROUP_COLOURS[index % GROUP_COLOURS.length];
}

function nodeRow(node, { checkable }) {
  const row = el("div", { class: "row", tabindex: "-1" });
  row.append(el("button", {
    type: "button", class: "twisty", "data-node-toggle": true, tabindex: "-1",
    "aria-label": node.children.length ? "expand or collapse" : "leaf", hidden: !node.children.length,
  }));
  if (checkable && node.path) {
    row.append(el("input", { type: "checkbox", "data-node-check": true, tabindex: "-1",
      "aria-label": `select ${node.label}` }));
  }
  row.append(el("span", { class: "node-name", text: node.label || "root" }));
  row.append(el("span", { class: "node-class", text: node.class_name }));
  for (const p of node.parameters) {
    row.append(el("span", {
      class: `node-param${p.trainable ? "" : " frozen"}${p.is_delta ? " delta" : ""}`,
      title: `${p.dtype}${p.tied_to ? ", tied to " + p.tied_to : ""}`,
      text: `${p.name}[${p.shape.join(",")}]`,
    }));
  }
  if (node.total_parameters) {
    const each = node.members ? " each" : "";
    row.append(el("span", { class: "node-count", title: `${exact(node.total_parameters)} parameters${each}`,
      text: `${humanCount(node.total_parameters)}${each}` }));
  }
  if (node.note) row.append(el("span", { class: "node-note", "data-node-note": node.note, title: node.note, text: "≠" }));
  if (checkable && node.members) {
    row.append(el("input", { class: "layers", "data-node-layers": true, size: 7, tabindex: "0",
      value: compactRange(node.members), "aria-label": `layers of ${node.path} for the active group`,
      title: "layers for the active group, e.g. 0-5 or 6,8,10" }));
    row.append(el("span", { class: "error", "data-error": "layers", role: "alert" }));  // this box's errors
  }
  if (checkable) row.append(el("span", { class: "node-marks", "data-node-marks": true }));
  return row;
}

export function compactRange(values) {
  const parts = [];
  let start = values[0];
  let prev = values[0];
  for (const value of values.slice(1).concat([null])) {
    if (value !== null && value === prev + 1) { prev = value; continue; }
    parts.push(start === prev ? `${start}` : `${start}-${prev}`);
    start = prev = value;
  }
  return parts.join(",");
}

function renderNode(node, depth, options) {
  const open = depth < 2 || Boolean(node.members) || node.children.some((c) => c.members)
    || (!options.checkable && node.delta_parameters > 0 && !node.is_delta);  // built view: show deltas
  const item = el("li", {
    role: "treeitem", "data-node-path": node.path, "data-node-class": node.class_name,
    "data-node-count": node.count, class: `node${node.members ? " node-group" : ""}${node.is_delta ? " node-delta" : ""}`,
  });
  if (node.children.length) item.setAttribute("aria-expanded", String(open));
  item.append(nodeRow(node, options));
  if (node.children.length) {
    const list = el("ul", { role: "group" });
    for (const child of node.children) list.append(renderNode(child, depth + 1, options));
    item.append(list);
  }
  return item;
}

export function renderTree(container, root, options = { checkable: true }) {
  container.replaceChildren(renderNode(root, 0, options));
  const first = $(".row", container);
  if (first) first.tabIndex = 0;
}

export class TreeView {
  constructor(container, { onToggle, onLayers }) {
    this.container = container;
    this.onToggle = onToggle;
    this.onLayers = onLayers;
    container.addEventListener("click", (event) => this.click(event));
    container.addEventListener("change", (event) => this.change(event));
    container.addEventListener("keydown", (event) => this.key(event));
  }

  render(root) {
    renderTree(this.container, root);
    this.items = new Map($$("[data-node-path]", this.container).map((item) => [item.dataset.nodePath, item]));
  }

  // labels: {node path: "fused q, k, v projection", ...} — shown on hover and as data-node-role.
  showRoles(labels) {
    for (const [path, label] of Object.entries(labels)) {
      const item = this.items.get(path);
      if (!item) continue;
      item.dataset.nodeRole = label;
      item.firstElementChild.title = label;
    }
  }

  // marks: {path: {groupId: "full" | "partial"}}; groups: [{id, ...}] in display order.
  update(marks, groups, activeId, activeRanges) {
    if (!this.items) return;
    const colour = new Map(groups.map((g, i) => [g.id, colourOf(i)]));
    const names = new Map(groups.map((g) => [g.id, g.name]));
    for (const [path, item] of this.items) {
      const row = item.firstElementChild;
      const state = (marks[path] || {})[activeId];
      const box = row.querySelector("[data-node-check]");
      if (box) {
        box.checked = state === "full";
        box.indeterminate = state === "partial";
        // the tree item states it too, for assistive technology: checked, mixed or not
        item.setAttribute("aria-checked", state === "full" ? "true" : state === "partial" ? "mixed" : "false");
      }
      item.classList.toggle("selected", state === "full");
      const badges = row.querySelector("[data-node-marks]");
      if (badges) {
        const touching = Object.entries(marks[path] || {});
        badges.replaceChildren(...touching.map(([id, kind]) => {
          const mark = el("span", { class: `mark ${kind}`, "data-mark-group": id,
            title: `${names.get(id)} (${kind === "full" ? "all members" : "some"})` });
          mark.style.setProperty("--mark", colour.get(id));  // CSSOM: allowed by the CSP
          return mark;
        }));
      }
      const layers = row.querySelector("[data-node-layers]");
      if (layers && document.activeElement !== layers) {
        layers.value = activeRanges[path] || layers.defaultValue;
      }
    }
  }

  click(event) {
    const toggle = event.target.closest("[data-node-toggle]");
    if (toggle) this.setOpen(toggle.closest("[data-node-path]"), null);
  }

  change(event) {
    const item = event.target.closest("[data-node-path]");
    if (!item) return;
    if (event.target.matches("[data-node-check]")) this.onToggle(item.dataset.nodePath, event.target.checked);
    if (event.target.matches("[data-node-layers]")) this.onLayers(item.dataset.nodePath, event.target.value, event.target);
  }

  setOpen(item, open) {
    if (!item || !item.hasAttribute("aria-expanded")) return;
    const next = open === null ? item.getAttribute("aria-expanded") !== "true" : open;
    item.setAttribute("aria-expanded", String(next));
  }

  visibleRows() {
    return $$(".row", this.container).filter((row) => row.offsetParent !== null);
  }

  key(event) {
    const row = event.target.closest(".row");
    if (!row || event.target.matches("input.layers")) return;
    const rows = this.visibleRows();
    const index = rows.indexOf(row);
    const item = row.parentElement;
    const move = (to) => {
      const target = rows[Math.max(0, Math.min(rows.length - 1, to))];
      if (!target) return;
      row.tabIndex = -1;
      target.tabIndex = 0;
      target.focus();
    };
    if (event.key === "ArrowDown") move(index + 1);
    else if (event.key === "ArrowUp") move(index - 1);
    else if (event.key === "ArrowRight") this.setOpen(item, true);
    else if (event.key === "ArrowLeft") this.setOpen(item, false);
    else if (event.key === " " || event.key === "Enter") {
      const box = row.querySelector("[data-node-check]");
      if (box) { box.checked = !box.checked; this.onToggle(item.dataset.nodePath, box.checked); }
    } else return;
    event.preventDefault();
  }

  // Show only the nodes at `paths` (the server's filter answer) and their ancestors; null shows all.
  show(paths) {
    if (paths === null) {
      for (const item of this.items.values()) item.hidden = false;
      return;
    }
    const keep = new Set();
    for (const path of paths) {
      const item = this.items.get(path);
      for (let node = item; node && node.dataset && node.dataset.nodePath !== undefined; node = node.parentElement.closest("[data-node-path]")) {
        keep.add(node);
        if (node.hasAttribute("aria-expanded") && node !== item) node.setAttribute("aria-expanded", "true");
      }
    }
    for (const item of this.items.values()) item.hidden = !keep.has(item);
  }
}
