"""Training throughput of the WGSL engine (and, where CUDA is present, PyTorch + PEFT) on a SmolLM2-135M-shaped
model with random weights: LoRA r=16 on all seven projections, T=512, B in {1, 8, 32}.

Prints one JSON object: the machine and versions, then per batch size our tokens/s, ms/step and peak engine
memory, PEFT's in fp32, bf16 autocast and bf16, and our/their ratios.
    python bench/train_throughput.py [--quick] [--steps N] [--batch-sizes 1 8 32] [--seq-len 512]
                                     [--no-torch | --torch-device cpu]
`--quick` uses a tiny model and sizes so it runs in seconds on a software adapter (a smoke test).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from engine.backends.wgpu.context import GpuContext  # noqa: E402
from engine.lora.config import LoraConfig  # noqa: E402
from engine.backends.wgpu.microbench import smollm2_135m_spec, tiny_spec, training_throughput  # noqa: E402


def hf_config(spec):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                       num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                       num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim, rms_norm_eps=spec.rms_eps,
                       rope_theta=spec.rope.theta, max_position_embeddings=spec.max_positions,
                       tie_word_embeddings=spec.tied_embeddings)


def peft_throughput(spec, lora: LoraConfig, batch_size: int, seq_len: int, steps: int, mode: str,
                    device: str = "cuda") -> dict:
    """PyTorch + PEFT: mode fp32 | bf16-autocast | bf16 (weights in bf16). AdamW, same step shape."""
    import torch
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    cuda = device == "cuda"
    model = AutoModelForCausalLM.from_config(hf_config(spec), dtype=dtype, attn_implementation="sdpa").to(device)
    model = get_peft_model(model, PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha,
                                                 target_modules=list(lora.targets)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, spec.vocab_size, (batch_size, seq_len), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=mode == "bf16-autocast"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    out = {"tokens_per_s": batch_size * seq_len * steps / elapsed, "ms_per_step": 1000 * elapsed / steps,
           "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None}
    del model, opt
    if cuda:
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes (smoke test)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch + PEFT comparison")
    parser.add_argument("--torch-device", default=None,
                        help="compare with PyTorch on this device (default: cuda when available, else none)")
    args = parser.parse_args(argv)
    spec = tiny_spec() if args.quick else smollm2_135m_spec()
    batch_sizes = args.batch_sizes or ([1, 2] if args.quick else [1, 8, 32])
    seq_len = args.seq_len or (16 if args.quick else 512)
    steps = args.steps or (2 if args.quick else 10)
    lora = LoraConfig(rank=16, alpha=32)

    ctx = GpuContext.create()
    import wgpu
    report = {"benchmark": "train_throughput", "model": spec.source, "lora": {"rank": lora.rank,
              "targets": list(lora.targets)}, "seq_len": seq_len, "steps": steps,
              "machine": {"adapter": ctx.label, "backend": ctx.adapter.info.get("backend_type"),
                          "platform": platform.platform(), "python": platform.python_version(),
                          "wgpu": wgpu.__version__, "numpy": np.__version__}, "results": []}
    torch_device = None
    if not args.no_torch:
        try:
            import peft
            import torch
            torch_device = args.torch_device or ("cuda" if torch.cuda.is_available() else None)
            report["machine"].update(torch=torch.__version__, peft=peft.__version__, torch_device=torch_device)
            if torch_device == "cuda":
                report["machine"]["cuda_device"] = torch.cuda.get_device_name()
        except ImportError:
            pass
    for batch_size in batch_sizes:
        ours = training_throughput(ctx, spec, lora, batch_size, seq_len, steps=steps)
        row = {"batch_size": batch_size, "ours": ours}
        if torch_device:
            for mode in ("fp32", "bf16-autocast", "bf16"):
                theirs = peft_throughput(spec, lora, batch_size, seq_len, steps, mode, torch_device)
                row[f"peft_{mode}"] = theirs
                row[f"ratio_vs_peft_{mode}"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
        report["results"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
