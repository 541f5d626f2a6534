"""`lora-lab eval`: perplexity of a base model, with or without an adapter, on a file (strided windows)."""
from __future__ import annotations

import sys

from engine import jsonout
from engine.train.evaluate import evaluate


def register(subparsers):
    p = subparsers.add_parser("eval", help="perplexity of a model (and adapter) on a file",
                              description="Perplexity by strided sliding windows, as in Hugging Face's perplexity "
                                          "guide; prints loss, perplexity and the tokens scored.")
    p.add_argument("--model", required=True, metavar="M", help="model folder, .gguf file, hub id or 'demo'")
    p.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter folder to apply")
    p.add_argument("--data", required=True, action="append", metavar="F", help="text or corpus file(s)")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default %(default)s)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default seq-len/2)")
    p.add_argument("--no-mask-prompt", action="store_true", help="score prompts too in chat/instruction data")
    p.add_argument("--backend", default="auto", metavar="auto|cpu|wgpu|wgpu:NAME",
                   help="training backend; auto measures the candidates and takes the fastest (default auto)")
    p.add_argument("--json", action="store_true", help='print {"loss", "perplexity", "tokens"}')
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    show = sys.stderr.isatty() and not args.json

    def progress(done, total):
        if show:
            print(f"\rwindow {done}/{total}", end="", file=sys.stderr, flush=True)

    result = evaluate(args.model, args.data, args.adapter, args.seq_len, args.stride,
                      False if args.no_mask_prompt else None, args.backend, progress=progress)
    if show:
        print(file=sys.stderr)
    if args.json:
        print(jsonout.dumps(result.to_json()))
    else:
        print(f"loss {result.loss:.4f}  perplexity {result.perplexity:.4f}  ({result.tokens} tokens, "
              f"{result.windows} windows)")
    return 0
