"""Training throughput of the WGSL engine against PyTorch + PEFT in the same process, at the model shapes of
issue 16 with random weights built on the machine (no downloads): LoRA r=16 on all seven projections, T=512,
SmolLM2-135M at B ∈ {1, 8, 32}, Qwen3-0.6B, Llama-3.2-1B, Qwen2.5-1.5B and Llama-3.2-3B at B ∈ {1, 8}.

Ours runs in each `--ours` configuration (frozen-weight format / math: f32/f32 is the reference, bf16/f16 the
half-precision math of kernels.linear_f16); PEFT in fp32, bf16 autocast and bf16 weights. Each measurement is
guarded (a failure is recorded and the run goes on) and printed as one JSON line on stdout as soon as it is
done, so a run cut short keeps what it measured; the summary (per model and batch: every figure, our best
configuration, the best PEFT mode and the ratio) is the last line. `--time-budget` stops starting new
measurements after that many seconds (the rest are recorded as skipped).
    python bench/train_throughput.py [--quick] [--models ...] [--ours f32/f32 bf16/f16] [--steps N]
                                     [--time-budget S] [--no-torch | --torch-device cpu] [--out FILE]
`--quick` uses a tiny model and sizes so it runs in seconds on a software adapter (a smoke test).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.report import JsonLines  # noqa: E402
from bench.memory_plan import spec_of  # noqa: E402
from engine.backends.wgpu.context import GpuContext  # noqa: E402
from engine.backends.wgpu.microbench import (random_weights, smollm2_135m_spec, tiny_spec,  # noqa: E402
                                             training_throughput)
from engine.lora.config import LoraConfig  # noqa: E402

MODELS = ("SmolLM2-135M", "Qwen3-0.6B", "Llama-3.2-1B", "Qwen2.5-1.5B", "Llama-3.2-3B")
BATCHES = {"SmolLM2-135M": (1, 8, 32)}      # every other model: (1, 8)
OURS = ("f32/f32", "bf16/f16")              # weights/math
PEFT_MODES = ("fp32", "bf16-autocast", "bf16")
POOL = 1 << 24                              # random values tiled into the big models' weights (microbench)
TARGET_SECONDS = 2.0                        # timed per measurement (after its warm-up step), about


def model_spec(name: str):
    if name == "SmolLM2-135M":
        return smollm2_135m_spec()
    if name == "tiny":
        return tiny_spec()
    return spec_of(name)


def hf_config(spec):
    """A Llama config of the spec's shape (what bench/job_one_gpu.sh builds; see arch_config for the real
    architecture)."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                       num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                       num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim, rms_norm_eps=spec.rms_eps,
                       rope_theta=spec.rope.theta, max_position_embeddings=spec.max_positions,
                       tie_word_embeddings=spec.tied_embeddings)


def arch_config(spec):
    """The transformers config of the spec's own architecture (llama, qwen2 with q/k/v biases, qwen3 with
    q/k norms), so PEFT trains the same computation as ours."""
    from transformers import AutoConfig
    if spec.model_type not in ("llama", "qwen2", "qwen3"):
        raise ValueError(f"no PEFT comparison for model type {spec.model_type!r}")
    extra = {} if spec.model_type == "qwen2" else {"head_dim": spec.head_dim}
    return AutoConfig.for_model(spec.model_type, vocab_size=spec.vocab_size, hidden_size=spec.hidden,
                                intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
                                num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                                rms_norm_eps=spec.rms_eps, rope_theta=spec.rope.theta,
                                max_position_embeddings=min(spec.max_positions, 8192),
                                tie_word_embeddings=spec.tied_embeddings, **extra)


def peft_throughput(spec, lora: LoraConfig, batch_size: int, seq_len: int, steps: int, mode: str,
                    device: str = "cuda", target_seconds: float | None = None) -> dict:
    """PyTorch + PEFT: mode fp32 | bf16-autocast | bf16 (weights in bf16). AdamW, same step shape; the model is
    initialised on the device (CPU initialisation of billions of weights takes minutes)."""
    import torch

    try:
        return _peft_steps(spec, lora, batch_size, seq_len, steps, mode, device, target_seconds)
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()     # the model is gone with _peft_steps' frame: give its memory back


def _peft_steps(spec, lora, batch_size, seq_len, steps, mode, device, target_seconds) -> dict:
    import torch
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    cuda = device == "cuda"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(arch_config(spec), dtype=dtype, attn_implementation="sdpa")
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

    start = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm = time.perf_counter() - start
    if target_seconds:
        steps = max(min(2, steps), min(steps, int(target_seconds / warm)))
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": batch_size * seq_len * steps / elapsed, "ms_per_step": 1000 * elapsed / steps,
            "steps": steps, "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def machine(ctx, torch_device) -> dict:
    import wgpu
    info = {"adapter": ctx.label, "backend": ctx.adapter.info.get("backend_type"),
            "driver": ctx.adapter.info.get("description", ""), "shader_f16": ctx.has_f16,
            "platform": platform.platform(), "python": platform.python_version(), "wgpu": wgpu.__version__,
            "numpy": np.__version__}
    try:
        import peft
        import torch
        info.update(torch=torch.__version__, peft=peft.__version__, torch_device=torch_device)
        if torch_device == "cuda":
            info["cuda_device"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return info


def guarded(fn, *args, **kw) -> dict:
    try:
        return fn(*args, **kw)
    except Exception as exc:  # noqa: BLE001 — one failure (out of memory, a refusal) must not lose the rest
        return {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=3)[-800:]}


