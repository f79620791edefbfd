// The designer page: one socket, one design. Every number shown comes from the server (engine).
import { io } from "/vendor/socket.io/socket.io.esm.min.js";
import { $, clearErrors, exact, humanBytes, showError } from "./dom.js";
import { DesignsView } from "./designs.js";
import { DiagramView } from "./diagram.js";
import { GroupsView } from "./groups.js";
import { PlannerView } from "./planner.js";
import { ShareView, designInLink, forgetLink } from "./share.js";
import { TreeView, renderTree } from "./tree.js";

// Each tab edits its own design: its session id lives in the tab's sessionStorage (a reload keeps
// it); a tab's first connection asks the server for a copy of the browser's latest design.
const TAB_KEY = "delta-designer-tab";
const tabId = () => sessionStorage.getItem(TAB_KEY);
const socket = io({
  transports: ["websocket", "polling"],
  auth: (reply) => reply(tabId() ? { tab: tabId() } : { fork: true }),
});
const state = { design: null, activeId: null, backbones: null, applyMs: [], seq: 0, version: 0 };
window.deltaDesigner = { state, socket };  // for tests and the curious

// every event carries the next sequence number: the server applies them in that order, and
// answers carry the design's version, so an older answer never replaces a newer design
function send(event, payload = {}) {
  clearErrors($("[data-groups]"));
  state.seq += 1;
  socket.emit(event, { ...payload, seq: state.seq });
}

const tree = new TreeView($("[data-tree]"), {
  onToggle: (path, checked) => { if (state.activeId) send("toggle_nodes", { group_id: state.activeId, paths: [path], checked }); },
  onLayers: (path, layers) => { if (state.activeId) send("set_layers", { group_id: state.activeId, node_path: path, layers }); },
});
const groups = new GroupsView($("[data-groups]"), send);
const diagram = new DiagramView($("[data-diagram]"));

// --- server events ---------------------------------------------------------------------------

socket.on("hello", (message) => {
  state.version = 0;  // a new connection (perhaps to a restarted server) counts versions afresh
  sessionStorage.setItem(TAB_KEY, message.tab);
  for (const link of document.querySelectorAll("[data-export]")) {
    const url = new URL(link.getAttribute("href"), location.href);
    url.searchParams.set("tab", message.tab);
    link.setAttribute("href", url.pathname + url.search);
  }
  groups.setMethods(message.methods);
});

socket.on("backbone_loaded", (message) => {
  groups.setMethods(message.methods);
  const summary = message.backbone;
  $("[data-backbone-summary]").dataset.backboneSource = summary.source;
  $("[data-backbone-class]").textContent = `${summary.class_name} · ${summary.source}`;
  const params = $("[data-backbone-parameters]");
  params.dataset.backboneParameters = summary.parameters;
  params.textContent = exact(summary.parameters);
  $("[data-backbone-meta]").hidden = !summary.is_meta;
  $("[data-module-count]").textContent = `${summary.modules} modules, repeated layers folded`;
  tree.render(message.tree.root);
  tree.showRoles(message.roles.labels);
  diagram.setSchematic(message.diagram);
  planner.setBackbone(summary);
  for (const pick of document.querySelectorAll("[data-quick-pick]")) {
    pick.hidden = !pick.dataset.quickPick.split(",").every((role) => message.roles.available.includes(role));
  }
  $("[data-built]").hidden = true;
  $("[data-tree]").dataset.ready = summary.source;
  applySearch();
});

// a link to a design (#design=…) is imported once the page shows its first design
let linkedDesign = designInLink();

