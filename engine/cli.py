"""`lora-lab`: the headless command line. Subcommands live in engine/commands/, one module per family."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from engine import commands
from engine.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-lab", description="Fine-tune LoRA adapters on your own GPU.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"engine.commands.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    name = "lora-lab"
    try:
        # Building the parser imports every command module (numpy, and through them torch or transformers for
        # some): seconds in which a Ctrl-C must end as cleanly as one during the command itself.
        parser = build_parser()
        args = parser.parse_args(argv)
        name = f"lora-lab {args.command}"
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError, PermissionError, MemoryError, OSError) as exc:
        print(f"{name}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    """The error as one line; an OSError that names no file (EFBIG under `ulimit -f`, ENOSPC from a write) gets
    the file it was about, where the raiser left it in `filename`."""
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return text


if __name__ == "__main__":
    sys.exit(main())