def summary(rows: list[dict]) -> list[dict]:
    """Per (model, batch): our best configuration, the best PEFT mode, the ratio."""
    cells: dict = {}
    for row in rows:
        if "tokens_per_s" in row.get("result", {}):
            cells.setdefault((row["model"], row["batch_size"]), []).append(row)
    out = []
    for (model, batch), found in cells.items():
        ours = [r for r in found if r["who"] == "ours"]
        theirs = [r for r in found if r["who"] == "peft"]
        cell = {"model": model, "batch_size": batch,
                **{f"{r['who']} {r['config']}": round(r["result"]["tokens_per_s"], 1) for r in found}}
        if ours:
            best = max(ours, key=lambda r: r["result"]["tokens_per_s"])
            cell["ours_best"] = best["config"]
        if theirs:
            best_peft = max(theirs, key=lambda r: r["result"]["tokens_per_s"])
            cell["peft_best"] = best_peft["config"]
        if ours and theirs:
            cell["ratio_best_vs_best_peft"] = best["result"]["tokens_per_s"] / best_peft["result"]["tokens_per_s"]
            ref = [r for r in ours if r["config"] == "f32/f32"]
            if ref:
                cell["ratio_f32_vs_best_peft"] = (ref[0]["result"]["tokens_per_s"]
                                                  / best_peft["result"]["tokens_per_s"])
        out.append(cell)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes (smoke test)")
    parser.add_argument("--models", nargs="+", default=None, choices=MODELS + ("tiny",))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="the same for every model")
    parser.add_argument("--ours", nargs="+", default=None, metavar="WEIGHTS/MATH",
                        help=f"our configurations (default {' '.join(OURS)})")
    parser.add_argument("--peft-modes", nargs="*", default=list(PEFT_MODES), choices=PEFT_MODES)
    parser.add_argument("--steps", type=int, default=None, help="timed steps at most (default 5; fewer where a "
                        f"step is slow: about {TARGET_SECONDS:g} s per measurement)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--time-budget", type=float, default=None, metavar="S",
                        help="start no new measurement after S seconds (the rest are recorded as skipped)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch + PEFT comparison")
    parser.add_argument("--torch-device", default=None,
                        help="compare with PyTorch on this device (default: cuda when available, else none)")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    models = args.models or (["tiny"] if args.quick else list(MODELS))
    seq_len = args.seq_len or (16 if args.quick else 512)
    steps = args.steps or (2 if args.quick else 5)
    ours_configs = args.ours or (["f32/f32", "bf16/f32", "bf16/f16"] if args.quick else list(OURS))
    lora = LoraConfig(rank=16, alpha=32)
    t0 = time.perf_counter()
    lines = JsonLines(args.out)
    emit = lines.emit

    ctx = GpuContext.create()
    torch_device = None
    if not args.no_torch:
        try:
            import peft  # noqa: F401
            import torch
            torch_device = args.torch_device or ("cuda" if torch.cuda.is_available() else None)
        except ImportError:
            pass
    emit({"benchmark": "train_throughput", "seq_len": seq_len, "steps_at_most": steps,
          "lora": {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets)},
          "ours_configs": ours_configs, "peft_modes": args.peft_modes if torch_device else [],
          "time_budget_s": args.time_budget, "machine": machine(ctx, torch_device)})
    rows = []
    for name in models:
        spec = model_spec(name)
        batches = args.batch_sizes or ([1, 2] if args.quick else list(BATCHES.get(name, (1, 8))))
        tensors = None
        for batch_size in batches:
            jobs = [("ours", c) for c in ours_configs]
            jobs += [("peft", m) for m in (args.peft_modes if torch_device else [])]
            for who, config in jobs:
                row = {"model": name, "batch_size": batch_size, "who": who, "config": config}
                if args.time_budget is not None and time.perf_counter() - t0 > args.time_budget:
                    row["result"] = {"skipped": f"time budget {args.time_budget:g} s spent"}
                elif who == "ours":
                    if tensors is None:
                        tensors = random_weights(spec, pool=0 if args.quick else POOL)
                    weights, math = config.split("/")
                    row["result"] = guarded(training_throughput, ctx, spec, lora, batch_size, seq_len, steps=steps,
                                            tensors=tensors, weights=weights, math=math,
                                            target_seconds=None if args.quick else TARGET_SECONDS)
                else:
                    row["result"] = guarded(peft_throughput, spec, lora, batch_size, seq_len, steps, config,
                                            torch_device, None if args.quick else TARGET_SECONDS)
                row["elapsed_s"] = round(time.perf_counter() - t0, 1)
                rows.append(row)
                emit(row)
        del tensors
    emit({"summary": summary(rows), "seconds": round(time.perf_counter() - t0, 1)})
    lines.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