socket.on("design_updated", (design) => {
  if (design.version <= state.version) return;  // an answer older than the design shown
  if (linkedDesign !== null) {
    const text = linkedDesign;
    linkedDesign = null;
    forgetLink();
    setTimeout(() => importText(text));
  }
  const started = performance.now();
  state.version = design.version;
  state.design = design;
  state.activeId = design.active_group;
  const active = design.groups.find((g) => g.id === design.active_group);
  tree.update(design.marks, design.groups, design.active_group, active ? active.layer_ranges : {});
  // what the active group's method cannot wrap is dimmed, the reason on hover; a tick there
  // selects what it can wrap below
  for (const item of document.querySelectorAll("[data-tree] [data-unwrappable]")) {
    item.removeAttribute("data-unwrappable");
    item.firstElementChild.removeAttribute("data-unwrappable-reason");
  }
  for (const [path, reason] of Object.entries(design.unwrappable || {})) {
    const item = document.querySelector(`[data-tree] [data-node-path="${CSS.escape(path)}"]`);
    if (!item) continue;
    item.dataset.unwrappable = "true";
    item.firstElementChild.dataset.unwrappableReason = reason;
    item.firstElementChild.title = reason;
  }
  groups.update(design.groups, design.active_group);
  const drawn = performance.now();
  diagram.update(design);
  state.diagramMs = (state.diagramMs || []).slice(-199).concat([performance.now() - drawn]);  // for benchmarks
  const totals = design.totals;
  $("[data-total-trainable]").textContent = exact(totals.trainable);
  $("[data-total-percent]").textContent = totals.percent.toFixed(4);
  $("[data-checkpoint-size]").textContent = humanBytes(totals.checkpoint_bytes);
  $("[data-memory]").textContent = humanBytes(totals.memory.total_per_gpu);
  $("[data-memory]").title = `${totals.memory.setup}; activations not included`;
  $("[data-memory]").dataset.bytes = String(totals.memory.total_per_gpu);
  if (document.activeElement !== $("[data-dtype]")) $("[data-dtype]").value = totals.memory.weight_format;
  planner.setWeightFormat(totals.memory.weight_format);
  const peft = $('[data-export="peft"]');
  peft.setAttribute("aria-disabled", String(!design.exports.peft.available));
  peft.dataset.exportReason = design.exports.peft.reason;
  $("[data-export-note]").textContent = design.exports.peft.available ? "" : `PEFT: ${design.exports.peft.reason}`;
  if ($("[data-peft-overlay]").checked) showPeftDefaults();
  planner.plan();  // an open planner follows the design
  $("[data-undo]").disabled = !design.history.undo;
  $("[data-redo]").disabled = !design.history.redo;
  document.body.dataset.designVersion = String(Number(document.body.dataset.designVersion || 0) + 1);
  state.applyMs = state.applyMs.slice(-199).concat([performance.now() - started]);  // for benchmarks
});

socket.on("load_progress", ({ done, total, source }) => {
  const box = $("[data-load-progress]");
  box.hidden = done >= total;
  $("[data-load-bar]").style.width = `${Math.round((100 * done) / Math.max(total, 1))}%`;
  $("[data-load-text]").textContent = `loading ${source}: ${done}/${total}`;
});

socket.on("error", (error) => {
  const panel = error.group_id ? $(`[data-group-id="${CSS.escape(error.group_id)}"]`) : null;
  const field = error.field || "group";
  if (field === "backbone") { $("[data-load-progress]").hidden = true; showError(document, "backbone", error.message); return; }
  if (field === "layers" || field === "node") {
    // at the layer box it came from, when the tree shows it; else at the groups
    const item = error.node_path && document.querySelector(`[data-tree] [data-node-path="${CSS.escape(error.node_path)}"]`);
    const box = item && item.querySelector(':scope > .row [data-error="layers"]');
    if (box) showError(item.firstElementChild, "layers", error.message);
    else showError(document, "group", error.message);
    return;
  }
  showError(panel || document, panel ? field : (field === "dtype" ? "dtype" : "group"), error.message);
});

socket.on("connect_error", (error) => showError(document, "group", `not connected: ${error.message}`));

// --- backbone picker -------------------------------------------------------------------------

async function backbones() {
  if (!state.backbones) state.backbones = await (await fetch("/api/backbones")).json();
  return state.backbones;
}

$("[data-backbone-kind]").addEventListener("change", async (event) => {
  const kind = event.target.value;
  const input = $("[data-backbone-input]");
  input.disabled = kind === "default";
  input.value = "";
  const options = $("[data-backbone-options]");
  const list = await backbones();
  const values = kind === "catalog" ? list.catalog.map((c) => c.name) : kind === "arch" ? list.architectures : [];
  options.replaceChildren(...values.map((value) => Object.assign(document.createElement("option"), { value })));
  input.placeholder = { catalog: "e.g. llama-3.1-405b", arch: "e.g. mixtral", dir: "/path/to/model", default: "" }[kind];
  if (kind !== "default") input.focus();
});

