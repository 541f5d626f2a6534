"""An AdaLoRA step against LoRA steps of the same rank budget, per backend (CPU always; WGSL where an adapter
exists), on a SmolLM2-135M-shaped model with random weights, all seven projections adapted.

Kinds, each on its own backend, interleaved over `--rounds` rounds so a noisy (shared) machine penalises all alike:
  adalora      AdaLoRA init_r → target_r (engine.train.adaptive over a LoRA-of-init_r backend), inside the budget
               phase with a masking every step (deltaT 1): gradients from the device, then chain rule, regulariser,
               clip, host AdamW, importance EMAs, top-k masking, and the A_eff/B upload, all on the host;
  lora_target  plain LoRA of r = target_r (the budget AdaLoRA ends with);
  lora_init    plain LoRA of r = init_r (the budget AdaLoRA starts with, the rank its backend runs);
  grads_init   the LoRA-of-init_r backend's `gradients` alone (forward + backward + read-back, no update);
  host         the AdaLoRA step's host part alone (AdaptiveRankBackend.apply_gradients on saved gradients: chain
               rule, regulariser, clip, AdamW, EMAs, masking, and the A_eff/B upload to the device).
Prints one JSON object: machine, versions, shapes, per backend the medians and the ratios adalora/lora_target and
adalora/lora_init.
    python bench/adalora_step.py [--steps 3] [--rounds 2] [--batch-size 4] [--seq-len 256] [--init-r 12]
                                 [--target-r 8] [--quick] [--backends cpu wgpu]
`--quick` uses a tiny model (a smoke test that runs in seconds).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.report import each_backend, interleaved_times  # noqa: E402
from bench.cpu_backend import SMOLLM2_135M, TINY, cpu_flags, cpu_model, write_random_model  # noqa: E402
from engine.backends.base import OptimizerConfig  # noqa: E402
from engine.lora.adalora import AdaLoraSettings  # noqa: E402
from engine.lora.config import LoraConfig  # noqa: E402
from engine.train.adaptive import AdaptiveRankBackend  # noqa: E402

KINDS = ("adalora", "lora_target", "lora_init", "grads_init", "host")
ALPHA = 32.0


def make_backend(kind: str, model_dir: Path, rank: int, rows: int, seq_len: int):
    lora = LoraConfig(rank=rank, alpha=ALPHA)
    if kind == "cpu":
        from engine.backends.onnx import OnnxBackend
        return OnnxBackend(model_dir, lora, OptimizerConfig(), rows, seq_len)
    from engine.backends.wgpu.backend import WgpuBackend
    return WgpuBackend(model_dir, lora, OptimizerConfig(), rows, seq_len)


def batch(vocab: int, rows: int, seq_len: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(seed).integers(0, vocab, (rows, seq_len)).astype(np.int32)
    return ids, ids.copy()


def bench_backend(kind: str, model_dir: Path, vocab: int, args) -> dict:
    data = [batch(vocab, args.batch_size, args.seq_len)]
    # A schedule long enough that every timed step is in the budget phase and masks (deltaT 1).
    settings = AdaLoraSettings(init_r=args.init_r, target_r=args.target_r, tinit=1, tfinal=0, deltaT=1,
                               total_step=10_000)
    backends = {
        "adalora": AdaptiveRankBackend(make_backend(kind, model_dir, args.init_r, args.batch_size, args.seq_len),
                                       settings, OptimizerConfig()),
        "lora_target": make_backend(kind, model_dir, args.target_r, args.batch_size, args.seq_len),
        "lora_init": make_backend(kind, model_dir, args.init_r, args.batch_size, args.seq_len),
    }
    steps = {k: (lambda b=b: b.train_step(data, 1e-4, 1.0).result()) for k, b in backends.items()}
    steps["grads_init"] = lambda: backends["lora_init"].gradients(data)
    loss, tokens, grads = backends["adalora"].inner.gradients(data)
    steps["host"] = lambda: backends["adalora"].apply_gradients(loss, tokens, grads, 1e-4, 1.0).result()
    try:
        times = interleaved_times({k: steps[k] for k in KINDS}, args.rounds, args.steps)
        name = backends["lora_init"].name
        ranks = int(backends["adalora"].allocator.ranks().sum())
    finally:
        for b in backends.values():
            b.close()
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"backend": name, "s_per_step_median": median,
            "s_per_step_all": {k: [round(t, 4) for t in v] for k, v in times.items()},
            "ratio_adalora_over_lora_target": median["adalora"] / median["lora_target"],
            "ratio_adalora_over_lora_init": median["adalora"] / median["lora_init"],
            "host_share_of_adalora": median["host"] / median["adalora"], "adalora_total_rank_at_end": ranks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--init-r", type=int, default=12)
    parser.add_argument("--target-r", type=int, default=8)
    parser.add_argument("--backends", nargs="+", choices=("cpu", "wgpu"), default=("cpu", "wgpu"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()

    import onnxruntime

    config = TINY if args.quick else SMOLLM2_135M
    if args.quick:
        args.seq_len = min(args.seq_len, 32)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_random_model(config, Path(tmp) / "model")
        results = each_backend(args.backends, lambda kind: bench_backend(kind, model_dir, config["vocab_size"], args))
    print(json.dumps({
        "benchmark": "adalora_step", "model": "tiny random llama" if args.quick else
        "SmolLM2-135M shape, random weights", "batch_rows": args.batch_size, "seq_len": args.seq_len,
        "tokens_per_step": args.batch_size * args.seq_len,
        "adalora": {"init_r": args.init_r, "target_r": args.target_r, "alpha": ALPHA, "deltaT": 1},
        "steps_per_kind": args.steps * args.rounds,
        "machine": {"cpu": cpu_model(), "simd": cpu_flags(), "os": platform.platform(),
                    "python": platform.python_version()},
        "versions": {"onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
        "results": results}, indent=2))


if __name__ == "__main__":
    main()
