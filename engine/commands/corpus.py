"""`lora-lab corpus --model M FILE... [--json]`: what training on these files would use, file by file."""
from __future__ import annotations

import json
import sys

from engine.errors import UserError
from engine.model import references as models
from engine.corpus import CorpusConfig, load_corpus, load_tokenizer


def register(subparsers):
    p = subparsers.add_parser("corpus", help="show what a training corpus holds: formats, tokens, skipped records",
                              description="Read corpus files with the model's tokenizer and print per-file "
                                          "statistics, totals and every skipped record with its line and reason.")
    p.add_argument("files", nargs="+", metavar="FILE", help=".txt .md .jsonl .json .csv files")
    p.add_argument("--model", required=True, metavar="M",
                   help="model whose tokenizer counts: a folder, a .gguf file, a hub id or 'demo'")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--seq-len", type=int, default=CorpusConfig.seq_len,
                   help="tokens per sequence (default %(default)s)")
    p.add_argument("--packing", action="store_true", help="pack several examples per sequence")
    p.add_argument("--no-mask-prompt", action="store_true", help="train on prompts too, not only on answers")
    p.add_argument("--val-fraction", type=float, default=0.0, help="fraction held out for validation")
    p.add_argument("--val-file", action="append", default=[], metavar="FILE", help="a validation-only file")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    p.add_argument("--pairs", action="store_true",
                   help="read preference pairs (records with 'chosen' and 'rejected'), as --objective dpo/orpo do")
    p.set_defaults(func=run)


def run(args) -> int:
    config = CorpusConfig(seq_len=args.seq_len, packing=args.packing,
                          mask_prompt=False if args.no_mask_prompt else None, val_fraction=args.val_fraction,
                          val_files=tuple(args.val_file), seed=args.seed)
    tokenizer = load_tokenizer(models.resolve_model(args.model, log=lambda msg: print(msg, file=sys.stderr)))
    show = sys.stderr.isatty() and not args.json

    def progress(done: int, total: int):
        if show and total:
            print(f"\rreading {100 * done / total:5.1f}%", end="", file=sys.stderr, flush=True)

    if args.pairs:
        from engine.corpus.preferences import load_preferences

        corpus = load_preferences(args.files, tokenizer, config)
    else:
        corpus = load_corpus(args.files, tokenizer, config, progress=progress)
    if show:
        print("\r" + " " * 20 + "\r", end="", file=sys.stderr)
    if args.json:
        print(json.dumps(corpus.stats.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(corpus.stats.format_text())
    if not corpus.train:
        raise UserError("no usable training data in these files (see the reasons above)")
    return 0
