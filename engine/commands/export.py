"""`lora-lab export`: a trained adapter as a llama.cpp/Ollama GGUF adapter, or merged into a plain HF model."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export an adapter for llama.cpp/Ollama (gguf) or as a merged model",
        description="Export a PEFT LoRA adapter. --to gguf writes a llama.cpp LoRA GGUF plus an Ollama Modelfile"
                    " and a how-to note; --to merged folds the adapter into the base (safetensors, base dtype;"
                    " bfloat16, dequantized, when the base exists only as GGUF).")
    p.add_argument("--model", required=True, help="base model: local HF folder, .gguf file or hub id")
    p.add_argument("--adapter", required=True, type=Path, help="PEFT adapter folder (adapter_config.json + weights)")
    p.add_argument("--to", required=True, choices=("gguf", "merged"), help="what to write")
    p.add_argument("--out", required=True, type=Path,
                   help="gguf: a folder (or a name ending in .gguf); merged: a new folder")
    p.add_argument("--gguf-dtype", default="f32", choices=("f32", "f16"),
                   help="GGUF tensor type: f32 is exact (default, as llama.cpp's converter), f16 half the size")
    p.add_argument("--force", action="store_true", help="replace an existing export at --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engine.export.run import ExportRequest, run_export

    request = ExportRequest(model=args.model, adapter=args.adapter, to=args.to, out=args.out,
                            gguf_dtype=args.gguf_dtype, overwrite=args.force)
    for line in run_export(request, log=lambda msg: print(msg, file=sys.stderr, flush=True)).lines:
        print(line)
    return 0
