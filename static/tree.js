// Keyboard navigation of the module tree: arrows move between visible nodes, left/right fold.
const tree = document.querySelector("[data-tree]");

function visibleRows() {
  return [...tree.querySelectorAll("summary, .leaf")].filter((row) => row.offsetParent !== null);
}

function focusRow(rows, index) {
  const row = rows[Math.max(0, Math.min(rows.length - 1, index))];
  if (row) row.focus();
}

if (tree) {
  for (const leaf of tree.querySelectorAll(".leaf")) leaf.tabIndex = 0;
  tree.addEventListener("toggle", (event) => {
    const item = event.target.closest("[data-node-path]");
    if (item) item.setAttribute("aria-expanded", String(event.target.open));
  }, true);
  tree.addEventListener("keydown", (event) => {
    const rows = visibleRows();
    const index = rows.indexOf(document.activeElement);
    if (index < 0) return;
    const details = document.activeElement.parentElement;
    if (event.key === "ArrowDown") focusRow(rows, index + 1);
    else if (event.key === "ArrowUp") focusRow(rows, index - 1);
    else if (event.key === "ArrowRight" && details.tagName === "DETAILS") details.open = true;
    else if (event.key === "ArrowLeft" && details.tagName === "DETAILS") details.open = false;
    else return;
    event.preventDefault();
  });
}
