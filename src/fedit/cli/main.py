"""The ``fedit`` command: assembles one module per command, ``fedit.cli.<name>``, whose
``register(subparsers)`` adds its parser (setting ``run``) and whose ``run(args)`` does the work.
Adding a command is one entry in :data:`COMMANDS`."""

from __future__ import annotations

import importlib
import sys

from fedit.cli import common
from fedit.cli import progress as progress_cli
from fedit.errors import FeditError

# In the order ``fedit --help`` lists them.
COMMANDS = ["edit", "apply", "revert", "export", "stats", "eval", "trace", "datasets", "hparams", "demo", "fed",
            "collab", "ui", "train"]


def build_parser() -> common.Parser:
    from fedit import __version__

    ap = common.Parser(prog="fedit", description="Edit the factual knowledge of language models.",
                       formatter_class=common.HelpFormatter)
    ap.add_argument("--version", action="version", version=f"fedit {__version__}")
    ap.add_argument("--json", action="store_true", dest="json_first",
                    help="the same as the command's --json, given before the command")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"fedit.cli.{name}").register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run ``fedit ARGV``; returns the exit code (0 ok, 2 bad input, 1 failure)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    as_json = "--json" in argv
    try:
        args = build_parser().parse_args(argv)
    except common.UsageError as e:
        return common.fail(e, as_json)
    args.json = args.json or args.json_first
    common.configure(args)
    try:
        with progress_cli.reporting_for(args):  # tqdm bars on stderr unless --json / --quiet
            return args.run(args)
    except FeditError as e:
        return common.fail(e, args.json)
    except Exception as e:  # noqa: BLE001 - under --json the one JSON object on stdout is the error
        if not args.json:
            raise
        import traceback

        traceback.print_exc(file=sys.stderr)
        return common.fail(e, True)


if __name__ == "__main__":
    sys.exit(main())
