"""`lora-lab backends MODEL`: measure the training backends on this machine for a model and batch shape."""
from __future__ import annotations

import argparse
import json
import sys

from engine.backends.base import OptimizerConfig
from engine.backends.choose import BACKEND_KINDS, create_backend, parse_backend_kind
from engine.lora.config import LoraConfig


def backend_kind(value: str) -> str:
    """argparse type for --backend (the trainer's option uses it too)."""
    try:
        parse_backend_kind(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return value


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", type=backend_kind, default="auto", metavar="KIND",
                        help=f"training backend: {' | '.join(BACKEND_KINDS)} (default auto: measure and pick "
                             "the fastest; software adapters such as lavapipe only when named)")


def register(sub) -> None:
    parser = sub.add_parser("backends", help="measure the training backends (GPU adapters, CPU) for a model")
    parser.add_argument("model", help="a Hugging Face folder, .gguf file or hub id")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per candidate (after two warm-up steps)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    add_backend_argument(parser)
    parser.set_defaults(func=_backends)


def _backends(args) -> int:
    from engine.model.references import resolve_model

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    model_dir = resolve_model(args.model, log=lambda m: print(m, file=sys.stderr))
    lora = LoraConfig(rank=args.rank, alpha=2.0 * args.rank)
    backend, choice = create_backend(args.backend, model_dir, lora, OptimizerConfig(), args.batch_size,
                                     args.seq_len, measure_steps=args.steps)
    with backend:
        if choice is None:   # an explicit backend: measure just that one
            from engine.backends.choose import measure
            seconds = measure(backend, args.steps)
            report = {"chosen": args.backend, "name": backend.name, "seconds_per_step": seconds,
                      "tokens_per_s": args.batch_size * args.seq_len / seconds}
            lines = [f"backend: {backend.name}: {report['tokens_per_s']:,.1f} tokens/s "
                     f"on [{args.batch_size}, {args.seq_len}]"]
        else:
            report, lines = choice.to_dict(), choice.lines()
    print(json.dumps(report, indent=2) if args.json else "\n".join(lines))
    return 0
