"""The ``segmote`` command. Sub-commands are plugged in through the ``segmote.commands``
entry-point group (each entry is ``register(subparsers)``), so this module never imports the
pipeline's Ray or the plugin's Qt.

Output convention of every sub-command:

- stdout: a short summary at the end (:func:`summary`): what was written where and the
  headline figures; nothing else goes to stdout unless asked for (``--report-json``).
- stderr: progress bars (tqdm) and log records; ``WARNING`` only for something the user should
  act on or know is wrong, never for success; ``-v`` adds INFO, ``-vv`` DEBUG.
- a user error (bad argument, missing or unusable file, mismatching checkpoint) is one line
  ``segmote COMMAND: error: MESSAGE`` and exit status 2 (:func:`user_error`); ``-v`` adds the
  traceback. Arguments and input files are checked before Ray or a model starts.
- Ctrl-C: one line saying what was kept and how to resume, exit status 130.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from importlib.metadata import entry_points
from typing import Iterable, Sequence

__all__ = ["main", "build_parser", "summary", "user_error", "USER_ERRORS"]

log = logging.getLogger("segmote")

#: Exceptions that mean "the input or the arguments are wrong", not "segmote is broken": shown as
#: one line (ValueError covers CheckpointError, CohortError, ImageReadError and the mismatch
#: errors; OSError covers missing and unreadable files).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def summary(lines: Iterable[str] | str) -> None:
    """Write a command's closing summary to stdout (a headline, then indented detail lines)."""
    if isinstance(lines, str):
        lines = [lines]
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    sys.stdout.flush()


def user_error(command: str, exc: BaseException | str, verbose: int = 0) -> int:
    """Report a user error as one line on stderr (the traceback too with ``-v``); returns 2."""
    if verbose and isinstance(exc, BaseException):
        traceback.print_exception(exc, file=sys.stderr)
    sys.stderr.write(f"segmote {command}: error: {exc}\n")
    sys.stderr.flush()
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segmote", description="SegMoTE medical image segmentation (SAM + MoTE + PPT)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v: INFO and tracebacks of errors, -vv: DEBUG)")
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
        return user_error(name, f"needs an optional dependency that is not installed ({exc}); "
                                f"install it with pip install 'segmote[all]'")
    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)  # -v: INFO, -vv: DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        return user_error(args.command, exc, args.verbose)
    except KeyboardInterrupt:
        sys.stderr.write(f"segmote {args.command}: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
