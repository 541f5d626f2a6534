"""Training throughput and memory of Gemma-3- and Phi-4-mini-shaped models: the WGSL engine against PyTorch + PEFT
in bf16.

The models are built here from transformers configs with random weights (Gemma-3-270M's and Gemma-3-1B's shapes:
a 262k vocabulary, head_dim 256, one KV head, five sliding-window layers per global one, window 512), saved in
bf16 as the published checkpoints are, and trained for a few steps with LoRA r=16 on all seven projections at
each batch size (Phi-4-mini: its four, the fused qkv_proj and gate_up_proj among them; 200k vocabulary, 96 of each
head's 128 dims rotary with longrope). Ours holds the frozen matrices in f32 and in bf16 (--weights); PEFT runs the bf16 model with
transformers' default attention (sdpa for Gemma 3). Memory: ours is the engine's own allocation (WgpuBackend.memory_bytes, which equals its plan),
PEFT's is torch.cuda.max_memory_allocated over the timed steps.

Prints one JSON object: the machine and versions, then per model and batch size our tokens/s, ms/step and
bytes per weight format, PEFT bf16's, and the ratios.
    python bench/architectures.py [--quick] [--models gemma3-270m gemma3-1b phi4-mini] [--batch-sizes 1 8]
        [--seq-len 512] [--steps N] [--weights f32 bf16] [--no-torch]
`--quick` builds tiny Gemma 3, Gemma 2 and Phi-4-mini models (sequences longer than their windows, Gemma 2's soft
caps, Phi-4-mini's partial rotary past its longrope original length)
and runs in a minute on a software adapter, PEFT on the CPU: a smoke test of this script, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from engine.backends.base import OptimizerConfig  # noqa: E402
from engine.lora.config import LoraConfig, fit_targets, init_lora_state  # noqa: E402

# Gemma3TextConfig arguments of the published models (their config.json), for random weights of the same shape.
GEMMA3_SHAPES = {
    "gemma3-270m": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
                        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                        query_pre_attn_scalar=256, sliding_window=512, rope_theta=1_000_000.0,
                        rope_local_base_freq=10_000.0, max_position_embeddings=32768, tie_word_embeddings=True),
    "gemma3-1b": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                      num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                      query_pre_attn_scalar=256, sliding_window=512, rope_theta=1_000_000.0,
                      rope_local_base_freq=10_000.0, max_position_embeddings=32768, tie_word_embeddings=True),
}
# Phi3Config arguments of microsoft/Phi-4-mini-instruct's config.json; its longrope factors are 48 numbers per
# rotary pair, here a smooth stand-in of the same length (the speed does not depend on their values).
PHI_SHAPES = {
    "phi4-mini": dict(model_type="phi3", vocab_size=200064, hidden_size=3072, intermediate_size=8192,
                      num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8, partial_rotary_factor=0.75,
                      rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                       "short_factor": [1.0 + 0.02 * i for i in range(48)],
                                       "long_factor": [1.0 + 0.5 * i for i in range(48)]},
                      original_max_position_embeddings=4096, max_position_embeddings=131072, sliding_window=262144,
                      rms_norm_eps=1e-5, tie_word_embeddings=True),
}
SHAPES = {**GEMMA3_SHAPES, **PHI_SHAPES}
QUICK_MODELS = ("gemma3", "gemma2", "phi4mini")     # bench/tiny_models.py TINY_CONFIGS


def build_model(name: str, folder: Path, quick: bool) -> Path:
    """A random model of `name`'s shape saved (config + safetensors) under folder."""
    if quick:
        from bench.tiny_models import make_model
        make_model(name, folder)
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(SHAPES[name])
    model_type = config.pop("model_type")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, initializer_range=0.02, **config),
                                             dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def ours(ctx, model_dir: Path, lora: LoraConfig, batch_size: int, seq_len: int, steps: int, weights: str) -> dict:
    """Tokens/s, ms/step and engine bytes of full training steps (AdamW, clipping), after one warm-up step."""
    from engine.backends.wgpu.backend import WgpuBackend
    from engine.model.spec import load_model_spec

    spec = load_model_spec(model_dir)
    ids = np.random.default_rng(0).integers(0, spec.vocab_size, (batch_size, seq_len)).astype(np.int32)
    with WgpuBackend(model_dir, lora, OptimizerConfig(), batch_size, seq_len, ctx=ctx, weights=weights,
                     lora_state=init_lora_state(spec, lora, 0)) as backend:
        backend.train_step([(ids, ids)], 1e-4, 1.0).result()
        start = time.perf_counter()
        pending = [backend.train_step([(ids, ids)], 1e-4, 1.0) for _ in range(steps)]
        last = pending[-1].result()
        elapsed = time.perf_counter() - start
        memory = backend.memory_bytes()
    return {"tokens_per_s": batch_size * seq_len * steps / elapsed, "ms_per_step": 1000 * elapsed / steps,
            "engine_bytes": memory, "last_loss": last.loss}


