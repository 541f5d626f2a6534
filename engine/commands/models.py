"""`lora-lab models pull-demo | resolve REF`."""
from __future__ import annotations

import sys

from engine.model import references as models


def register(sub) -> None:
    parser = sub.add_parser("models", help="fetch the demo model, resolve model references")
    verbs = parser.add_subparsers(dest="verb", required=True)
    pull = verbs.add_parser("pull-demo", help="download SmolLM2-135M-Instruct once and print its folder")
    pull.add_argument("--force", action="store_true", help="download and convert again")
    pull.set_defaults(func=_pull_demo)
    resolve = verbs.add_parser("resolve", help="turn a folder, .gguf or hub id into a local HF folder")
    resolve.add_argument("ref")
    resolve.set_defaults(func=_resolve)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)   # stdout carries only the folder, for scripts


def _pull_demo(args) -> int:
    print(models.pull_demo(force=args.force, log=_log))
    return 0


def _resolve(args) -> int:
    print(models.resolve_model(args.ref, log=_log))
    return 0
