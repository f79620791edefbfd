// The block diagram: one folded layer of the backbone (from the server's schematic, drawn once per
// backbone) with every delta of the design drawn at its module and route, coloured by group.
// A design update redraws only the deltas, from the design's marks: no request.

import { colourOf } from "./tree.js";

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 360;
const BOX_H = 22;
const GAP = 10;

function svg(tag, attributes = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  if (text !== null) node.textContent = text;
  return node;
}

const shortName = (path) => path.split(".").slice(-1)[0];

// Each node's label: its own name, or its path inside the layer where that name is not unique
// (BERT's two "dense" and two "LayerNorm").
function labels(schematic) {
  const nodes = schematic.sections.flatMap((s) => [...s.blocks.map((b) => b.node), ...(s.norm ? [s.norm] : [])]);
  const count = new Map();
  for (const node of nodes) count.set(shortName(node), (count.get(shortName(node)) || 0) + 1);
  const inLayer = (node) => (schematic.layer && node.startsWith(`${schematic.layer}.`) ? node.slice(schematic.layer.length + 1) : node);
  return new Map(nodes.map((node) => [node, count.get(shortName(node)) > 1 ? inLayer(node) : shortName(node)]));
}

export class DiagramView {
  constructor(figure) {
    this.figure = figure;
    this.boxes = new Map();  // diagram node path → {x, y, w, h}
    this.schematic = null;
  }

  // Lay out the schematic's sections (norm, projections, output projection, residual add).
  setSchematic(schematic) {
    this.schematic = schematic;
    this.boxes.clear();
    const caption = this.figure.querySelector("[data-diagram-caption]");
    const old = this.figure.querySelector("svg");
    if (old) old.remove();
    if (!schematic) {
      this.figure.dataset.diagram = "none";
      caption.textContent = "No block diagram: no layer stack with attention or feed-forward roles was recognised.";
      return;
    }
    this.figure.dataset.diagram = schematic.layer || schematic.stack;
    const root = svg("svg", { role: "img", "aria-labelledby": "diagram-caption", width: WIDTH });
    this.layer = svg("g", { "data-diagram-layer": "" });
    this.deltas = svg("g", { "data-diagram-deltas": "" });
    root.append(this.layer, this.deltas);
    let y = 8;
    const names = labels(schematic);
    this.names = names;
    this.sectionNodes = new Set(schematic.sections.map((section) => section.node).filter(Boolean));
    const box = (node, x, w, label, kind) => {
      const group = svg("g", { "data-diagram-node": node, "data-kind": kind });
      group.append(svg("rect", { x, y, width: w, height: BOX_H, rx: 4, class: `diagram-box ${kind}` }),
        svg("text", { x: x + w / 2, y: y + 15, "text-anchor": "middle", class: "diagram-label" }, label),
        svg("title", {}, node));
      this.layer.append(group);
      this.boxes.set(node, { x, y, w, h: BOX_H });
    };
    const line = (x1, y1, x2, y2, kind = "flow") => this.layer.append(svg("line", { x1, y1, x2, y2, class: `diagram-${kind}` }));
    for (const section of schematic.sections) {
      const top = y;
      const centre = WIDTH / 2 - 20;
      if (section.norm && section.norm_position === "before") {
        box(section.norm, centre - 75, 150, names.get(section.norm), "norm");
        y += BOX_H + GAP;
      }
      const frameY = y;
      y += 16;
      const rows = [section.blocks.filter((b) => !b.output), section.blocks.filter((b) => b.output)];
      for (const row of rows) {
        if (!row.length) continue;
        const w = Math.min(row.length === 1 ? 140 : 96, (WIDTH - 110) / row.length - 18);  // room beside each for parallel deltas
        row.forEach((block, i) => {
          const x = centre - (row.length * (w + 18)) / 2 + i * (w + 18) + 3;
          box(block.node, x, w, names.get(block.node), "projection");
        });
        y += BOX_H + GAP;
      }
      const frame = svg("rect", { x: 40, y: frameY, width: WIDTH - 120, height: y - frameY, rx: 6, class: "diagram-section" });
      this.layer.prepend(frame);
      this.layer.append(svg("text", { x: 46, y: frameY + 12, class: "diagram-section-label" }, section.name));
      if (section.node) this.boxes.set(section.node, { x: 40, y: frameY, w: WIDTH - 120, h: y - frameY });
      if (section.norm && section.norm_position === "after") {
        box(section.norm, centre - 75, 150, names.get(section.norm), "norm");
        y += BOX_H + GAP;
      }
      // the residual: around the section to an add
      line(20, top, 20, y + 6, "residual");
      line(20, y + 6, centre - 8, y + 6, "residual");
      this.layer.append(svg("circle", { cx: centre, cy: y + 6, r: 7, class: "diagram-add" }),
        svg("text", { x: centre, y: y + 10, "text-anchor": "middle", class: "diagram-label" }, "+"));
      y += 22;
    }
    root.setAttribute("height", y);
    root.setAttribute("viewBox", `0 0 ${WIDTH} ${y}`);
    this.figure.prepend(root);
    const others = schematic.other_stacks.length ? `; also ${schematic.other_stacks.join(", ")} (not drawn)` : "";
    caption.textContent = `One of ${schematic.layers} layers (${schematic.layer || schematic.stack})${others}.`;
  }

