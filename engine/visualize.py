"""Render the collapsed module tree with ``rich``: names, classes, shapes, counts.

Trainable, frozen and delta parts get different colours; the words stay meaningful without
colour (``frozen``, ``trainable``, ``delta``), so logs and tests read the same text.
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text
from rich.tree import Tree
from torch import nn

from engine.tree import ModuleTree, TreeNode

TRAINABLE_STYLE = "green"
FROZEN_STYLE = "grey50"
DELTA_STYLE = "bold magenta"
NAME_STYLE = "bold"
CLASS_STYLE = "cyan"


def human_count(value: int) -> str:
    """``109482240`` → ``109.5M``; small numbers stay exact."""
    for unit, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return str(value)


class Visualization:
    """Structure view of a model (OpenDelta's ``Visualization``), collapsed and coloured."""

    def __init__(self, model: nn.Module | ModuleTree) -> None:
        tree = model if isinstance(model, ModuleTree) else ModuleTree.from_model(model)
        self.tree = tree if tree.collapsed else tree.collapse()

    def build(self, rootname: str = "root", keep_non_params: bool = True) -> Tree:
        """The rich Tree of the collapsed structure, without printing it; ``keep_non_params=False``
        leaves out modules with no parameters in their subtree (dropouts, activations)."""
        root = self.tree.root
        rich_tree = Tree(_label(root, root_name=rootname), guide_style="grey50")
        self._add_children(rich_tree, root, keep_non_params)
        return rich_tree

    def _add_children(self, branch: Tree, node: TreeNode, keep_non_params: bool) -> None:
        for child in node.children:
            if keep_non_params or child.total_parameters:
                self._add_children(branch.add(_label(child)), child, keep_non_params)

    def structure_graph(self, console: Console | None = None, printTree: bool = True, *,  # noqa: N803 - OpenDelta's name
                        rootname: str = "root", keep_non_params: bool = True, expand_params: bool = True) -> Tree:
        """Print the collapsed tree (unless ``printTree=False``) and return the rich Tree.

        OpenDelta's options: ``rootname``; ``keep_non_params=False`` hides parameter-free modules
        (OpenDelta's default; here everything is shown unless asked, as the designer shows it);
        ``expand_params`` is accepted for compatibility: every node lists its own parameters.
        """
        rich_tree = self.build(rootname, keep_non_params)
        if printTree:
            (console or Console()).print(rich_tree)
        return rich_tree


def _label(node: TreeNode, root_name: str = "") -> Text:
    text = Text()
    text.append(node.label or root_name, style=DELTA_STYLE if node.is_delta else NAME_STYLE)
    text.append(f" ({node.class_name})", style=CLASS_STYLE)
    for param in node.parameters:
        shape = ",".join(str(d) for d in param.shape)
        style = DELTA_STYLE if param.is_delta else (
            TRAINABLE_STYLE if param.trainable else FROZEN_STYLE
        )
        suffix = f"→{param.tied_to}" if param.tied_to else ""
        text.append(f" {param.name}[{shape}]{suffix}", style=style)
    if node.total_parameters or node.children:
        text.append(" ")
        text.append_text(_counts(node))
    if node.is_delta:
        text.append(" delta", style=DELTA_STYLE)
    return text


def _counts(node: TreeNode) -> Text:
    total, trainable = node.total_parameters, node.trainable_parameters
    each = " each" if node.is_group else ""
    if total == 0:
        return Text(f"0{each}", style=FROZEN_STYLE)
    if trainable == total:
        return Text(f"{human_count(total)}{each}", style=TRAINABLE_STYLE)
    if trainable == 0:
        return Text(f"{human_count(total)}{each} frozen", style=FROZEN_STYLE)
    text = Text(f"{human_count(total)}{each} (", style=FROZEN_STYLE)
    style = DELTA_STYLE if node.delta_parameters else TRAINABLE_STYLE
    text.append(f"{human_count(trainable)} trainable", style=style)
    text.append(")", style=FROZEN_STYLE)
    return text