$("[data-backbone-form]").addEventListener("submit", (event) => {
  event.preventDefault();
  showError(document, "backbone", "");
  const kind = $("[data-backbone-kind]").value;
  const value = $("[data-backbone-input]").value.trim();
  if (kind !== "default" && !value) { showError(document, "backbone", "type a name or a path first"); return; }
  const source = { default: "minilm", catalog: `catalog:${value}`, arch: `arch:${value}`, dir: value }[kind];
  send("load_backbone", { source });
});

// --- search, dtype, groups -------------------------------------------------------------------

// The filter box speaks the expressions' grammar (plus class names), evaluated by the engine; only
// the answer to the latest text is shown.
let searchCount = 0;
let searchTimer = null;
async function applySearch() {
  const text = $("[data-tree-search]").value.trim();
  const mine = ++searchCount;
  if (!text) { tree.show(null); showError(document, "search", ""); return; }
  try {
    const found = await request("GET", `/api/tree/filter?q=${encodeURIComponent(text)}`);
    if (mine !== searchCount) return;
    tree.show(found.nodes);
    showError(document, "search", "");
  } catch (error) {
    if (mine === searchCount) showError(document, "search", error.message);
  }
}
$("[data-tree-search]").addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(applySearch, 120);
});
$("[data-dtype]").addEventListener("change", (event) => send("set_dtype", { dtype: event.target.value }));
$("[data-memory-open]").addEventListener("click", () => planner.open());
$("[data-add-group]").addEventListener("click", () => send("add_group", { method: "lora" }));
$("[data-undo]").addEventListener("click", () => send("undo", {}));
$("[data-redo]").addEventListener("click", () => send("redo", {}));
document.addEventListener("keydown", (event) => {
  // Ctrl+Z / Ctrl+Shift+Z undo design edits; inside a text field they stay the field's own
  const typing = event.target.closest("input, textarea, select, [contenteditable]");
  if (typing || !(event.ctrlKey || event.metaKey) || event.key.toLowerCase() !== "z") return;
  event.preventDefault();
  send(event.shiftKey ? "redo" : "undo", {});
});
$("[data-quick-picks]").addEventListener("click", (event) => {
  const pick = event.target.closest("[data-quick-pick]");
  if (pick && state.activeId) {
    send("set_expressions", { group_id: state.activeId, expressions: pick.dataset.quickPick.split(","), roles: true });
  }
});

// --- build, export, import -------------------------------------------------------------------

// REST calls act on this tab's design: its session id goes in a header
async function request(method, url, body) {
  const headers = { "Content-Type": "application/json", "X-Delta-Tab": tabId() || "" };
  const text = body === undefined || typeof body === "string" ? body : JSON.stringify(body);
  const response = await fetch(url, { method, headers, body: text });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}
const postJSON = (url, body) => request("POST", url, body);

// PEFT's default targets over the tree, and how they differ from this design
async function showPeftDefaults() {
  for (const node of document.querySelectorAll("[data-tree] [data-peft-default]")) node.removeAttribute("data-peft-default");
  const note = $("[data-peft-difference]");
  if (!$("[data-peft-overlay]").checked) { note.textContent = ""; return; }
  try {
    const found = await request("GET", "/api/peft-defaults");
    for (const [path, kind] of Object.entries(found.marks)) {
      const node = document.querySelector(`[data-tree] [data-node-path="${CSS.escape(path)}"]`);
      if (node) node.dataset.peftDefault = kind;
    }
    note.dataset.inDesign = found.in_design;
    note.dataset.notInDesign = found.not_in_design;
    note.dataset.designOnly = found.design_only;
    note.textContent = `${found.source}: ${found.count} modules — ${found.in_design} in this design, `
      + `${found.not_in_design} not, ${found.design_only} only in this design`;
  } catch (error) {
    note.textContent = error.message;
  }
}
$("[data-peft-overlay]").addEventListener("change", showPeftDefaults);
new DesignsView($("[data-designs-panel]"), request);
// the planner and the live memory line share one weight format (one memory model, one answer)
const planner = new PlannerView($("[data-memory-planner]"), request, (format) => send("set_dtype", { dtype: format }));

