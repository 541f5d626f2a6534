"""`lora-lab plan`: what a run needs on the GPU, and the weight format, recompute and micro-batch that fit it."""
from __future__ import annotations

import json
import sys

from engine.backends.base import OPTIMIZERS, OptimizerConfig
from engine.backends.hardware import gpu_memory_bytes
from engine.lora.config import LoraConfig
from engine.model.references import resolve_model
from engine.model.spec import load_model_spec
from engine.model.weight_formats import WEIGHT_CHOICES
from engine.model.weights import open_weights
from engine.train.memory_fit import fit_plan, gib, parse_bytes, usable_budget


def register(subparsers):
    p = subparsers.add_parser("plan", help="the memory a run needs and how to make it fit a GPU",
                              description="Fits a training run to a GPU's memory: the frozen weights' format, "
                                          "activation recompute and the micro-batch, with the bytes of each part. "
                                          "Refuses, with the numbers, a run that cannot fit.")
    p.add_argument("--model", required=True, metavar="M", help="model folder, .gguf file, hub id or 'demo'")
    p.add_argument("--gpu-memory", metavar="SIZE", help="the GPU's memory, e.g. 8GB (default: read from the "
                                                        "driver where it can be, else not checked)")
    p.add_argument("--weights", default="auto", choices=("auto",) + WEIGHT_CHOICES,
                   help="frozen weight format (default auto: bf16 up to ~1B parameters, else 8 or 4 bits)")
    p.add_argument("--recompute", choices=("auto", "on", "off"), default="auto", help="activation recompute")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step (micro-batch x accum)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_plan)


def run_plan(args) -> int:
    folder = resolve_model(args.model, log=lambda msg: print(msg, file=sys.stderr))
    spec = load_model_spec(folder)
    stored = {name: t.format for name, t in open_weights(folder).stored().items()}
    memory = parse_bytes(args.gpu_memory) if args.gpu_memory else gpu_memory_bytes()
    plan = fit_plan(spec, LoraConfig(rank=args.rank), OptimizerConfig(name=args.optimizer), args.batch_size,
                    args.seq_len, usable_budget(memory), weights=args.weights,
                    recompute={"auto": None, "on": True, "off": False}[args.recompute], stored=stored)
    if args.json:
        print(json.dumps({"model": str(folder), "parameters": spec.parameter_count(), "gpu_memory_bytes": memory,
                          **plan.to_dict()}))
        return 0
    print(f"{spec.model_type}, {spec.parameter_count() / 1e9:.2f} B parameters; GPU memory {gib(memory)}")
    for line in plan.lines():
        print(line)
    return 0
