"""The ``segmote`` command. Sub-commands are plugged in through the ``segmote.commands``
entry-point group (each entry is ``register(subparsers)``), so this module never imports the
pipeline's Ray or the plugin's Qt."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points
from typing import Sequence

__all__ = ["main", "build_parser"]

log = logging.getLogger("segmote")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segmote", description="SegMoTE medical image segmentation (SAM + MoTE + PPT)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in sorted(entry_points(group="segmote.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as exc:  # an optional extra is not installed
            unavailable = sub.add_parser(ep.name, help=f"(unavailable: {exc.name} not installed)")
            unavailable.set_defaults(func=_missing(ep.name, exc))
            continue
        register(sub)
    return parser


def _missing(name: str, exc: ImportError):
    def run(args: argparse.Namespace) -> int:
        log.error("'segmote %s' needs an optional dependency that is not installed (%s); "
                  "install it with pip install 'segmote[all]'", name, exc)
        return 2
    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)  # -v: INFO, -vv: DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