  // Draw each group's deltas at the diagram's modules it marks, by its route.
  update(design) {
    if (!this.schematic) return;
    this.deltas.replaceChildren();
    const listed = [];
    const stacked = new Map();
    design.groups.forEach((group, index) => {
      const colour = colourOf(index);
      const route = group.method === "unfreeze" ? "unfreeze" : (group.route || "none");
      const nodes = [];
      for (const [node, place] of this.boxes) {
        const mark = design.marks[node] && design.marks[node][group.id];
        // a section is drawn only when the delta is on it: "partial" there means one inside
        if (!mark || (mark === "partial" && this.sectionNodes.has(node))) continue;
        nodes.push(this.names.get(node) || shortName(node));
        const k = stacked.get(node) || 0;
        stacked.set(node, k + 1);
        this.deltas.append(this.marker(group, route, node, place, mark, colour, k));
      }
      if (nodes.length) listed.push(`${group.name} (${group.method}${route !== "none" && route !== "unfreeze" ? `, ${route}` : ""}): ${nodes.join(", ")}`);
    });
    this.figure.querySelector("[data-diagram-deltas-text]").textContent = listed.length ? listed.join("; ") : "no delta in this layer yet";
  }

  marker(group, route, node, place, mark, colour, k) {
    const attributes = { "data-diagram-delta": group.id, "data-diagram-for": node, "data-diagram-route": route, "data-mark": mark,
                         fill: colour, stroke: colour, class: `diagram-delta ${mark}` };
    let shape;
    if (route === "parallel" || route === "parallel_pair") {
      shape = svg("rect", { ...attributes, x: place.x + place.w + 3 + k * 9, y: place.y + 3, width: 7, height: place.h - 6, rx: 2 });
    } else if (route === "before") {
      shape = svg("rect", { ...attributes, x: place.x + 4, y: place.y - 5 - k * 4, width: place.w - 8, height: 4 });
    } else if (route === "after" || route === "sequential") {
      shape = svg("rect", { ...attributes, x: place.x + 4, y: place.y + place.h + 1 + k * 4, width: place.w - 8, height: 4 });
    } else {  // no route (BitFit, unfreeze, a method acting inside the module): an outline
      shape = svg("rect", { ...attributes, x: place.x - 2 - k * 2, y: place.y - 2 - k * 2, width: place.w + 4 + k * 4,
                            height: place.h + 4 + k * 4, rx: 5, fill: "none", "stroke-width": 2 });
    }
    shape.append(svg("title", {}, `${group.name}: ${group.method} ${route} on ${node}${mark === "partial" ? " (some layers)" : ""}`));
    return shape;
  }
}