def peft_bf16(model_dir: Path, lora: LoraConfig, batch_size: int, seq_len: int, steps: int, device: str) -> dict:
    """PyTorch + PEFT on the bf16 model, the same LoRA, AdamW and clipping."""
    import torch
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from engine.model.spec import load_model_spec

    cuda = device == "cuda"
    lora = fit_targets(load_model_spec(model_dir), lora)     # Phi-3's fused projections, as ours trains them
    # transformers' default attention: sdpa for Gemma 3, eager for Gemma 2 (sdpa cannot soft-cap).
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device)
    attention = model.config._attn_implementation
    model = get_peft_model(model, PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha,
                                                 target_modules=list(lora.targets)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, model.config.vocab_size,
                                                             (batch_size, seq_len))).to(device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    out = {"tokens_per_s": batch_size * seq_len * steps / elapsed, "ms_per_step": 1000 * elapsed / steps,
           "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None, "last_loss": loss.item(),
           "attention": attention}
    return out


def free_torch_memory(device: str) -> None:
    """Return the finished PEFT run's CUDA memory, so the next run's peak is its own."""
    import gc

    import torch
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def machine(ctx, torch_device: str | None) -> dict:
    import wgpu

    info = {"adapter": ctx.label, "backend": ctx.adapter.info.get("backend_type"), "platform": platform.platform(),
            "python": platform.python_version(), "wgpu": wgpu.__version__, "numpy": np.__version__}
    if torch_device:
        import peft
        import torch
        import transformers
        info.update(torch=torch.__version__, peft=peft.__version__, transformers=transformers.__version__,
                    torch_device=torch_device)
        if torch_device == "cuda":
            info["cuda_device"] = torch.cuda.get_device_name()
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny Gemma 3 / Gemma 2 / Phi-4-mini models (smoke test)")
    parser.add_argument("--models", nargs="+", default=None, choices=list(SHAPES) + list(QUICK_MODELS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--weights", nargs="+", default=["f32", "bf16"], help="our frozen-matrix formats")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch + PEFT comparison")
    args = parser.parse_args(argv)
    models = args.models or (list(QUICK_MODELS) if args.quick else list(GEMMA3_SHAPES))
    if args.quick != all(m in QUICK_MODELS for m in models):
        parser.error(f"--quick runs {', '.join(QUICK_MODELS)}; without it: {', '.join(SHAPES)}")
    batch_sizes = args.batch_sizes or ([1, 2] if args.quick else [1, 8])
    seq_len = args.seq_len or (24 if args.quick else 512)
    steps = args.steps or (2 if args.quick else 10)
    lora = LoraConfig(rank=16, alpha=32)

    from engine.backends.wgpu.context import GpuContext

    ctx = GpuContext.create()
    torch_device = None
    if not args.no_torch:
        import torch
        torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"benchmark": "architectures", "lora": {"rank": lora.rank, "targets": list(lora.targets)},
              "seq_len": seq_len, "steps": steps, "quick": args.quick, "machine": machine(ctx, torch_device),
              "results": []}
    with tempfile.TemporaryDirectory(prefix="bench-arch-") as tmp:
        for name in models:
            model_dir = build_model(name, Path(tmp) / name, args.quick)
            for batch_size in batch_sizes:
                row = {"model": name, "batch_size": batch_size}
                for weights in args.weights:
                    row[f"ours_{weights}"] = ours(ctx, model_dir, lora, batch_size, seq_len, steps, weights)
                if torch_device:
                    theirs = peft_bf16(model_dir, lora, batch_size, seq_len, steps, torch_device)
                    free_torch_memory(torch_device)
                    row["peft_bf16"] = theirs
                    for weights in args.weights:
                        mine = row[f"ours_{weights}"]
                        row[f"speed_ratio_{weights}_vs_peft_bf16"] = mine["tokens_per_s"] / theirs["tokens_per_s"]
                        if theirs["peak_bytes"]:
                            row[f"memory_ratio_{weights}_vs_peft_bf16"] = mine["engine_bytes"] / theirs["peak_bytes"]
                report["results"].append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
