// Sharing a design: copy buttons (expressions, exports, trainer config lines, a link) and links
// that carry the design in their fragment (#design=…, never sent to any server).

import { $, showError } from "./dom.js";

const LINK_PREFIX = "#design=";
// longest link offered: browsers and chat tools cut longer URLs
export const MAX_LINK_CHARS = 16000;

function toBase64Url(text) {
  const bytes = new TextEncoder().encode(text);
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
}

function fromBase64Url(text) {
  const binary = atob(text.replaceAll("-", "+").replaceAll("_", "/"));
  return new TextDecoder().decode(Uint8Array.from(binary, (c) => c.charCodeAt(0)));
}

// The design JSON a link carries: the export without what the import recomputes anyway.
function linkDocument(exported) {
  const deltas = exported.deltas.map(({ resolved_modules, trainable_parameters, ...rest }) => rest);
  return { ...exported, deltas };
}

// The JSON text of the design in this page's link fragment, or null.
export function designInLink() {
  if (!location.hash.startsWith(LINK_PREFIX)) return null;
  try {
    return fromBase64Url(location.hash.slice(LINK_PREFIX.length));
  } catch {
    return "";  // not base64: the import reports it as not JSON
  }
}

export function forgetLink() {
  history.replaceState(null, "", location.pathname + location.search);
}

export class ShareView {
  constructor(root, { exportText, expressions }) {
    this.root = root;
    this.exportText = exportText;
    this.expressions = expressions;
    root.addEventListener("click", (event) => {
      const button = event.target.closest("[data-copy]");
      if (button) this.copy(button.dataset.copy);
    });
  }

  async text(kind) {
    if (kind === "expressions") return this.expressions().join("\n") + "\n";
    if (kind === "link") {
      const link = location.origin + location.pathname + LINK_PREFIX
        + toBase64Url(JSON.stringify(linkDocument(JSON.parse(await this.exportText("json")))));
      if (link.length > MAX_LINK_CHARS) {
        throw new Error(`this design makes a ${link.length}-character link, more than ${MAX_LINK_CHARS}; `
          + "export the JSON and share the file instead");
      }
      return link;
    }
    return this.exportText(kind);
  }

  async copy(kind) {
    showError(this.root, "copy", "");
    const status = $("[data-copy-status]", this.root);
    const shown = $("[data-copied]", this.root);
    let text;
    try {
      text = await this.text(kind);
    } catch (error) {
      status.textContent = "";
      shown.hidden = true;
      showError(this.root, "copy", error.message);
      return;
    }
    // the text is shown too: the clipboard may be refused, and people like to see what they copy
    shown.textContent = text;
    shown.hidden = false;
    shown.dataset.copied = kind;
    try {
      await navigator.clipboard.writeText(text);
      status.textContent = `copied the ${kind === "link" ? "link" : kind}`;
    } catch {
      status.textContent = "the browser refused the clipboard: select the text below and copy it";
    }
  }
}
