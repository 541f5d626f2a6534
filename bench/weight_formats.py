"""Memory and speed of the WGSL engine per frozen-weight format, with and without activation recompute, against
PyTorch + PEFT (bf16, with and without gradient checkpointing) measured in the same run. One JSON object.

    python bench/weight_formats.py [--quick] [--models Qwen3-0.6B ...] [--steps 3]

Model shapes are bench/memory_plan.py's (public Hugging Face configs); weights are random, made on the machine
tensor by tensor in the format under test (random bits, scales kept small: speed and memory do not depend on the
values). Ours: the bytes the backend allocated (== memory_plan, by test) and tokens/s of full training steps
(forward, backward, AdamW; r=16 on all 7 projections, T=512). PEFT: torch.cuda.max_memory_allocated over its steps
and tokens/s. Both exclude the CUDA/Vulkan context.
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

from bench.memory_plan import SHAPES, spec_of  # noqa: E402
from engine.backends.base import OptimizerConfig  # noqa: E402
from engine.backends.wgpu.buffers import formats_for, frozen_layout  # noqa: E402
from engine.backends.wgpu.memory import memory_plan  # noqa: E402
from engine.lora.config import LoraConfig  # noqa: E402
from engine.model.hf_names import EMBED_WEIGHT, FINAL_NORM_WEIGHT, LM_HEAD_WEIGHT, layer_tensor  # noqa: E402
from engine.model.weight_formats import FORMATS, WeightFormat  # noqa: E402
from engine.model.weights import StoredTensor, WeightSource  # noqa: E402

# Byte ranges of each block format's f16 scales (llama.cpp ggml-common.h), set to small values in random blocks.
F16_SCALES = {WeightFormat.Q8_0: (0, 2), WeightFormat.Q4_0: (0, 2), WeightFormat.Q4_1: (0, 4),
              WeightFormat.Q4_K: (0, 4), WeightFormat.Q5_K: (0, 4), WeightFormat.Q6_K: (208, 210)}


class RandomStored(WeightSource):
    """Random tensors of a model shape, stored in the formats a `--weights` choice holds them in."""

    def __init__(self, spec, choice: str, seed: int = 0):
        self.origin, self.rng = Path(f"random {spec.source} ({choice})"), np.random.default_rng(seed)
        format_of = formats_for(choice, {})
        self._stored = {}
        for key, tensor in frozen_layout(spec, 1 << 62, format_of).items():
            if key.startswith(("embed.", "lm_head.")):
                name = EMBED_WEIGHT if key.startswith("embed.") else LM_HEAD_WEIGHT
            elif key == "final_norm":
                name = FINAL_NORM_WEIGHT
            else:
                _, layer, short = key.split(".")
                name = layer_tensor(int(layer), short)
            self._stored[name] = StoredTensor(name, tensor.format, tensor.shape)

    def stored(self):
        return self._stored

    def raw(self, name: str) -> np.ndarray:
        t = self._stored[name]
        rows, cols = (t.shape[0], t.shape[1]) if len(t.shape) == 2 else (1, t.shape[0])
        info = FORMATS[t.format]
        if t.format == WeightFormat.F32:
            values = np.ones(cols, np.float32) if len(t.shape) == 1 else \
                (self.rng.standard_normal((rows, cols), np.float32) * 0.02)
            return values.view(np.uint8).reshape(rows, -1)
        if t.format in (WeightFormat.F16, WeightFormat.BF16):
            bits = self.rng.integers(0, 1 << 16, (rows, cols), dtype=np.uint16)
            # |w| in [2^-7, 2^-5): a random sign and mantissa under a small fixed exponent range.
            exponent = (8 if t.format == WeightFormat.F16 else 120) + (bits & 1)
            shift = 10 if t.format == WeightFormat.F16 else 7
            bits = (bits & (0x8000 | ((1 << shift) - 1))) | (exponent.astype(np.uint16) << shift)
            return bits.view(np.uint8).reshape(rows, -1)
        blocks = cols // info.block_size
        raw = self.rng.integers(0, 256, (rows, blocks, info.block_bytes), dtype=np.uint8)
        lo, hi = F16_SCALES[t.format]
        raw[:, :, lo:hi] = np.full((hi - lo) // 2, 2 ** -10, np.float16).view(np.uint8)
        return raw.reshape(rows, -1)


def ours(ctx, spec, lora, B: int, T: int, choice: str, recompute: bool, steps: int) -> dict:
    from engine.backends.wgpu.backend import WgpuBackend

    optim = OptimizerConfig()
    start = time.perf_counter()
    with WgpuBackend(spec, lora, optim, B, T, ctx=ctx, tensors=RandomStored(spec, choice), weights="stored",
                     recompute=recompute) as be:
        load_s = time.perf_counter() - start
        plan = memory_plan(spec, lora, optim, B, T, ctx.max_binding_bytes, ctx.max_workgroups, weights=choice,
                           recompute=recompute)
        ids = np.random.default_rng(0).integers(0, spec.vocab_size, (B, T)).astype(np.int32)
        batch = [(ids, ids.copy())]
        be.train_step(batch, lr=0.0, max_grad_norm=1.0).result()
        start = time.perf_counter()
        results = [be.train_step(batch, lr=1e-5, max_grad_norm=1.0) for _ in range(steps)]
        loss = results[-1].result().loss
        elapsed = time.perf_counter() - start
        return {"weights": choice, "recompute": recompute, "allocated_bytes": be.memory_bytes(),
                "planned_bytes": plan.total, "weights_bytes": plan.weights, "tokens_per_s": B * T * steps / elapsed,
                "ms_per_step": 1000 * elapsed / steps, "load_s": load_s, "loss_finite": bool(np.isfinite(loss))}


def peft_run(spec, lora, B: int, T: int, checkpointing: bool, steps: int) -> dict:
    import torch
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from bench.train_throughput import hf_config

    torch.manual_seed(0)
    config = hf_config(spec)
    config.torch_dtype = torch.bfloat16
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha,
                                                 target_modules=list(lora.targets)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, spec.vocab_size, (B, T), device="cuda")

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    out = {"mode": "bf16" + (" + checkpointing" if checkpointing else ""),
           "peak_bytes": torch.cuda.max_memory_allocated(), "tokens_per_s": B * T * steps / elapsed}
    del model, opt, params
    torch.cuda.empty_cache()
    return out


# (model, B): the configurations of ours measured on the GPU; every other (format, recompute) is memory_plan's.
RUNS = {
    ("Qwen3-0.6B", 1): [("bf16", False), ("q8", False), ("q4", True)],
    ("Qwen3-0.6B", 8): [("bf16", False), ("bf16", True)],
    ("Llama-3.2-1B", 1): [("bf16", False), ("q4", True)],
    ("Llama-3.2-1B", 8): [("bf16", True)],
    ("Qwen2.5-1.5B", 1): [("bf16", False)],
    ("Qwen2.5-1.5B", 8): [("bf16", True)],
    ("Llama-3.2-3B", 1): [("bf16", False), ("q4", True)],
    ("Llama-3.2-3B", 8): [("bf16", True)],
    ("Llama-3.1-8B", 1): [("q8", True), ("q4", True)],
    ("Llama-3.1-8B", 8): [("q4", True)],
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(SHAPES))
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-ours", action="store_true", help="PyTorch + PEFT only")
    parser.add_argument("--quick", action="store_true", help="a tiny shape on any adapter (smoke test)")
    parser.add_argument("--rows", metavar="FILE", help="also append each row to this JSON-lines file as it is done")
    args = parser.parse_args(argv)
    from engine.backends.wgpu.context import GpuContext

    ctx = GpuContext.create()
    lora = LoraConfig(rank=16, alpha=32)
    report = {"benchmark": "weight_formats", "seq_len": args.seq_len, "lora": {"rank": 16, "targets": "all 7"},
              "machine": {"adapter": ctx.label, "platform": platform.platform(), "python": platform.python_version()},
              "results": []}
    if not args.no_torch:
        import peft
        import torch
        report["machine"].update(torch=torch.__version__, peft=peft.__version__,
                                 cuda_device=torch.cuda.get_device_name())
    if args.quick:
        from engine.backends.wgpu.microbench import tiny_spec
        spec = tiny_spec()
        row = {"model": "tiny", "batch": 2, "ours": [ours(ctx, spec, lora, 2, 16, c, r, 1)
                                                      for c, r in (("bf16", False), ("q8", True), ("q4", True))]}
        report["results"].append(row)
        print(json.dumps(report, indent=1))
        return 0
    for (model, B), runs in RUNS.items():
        if model not in args.models:
            continue
        spec = spec_of(model)
        row = {"model": model, "batch": B, "planned": {
            f"{c}{' + recompute' if r else ''}": memory_plan(spec, lora, OptimizerConfig(), B, args.seq_len,
                                                             ctx.max_binding_bytes, weights=c, recompute=r).total
            for c in ("f32", "bf16", "q8", "q4") for r in (False, True)}, "ours": [], "peft": []}
        for choice, recompute in ([] if args.no_ours else runs):
            try:
                row["ours"].append(ours(ctx, spec, lora, B, args.seq_len, choice, recompute, args.steps))
            except Exception as exc:        # say what failed and go on: one shape must not lose the others
                row["ours"].append({"weights": choice, "recompute": recompute, "error": f"{type(exc).__name__}: "
                                                                                         f"{exc}"[:300]})
        if not args.no_torch:
            for checkpointing in (False, True):
                try:
                    row["peft"].append(peft_run(spec, lora, B, args.seq_len, checkpointing, args.steps))
                except Exception as exc:
                    row["peft"].append({"checkpointing": checkpointing, "error": f"{type(exc).__name__}: {exc}"[:300]})
        report["results"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if args.rows:
            with open(args.rows, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
