// Small DOM helpers. Text always goes in through textContent, so module names are never HTML.

export function el(tag, attributes = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === false || value === null || value === undefined) continue;
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of [].concat(children)) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

export function $(selector, root = document) {
  return root.querySelector(selector);
}

export function $$(selector, root = document) {
  return [...root.querySelectorAll(selector)];
}

export function humanCount(value) {
  const units = [["T", 1e12], ["B", 1e9], ["M", 1e6], ["K", 1e3]];
  for (const [unit, scale] of units) {
    if (value >= scale) return `${(value / scale).toFixed(1)}${unit}`;
  }
  return String(value);
}

export function exact(value) {
  return Number(value).toLocaleString("en-US");
}

export function humanBytes(value) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let size = value;
  let unit = 0;
  while (size >= 1024 && unit < units.length - 1) {
    size /= 1024;
    unit += 1;
  }
  return `${unit ? size.toFixed(1) : size} ${units[unit]}`;
}

// Show `message` in the element carrying data-error="field" inside `root` (empty clears it).
export function showError(root, field, message) {
  const target = root.querySelector(`[data-error="${field}"]`) || document.querySelector('[data-error="group"]');
  if (!target) return;
  target.textContent = message || "";
  target.classList.toggle("visible", Boolean(message));
}

export function clearErrors(root = document) {
  for (const node of root.querySelectorAll("[data-error]")) {
    node.textContent = "";
    node.classList.remove("visible");
  }
}
