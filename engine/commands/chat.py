"""`lora-lab chat --model M [--adapter DIR]... [--prompt TEXT]`: stream answers in the terminal.

With --prompt it answers once; without, it reads one user turn per line from stdin and keeps the history.
"""
from __future__ import annotations

import sys

from engine.chat.generation import GenerationSettings


def register(sub) -> None:
    parser = sub.add_parser("chat", help="chat with a model (and LoRA adapters) through transformers + peft")
    parser.add_argument("--model", required=True, help="model folder, .gguf file, hub id or 'demo'")
    parser.add_argument("--prompt", help="answer this once; without it, read turns from stdin")
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR",
                        help="PEFT adapter folder to load (repeatable; the last one is active)")
    parser.add_argument("--base", action="store_true", help="answer with the base model, adapters loaded but off")
    parser.add_argument("--system", help="system message")
    parser.add_argument("--device", help="torch device (default: cuda, then mps, then cpu)")
    defaults = GenerationSettings()
    # The CLI defaults are the scriptable ones issue 5 fixes (128 tokens, greedy), not the chat panel's.
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="0 disables it")
    parser.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty)
    parser.add_argument("--seed", type=int, default=None)
    parser.set_defaults(func=_chat)


def quiet_transformers() -> None:
    """A clean terminal: no weight-loading progress bar, no deprecation notices aimed at library authors (peft
    calls transformers' deprecated is_gradient_checkpointing); real errors still raise."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\.|$)")


def _chat(args) -> int:
    from engine.chat.inference import ChatEngine

    quiet_transformers()

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, top_k=args.top_k,
                                  repetition_penalty=args.repetition_penalty, seed=args.seed)
    engine = ChatEngine(device=args.device)
    engine.load(args.model)
    name = None
    for folder in args.adapter:
        name = engine.load_adapter(folder)
    engine.set_active_adapter(None if args.base else name)
    print(f"{engine.model_ref} on {engine.device}, adapter: {engine.active_adapter or 'none (base)'}",
          file=sys.stderr)

    history = [{"role": "system", "content": args.system}] if args.system else []
    turns = [args.prompt] if args.prompt is not None else (line.rstrip("\n") for line in sys.stdin)
    for turn in turns:
        if not turn.strip():
            continue
        history.append({"role": "user", "content": turn})
        stream = engine.stream_chat(history, settings)
        pieces = []
        try:
            for piece in stream:
                pieces.append(piece)
                print(piece, end="", flush=True)
        finally:
            stream.close()  # Ctrl-C: stop generating before the interpreter unwinds
        print()
        history.append({"role": "assistant", "content": "".join(pieces)})
    engine.unload()
    return 0
