"""`lora-lab eval`: perplexity of a base model, with or without an adapter, on a file (strided windows)."""
from __future__ import annotations

import json
import sys


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


def evaluate(model: str, data, adapter: str | None = None, seq_len: int = 512, stride: int | None = None,
             mask_prompt: bool | None = None, backend: str = "auto", factory=None, progress=None):
    """The Perplexity of `model` (+ `adapter`) on the files `data`."""
    from engine.adapter_io import import_adapter
    from engine.backend import OptimizerConfig
    from engine.lora import LoraConfig, init_lora_state
    from engine.model_spec import load_model_spec
    from engine.perplexity import strided_perplexity
    from engine.runs import backend_factory, eval_stream, resolve_base

    model_dir, _ = resolve_base(model)
    spec = load_model_spec(model_dir)
    if not 2 <= seq_len <= spec.max_positions:
        raise ValueError(f"seq-len must be between 2 and the model's {spec.max_positions} positions, got {seq_len}")
    if adapter:
        lora, state, _ = import_adapter(adapter, spec)
    else:
        # The base alone: the smallest adapter, with B = 0 so its output is exactly the base model's.
        lora = LoraConfig(rank=1, alpha=1.0, targets=("q_proj",))
        state = init_lora_state(spec, lora)
    ids, labels = eval_stream(data, model_dir, mask_prompt)
    window = min(seq_len, ids.size)
    spec.check_sequence_length(window)
    make = factory or backend_factory(backend, model_dir)
    with make(lora, OptimizerConfig(), 1, window, seed=0, init_state=state) as engine:
        return strided_perplexity(engine, ids, labels, window=window, stride=min(stride or window // 2 or 1, window),
                                  progress=progress)


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
        print(json.dumps(result.to_json()))
    else:
        print(f"loss {result.loss:.4f}  perplexity {result.perplexity:.4f}  ({result.tokens} tokens, "
              f"{result.windows} windows)")
    return 0
