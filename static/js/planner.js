// The memory planner: what one GPU holds while this design trains (weights, trainable states,
// activations traced by the engine) and whether it fits. Numbers and formulas come from the server.

import { $, $$, humanBytes, showError } from "./dom.js";

const GIB = 1024 ** 3;

export class PlannerView {
  constructor(root, request, onWeightFormat) {
    this.root = root;
    this.request = request;
    this.count = 0;
    root.addEventListener("toggle", () => { if (root.open) this.plan(); });
    root.addEventListener("change", (event) => {
      if (event.target.matches('[data-plan="gpu"]')) $("[data-plan-custom]", root).hidden = event.target.value !== "custom";
      if (event.target.matches('[data-plan="weight-format"]')) onWeightFormat(event.target.value);
      if (event.target.closest("[data-plan]")) this.plan();
    });
    $("[data-plan-run]", root).addEventListener("click", () => this.plan());
  }

  // The sequence box is bounded by what the backbone reads (MiniLM: 512 positions).
  setBackbone(summary) {
    const sequence = $('[data-plan="sequence"]', this.root);
    if (summary.max_positions) {
      sequence.max = String(summary.max_positions);
      if (Number(sequence.value) > summary.max_positions) sequence.value = String(summary.max_positions);
    } else {
      sequence.removeAttribute("max");
    }
    this.plan();
  }

  // The live line's weight format (the design's): the planner shows the same one.
  setWeightFormat(format) {
    const select = $('[data-plan="weight-format"]', this.root);
    if (document.activeElement !== select) select.value = format;
  }

  open() {
    this.root.open = true;
    this.root.scrollIntoView({ block: "nearest" });
    $('[data-plan="batch"]', this.root).focus();
  }

  setup() {
    const value = (name) => $(`[data-plan="${name}"]`, this.root);
    const gpu = value("gpu").value;
    return {
      gpu_bytes: Math.round(Number(gpu === "custom" ? value("gpu-custom").value : gpu) * GIB),
      gpus: Math.trunc(Number(value("gpus").value)),
      sharding: value("sharding").value,
      weight_format: value("weight-format").value,
      optimizer: value("optimizer").value,
      batch: Math.trunc(Number(value("batch").value)),
      sequence: Math.trunc(Number(value("sequence").value)),
      checkpointing: value("checkpointing").checked,
      attention: value("attention").value,
    };
  }

  // Plan again (when the panel is open): only the answer to the latest request is shown.
  async plan() {
    if (!this.root.open) return;
    const mine = ++this.count;
    showError(this.root, "plan", "");
    this.root.dataset.planState = "planning";
    try {
      const plan = await this.request("POST", "/api/memory-plan", this.setup());
      if (mine === this.count) this.show(plan);
    } catch (error) {
      if (mine !== this.count) return;
      this.root.dataset.planState = "error";
      $("[data-plan-result]", this.root).hidden = true;
      $("[data-plan-fits]", this.root).textContent = "";
      showError(this.root, "plan", error.message);
    }
  }

  show(plan) {
    for (const row of $$("[data-plan-part]", this.root)) {
      const part = row.dataset.planPart;
      const bytes = plan[part];
      row.dataset.bytes = String(bytes);
      row.hidden = part === "gathered_layer" && !bytes;
      row.cells[1].textContent = humanBytes(bytes);
      if (plan.formula[part]) row.cells[2].textContent = plan.formula[part];
    }
    $("[data-plan-result]", this.root).hidden = false;
    const fits = $("[data-plan-fits]", this.root);
    fits.dataset.planFits = plan.fits ? "yes" : "no";
    const gpu = `${(plan.gpu_bytes / GIB).toFixed(0)} GiB GPU`;
    fits.textContent = plan.fits
      ? `fits: ${humanBytes(plan.total_per_gpu)} of each ${gpu} (${plan.gpus} GPU${plan.gpus > 1 ? "s" : ""})`
      : `does not fit: needs ${humanBytes(plan.total_per_gpu)} per GPU, a ${gpu} has ${humanBytes(plan.gpu_bytes)}`;
    this.root.dataset.planState = "ready";
  }
}
