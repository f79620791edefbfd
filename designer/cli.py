"""``delta-designer``: serve the designer, or inspect a backbone from the terminal.

    delta-designer [serve] [--host H] [--port P] [--backbone SOURCE] [--workspace DIR]
    delta-designer tree SOURCE
    delta-designer match SOURCE EXPR... [--exclude EXPR...]
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console

from engine import (
    DEFAULT_SOURCE,
    DeltaError,
    ModuleTree,
    Visualization,
    load_backbone,
    resolve,
)

COMMANDS = ("serve", "tree", "match")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="delta-designer", description="Design where delta modules go in a backbone model."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the web designer (the default command)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    serve.add_argument("--backbone", default=DEFAULT_SOURCE, help="backbone source (default minilm)")
    serve.add_argument("--workspace", default=None, help="directory for autosaved designs")
    serve.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="another host name the server may be addressed by (e.g. its DNS name)")

    tree = commands.add_parser("tree", help="print the collapsed module tree of a backbone")
    tree.add_argument("source", help="catalog:NAME, arch:TYPE, a directory, python:mod:factory, minilm")
    tree.add_argument("--width", type=int, default=None, help="console width")

    match = commands.add_parser("match", help="show what addressing expressions select")
    match.add_argument("source")
    match.add_argument("expressions", nargs="+", metavar="EXPR")
    match.add_argument("--exclude", nargs="+", default=[], metavar="EXPR")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] not in (*COMMANDS, "-h", "--help"):
        args_list.insert(0, "serve")
    args = build_parser().parse_args(args_list)
    console = Console(width=getattr(args, "width", None))
    try:
        if args.command == "tree":
            backbone = load_backbone(args.source, weights=False)
            Visualization(backbone.model).structure_graph(console=console)
            return 0
        if args.command == "match":
            return _match(args, console)
        return _serve(args)
    except DeltaError as error:
        Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        return 1


def _match(args: argparse.Namespace, console: Console) -> int:
    backbone = load_backbone(args.source, weights=False)
    report = resolve(ModuleTree.from_model(backbone.model), args.expressions, args.exclude)
    for expression, paths in report.matches.items():
        console.print(f"{expression}: {len(paths)} module{'s' * (len(paths) != 1)}",
                      highlight=False, markup=False)
        for path in paths:
            console.print(f"  {path}", highlight=False, markup=False)
    for expression, paths in report.excluded.items():
        console.print(f"exclude {expression}: removed {len(paths)}", highlight=False, markup=False)
    console.print(f"selected: {len(report)} module{'s' * (len(report) != 1)}", highlight=False)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from designer.app import create_app
    from designer.security import HostPolicy, is_loopback, new_token

    config = {"BACKBONE": args.backbone}
    if args.workspace:
        config["WORKSPACE"] = args.workspace
    token = None if is_loopback(args.host) else new_token()
    config["TOKEN"] = token
    config["HOST_POLICY"] = HostPolicy.for_bind(args.host, tuple(args.allow_host))

    def build() -> Any:
        app, _ = create_app(config)
        app.extensions["delta_designer"].backbones.preload(args.backbone)  # the page shows its progress
        return app

    print("Loading backbone", args.backbone, "in the background …", flush=True)
    url = f"http://{args.host}:{args.port}/" + (f"?token={token}" if token else "")
    print(f"Delta Designer serving on {url}", flush=True)
    if token is None:  # loopback: the development server is enough for one person's browser
        # SIGTERM ends the server like Ctrl+C, so exit handlers run (queued autosaves are written)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        app = build()
        app.extensions["delta_designer_socketio"].run(app, host=args.host, port=args.port,
                                                      allow_unsafe_werkzeug=True)
    else:  # beyond loopback: a production server; the token is printed once, here, never logged
        from designer.production import serve

        serve(build, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
