"""Where a CPU-backend training step goes: onnxruntime's own per-node profile of the training graph, summed by
kind of work, next to the wall time of the same steps and the host part (gradient norm + optimizer).

SmolLM2-135M shape with random weights (as bench/cpu_backend.py), B=1, T=256, r=16 on all 7 projections by
default. Steps before `--skip` are not counted (the first run faults its arena in). Prints one JSON object.
    python bench/cpu_profile.py [--steps 4] [--skip 2] [--threads N] [--batch-size 1] [--seq-len 256] [--quick]

"Frozen GEMMs" are the products with the model's own weights (forward and input-gradient, LM head included):
the floating-point work PyTorch + PEFT does too, at the same FLOP count. Their GFLOP/s is what the CPU's fp32
GEMM reaches; everything else is what a backend can still save.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from cpu_backend import SMOLLM2_135M, TINY, cpu_model, write_random_model  # noqa: E402
from engine.backends.base import OptimizerConfig  # noqa: E402
from engine.lora.config import LoraConfig  # noqa: E402

# Output-name hints (engine/backends/onnx) of the GEMMs with frozen weights.
FROZEN_GEMM_HINTS = {"lin", "dx", "logits", "dlm"}
LORA_GEMM_HINTS = {"lora_u", "lora_y", "dU", "dA", "dB", "dx_lora"}


def frozen_gemm_flops(config: dict, tokens: int) -> float:
    """2·N·(weights) forward plus the same for the input gradient, less layer 0's q/k/v input gradient."""
    h, f, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    hd = h // config["num_attention_heads"]
    qkv = h * (h + 2 * config["num_key_value_heads"] * hd)
    per_layer = qkv + h * h + 3 * h * f
    lm_head = h * config["vocab_size"]
    forward = 2 * tokens * (layers * per_layer + lm_head)
    return 2 * forward - 2 * tokens * qkv


def kind_of(op: str, hint: str) -> str:
    if op in ("Gemm", "MatMul", "FusedMatMul"):
        if hint in FROZEN_GEMM_HINTS:
            return "frozen GEMMs"
        if hint in LORA_GEMM_HINTS:
            return "LoRA GEMMs"
        return "attention GEMMs"
    return "elementwise, norms, layout"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--skip", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="a tiny model: a smoke test in seconds")
    args = parser.parse_args()

    from engine.backends.onnx import OnnxBackend
    from engine.backends.hardware import cpu_threads

    config = TINY if args.quick else SMOLLM2_135M
    threads = args.threads or cpu_threads()
    tokens = args.batch_size * args.seq_len
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_random_model(config, Path(tmp) / "model")
        backend = OnnxBackend(model_dir, LoraConfig(rank=16, alpha=32.0), OptimizerConfig(), args.batch_size,
                              args.seq_len, threads=threads, profile_prefix=str(Path(tmp) / "ort"))
        ids = np.random.default_rng(0).integers(0, config["vocab_size"], (args.batch_size, args.seq_len))
        batch = [(ids, ids)]
        walls = []
        for _ in range(args.skip + args.steps):
            start = time.perf_counter()
            result = backend.train_step(batch, lr=1e-4, max_grad_norm=1.0).result()
            walls.append(time.perf_counter() - start)
        trace = json.loads(Path(backend.end_profiling()).read_text())
        node_hint = {node.name: node.output[0].rsplit("_", 1)[0]
                     for node in backend._graphs.build("train").nodes}
    runs = sorted(e["ts"] for e in trace if e.get("name") == "model_run")
    counted_from = runs[args.skip]
    by_kind, by_op = collections.Counter(), collections.Counter()
    for event in trace:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time") or event["ts"] < counted_from:
            continue
        op = event["args"]["op_name"]
        hint = node_hint.get(event["name"].removesuffix("_kernel_time"), "")
        by_kind[kind_of(op, hint)] += event["dur"] / 1e3 / args.steps
        by_op[op] += event["dur"] / 1e3 / args.steps
    run_ms = [e["dur"] / 1e3 for e in trace if e.get("name") == "model_run" and e["ts"] >= counted_from]
    step_ms = statistics.median(walls[args.skip:]) * 1e3
    flops = frozen_gemm_flops(config, tokens)
    print(json.dumps({
        "benchmark": "cpu_profile", "model": "tiny random llama" if args.quick else "SmolLM2-135M shape",
        "batch_size": args.batch_size, "seq_len": args.seq_len, "threads": threads, "cpu": cpu_model(),
        "steps_counted": args.steps, "last_loss": result.loss,
        "step_ms_median": round(step_ms, 1),
        "graph_run_ms_median": round(statistics.median(run_ms), 1),
        "host_ms_median (norm, optimizer, binding)": round(step_ms - statistics.median(run_ms), 1),
        "kernel_ms_by_kind": {k: round(v, 1) for k, v in by_kind.most_common()},
        "kernel_ms_by_op": {k: round(v, 1) for k, v in by_op.most_common()},
        "frozen_gemm_gflop": round(flops / 1e9, 2),
        "frozen_gemm_gflops_per_s": round(flops / 1e9 / (by_kind["frozen GEMMs"] / 1e3), 1),
        "note": "kernel times are onnxruntime's own (profiling adds a little to each); the step is wall time",
    }, indent=2))


if __name__ == "__main__":
    main()
