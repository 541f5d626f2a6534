"""A DPO and an ORPO step against an SFT step over the same tokens, per backend (CPU always; WGSL where an adapter
exists), on a SmolLM2-135M-shaped model with random weights, LoRA r=16 on all seven projections.

The batch is B rows of T tokens: B/2 pairs (chosen rows, then rejected rows) whose first half is a shared, masked
prompt. The SFT step trains on the same rows and labels. Each kind of step runs `--steps` times after two warm-up
steps, the kinds interleaved over `--rounds` rounds so that a noisy (shared) machine penalises all alike; the
median step time of each is reported with the ratios DPO/SFT and ORPO/SFT. A DPO step costs the policy forward,
the reference forward (adapter off) and the training pass (forward + backward): about 1 + 2/3 of an SFT step where
a backward costs twice a forward; ORPO needs no reference. `dpo_cached` is a DPO step given the reference's
log-probabilities (engine.train.reference caches them per pair: every step after a run's first epoch costs this),
so it saves the reference forward.

Prints one JSON object: machine, versions, shapes, and per backend the medians and ratios.
    python bench/preference_step.py [--steps 3] [--rounds 2] [--batch-size 4] [--seq-len 256] [--quick]
                                    [--backends cpu wgpu]
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
from engine.backends.preference import PreferenceObjective  # noqa: E402
from engine.lora.config import LoraConfig  # noqa: E402

LORA = LoraConfig(rank=16, alpha=32.0)
KINDS = ("sft", "dpo", "dpo_cached", "orpo")


def pair_batch(vocab: int, rows: int, seq_len: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[rows, T]: rows/2 pairs sharing a masked prompt of T/2 tokens, answers filling the rest."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (rows, seq_len)).astype(np.int32)
    half, prompt = rows // 2, seq_len // 2
    ids[half:, :prompt] = ids[:half, :prompt]
    labels = ids.copy()
    labels[:, :prompt] = -100
    return ids, labels


def make_backend(kind: str, model_dir: Path, rows: int, seq_len: int):
    if kind == "cpu":
        from engine.backends.onnx import OnnxBackend
        return OnnxBackend(model_dir, LORA, OptimizerConfig(), rows, seq_len)
    from engine.backends.wgpu.backend import WgpuBackend
    return WgpuBackend(model_dir, LORA, OptimizerConfig(), rows, seq_len)


def step_fn(backend, kind: str, batch):
    if kind == "sft":
        return lambda: backend.train_step([batch], 1e-5, 1.0).result()
    if kind == "dpo_cached":        # the reference pass made once, outside the timed steps, as the cache does
        reference = [backend.sequence_logps(*batch, adapter=False)[0]]
        return lambda: backend.preference_step([batch], PreferenceObjective("dpo"), 1e-5, 1.0, reference).result()
    objective = PreferenceObjective(kind)
    return lambda: backend.preference_step([batch], objective, 1e-5, 1.0).result()


def bench_backend(kind: str, model_dir: Path, vocab: int, args) -> dict:
    batch = pair_batch(vocab, args.batch_size, args.seq_len)
    with make_backend(kind, model_dir, args.batch_size, args.seq_len) as backend:
        times = interleaved_times({k: step_fn(backend, k, batch) for k in KINDS}, args.rounds, args.steps)
        name = backend.name
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"backend": name, "s_per_step_median": median,
            "s_per_step_all": {k: [round(t, 4) for t in v] for k, v in times.items()},
            "ratio_dpo_over_sft": median["dpo"] / median["sft"],
            "ratio_dpo_cached_over_sft": median["dpo_cached"] / median["sft"],
            "ratio_orpo_over_sft": median["orpo"] / median["sft"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4, help="rows (two per pair); even")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--backends", nargs="+", choices=("cpu", "wgpu"), default=("cpu", "wgpu"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.batch_size % 2:
        parser.error(f"--batch-size {args.batch_size}: a preference batch holds whole pairs, so it must be even")

    import onnxruntime
    import wgpu

    config = TINY if args.quick else SMOLLM2_135M
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_random_model(config, Path(tmp) / "model")
        results = each_backend(args.backends, lambda kind: bench_backend(kind, model_dir, config["vocab_size"], args))
    print(json.dumps({
        "benchmark": "preference_step", "model": "tiny random llama" if args.quick else
        "SmolLM2-135M shape, random weights", "batch_rows": args.batch_size, "seq_len": args.seq_len,
        "tokens_per_step": args.batch_size * args.seq_len, "lora": {"rank": LORA.rank, "alpha": LORA.alpha},
        "steps_per_kind": args.steps * args.rounds,
        "machine": {"cpu": cpu_model(), "simd": cpu_flags(), "os": platform.platform(),
                    "python": platform.python_version()},
        "versions": {"onnxruntime": onnxruntime.__version__, "wgpu": wgpu.__version__, "numpy": np.__version__},
        "results": results, "goal_ratio_dpo_over_sft": 1.6}, indent=2))


if __name__ == "__main__":
    main()