$("[data-build]").addEventListener("click", async () => {
  showError(document, "build", "");
  const result = $("[data-build-result]");
  result.textContent = "building…";
  try {
    const built = await postJSON("/api/design/build", "{}");
    result.textContent = `engine: ${exact(built.trainable)} trainable (preview ${exact(built.preview_trainable)})`;
    result.dataset.buildTrainable = built.trainable;
    result.dataset.previewTrainable = built.preview_trainable;
    renderTree($("[data-built-tree]"), built.tree.root, { checkable: false });
    $("[data-built]").hidden = false;
  } catch (error) {
    result.textContent = "";
    showError(document, "build", error.message);
  }
});

document.addEventListener("click", (event) => {
  const link = event.target.closest('[data-export][aria-disabled="true"]');
  if (link) { event.preventDefault(); showError(document, "group", link.dataset.exportReason); }
});

async function importText(text) {
  showError(document, "import", "");
  let document_;
  try {
    document_ = JSON.parse(text);
  } catch (error) {
    importFailed(`not JSON: ${error.message}`);
    return;
  }
  const wanted = document_ && document_.backbone && document_.backbone.source;
  const shown = $("[data-backbone-summary]").dataset.backboneSource;
  if (typeof wanted === "string" && shown && wanted !== shown) {
    offerSwitch(wanted, shown, text);
    return;
  }
  try {
    await postJSON("/api/design/import", text);
    $("[data-import-panel]").open = false;
  } catch (error) {
    importFailed(error.message);
  }
}

function importFailed(message) {
  $("[data-import-panel]").open = true;
  showError(document, "import", message);
}

// A design made for another backbone: say so, and offer to switch to it (the design shown now is
// kept for its backbone, so switching back restores it).
let pendingImport = null;
function offerSwitch(wanted, shown, text) {
  pendingImport = { source: wanted, text };
  $("[data-switch-text]").textContent = `This design was made for ${wanted}; the designer shows ${shown}. `
    + `Switch to ${wanted} and import it? Your design for ${shown} is kept: switching back restores it.`;
  const offer = $("[data-switch-offer]");
  offer.dataset.switchSource = wanted;
  offer.hidden = false;
  $("[data-import-panel]").open = true;
  $("[data-switch-accept]").focus();
}

function backboneShown(source) {
  return new Promise((resolve, reject) => {
    const loaded = (message) => { if (message.backbone.source === source) { stop(); resolve(); } };
    const failed = (error) => { if (error.event === "load_backbone") { stop(); reject(new Error(error.message)); } };
    const stop = () => { socket.off("backbone_loaded", loaded); socket.off("error", failed); };
    socket.on("backbone_loaded", loaded);
    socket.on("error", failed);
  });
}

$("[data-switch-accept]").addEventListener("click", async () => {
  const { source, text } = pendingImport;
  pendingImport = null;
  $("[data-switch-offer]").hidden = true;
  const shown = backboneShown(source);
  send("load_backbone", { source });
  try {
    await shown;
    await importText(text);
  } catch (error) {
    importFailed(error.message);
  }
});
$("[data-switch-cancel]").addEventListener("click", () => {
  pendingImport = null;
  $("[data-switch-offer]").hidden = true;
  showError(document, "import", "not imported: the design is for another backbone");
  $('[data-import="apply"]').focus();
});

async function exportText(kind) {
  const response = await fetch(`/api/design/export?format=${encodeURIComponent(kind)}`,
    { headers: { "X-Delta-Tab": tabId() || "" } });
  if (!response.ok) throw new Error((await response.json()).error || response.statusText);
  return response.text();
}
new ShareView($("[data-copies]"), {
  exportText,
  expressions: () => (state.design?.groups.find((g) => g.id === state.activeId)?.expressions) || [],
});

$('[data-import="file"]').addEventListener("change", async (event) => {
  const [file] = event.target.files;
  if (file) await importText(await file.text());
  event.target.value = "";
});
$('[data-import="apply"]').addEventListener("click", () => importText($('[data-import="text"]').value));
