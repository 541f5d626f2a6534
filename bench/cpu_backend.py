"""CPU training throughput: our ONNX Runtime backend against PyTorch + PEFT (fp32), same threads, same step.

A SmolLM2-135M-shaped model with random weights (hidden 576, 30 layers, 9 heads / 3 KV, MLP 1536, vocab 49152,
tied), LoRA r=16 alpha=32 on all seven projections, AdamW, clipping at 1.0, B=1, T=256 by default. Each side
runs in its own process (so neither's idle worker threads spin on the other's cores) for two warm-up steps and
`--steps` timed steps; the two alternate for `--rounds` rounds so that a noisy (shared) machine penalises both
alike, and the median step time of each is reported.

Prints one JSON object: machine, versions, threads, both tokens/s and ours/PEFT.
    python bench/cpu_backend.py [--steps 5] [--rounds 2] [--threads N] [--batch-size 1] [--seq-len 256]
                                [--model FOLDER] [--quick]
`--quick` uses a tiny model (a smoke test that runs in seconds).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from engine.backends.base import OptimizerConfig  # noqa: E402
from engine.lora.config import LoraConfig  # noqa: E402

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                    max_position_embeddings=8192, tie_word_embeddings=True)
TINY = dict(SMOLLM2_135M, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def cpu_model() -> str:
    """The CPU's model name (not through engine.backends.hardware, which needs wgpu: this bench runs without it)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
        return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    except (OSError, StopIteration):
        return []


def write_random_model(config: dict, folder: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=torch.float32).save_pretrained(folder)
    return folder


def peft_stepper(model_dir: Path, lora: LoraConfig, ids: np.ndarray):
    import torch
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(base, PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                                                target_modules=list(lora.targets)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.from_numpy(ids.astype(np.int64))

    def step():
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)
    return step


def ours_stepper(model_dir: Path, lora: LoraConfig, ids: np.ndarray, threads: int):
    from engine.backends.onnx import OnnxBackend

    backend = OnnxBackend(model_dir, lora, OptimizerConfig(), ids.shape[0], ids.shape[1], threads=threads)
    batch = [(ids.astype(np.int32), ids.astype(np.int32))]
    return backend, lambda: backend.train_step(batch, lr=1e-4, max_grad_norm=1.0).result().loss


def timed(step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def run_side(side: str, model_dir: Path, batch_size: int, seq_len: int, steps: int, threads: int,
             vocab: int) -> dict:
    """One side in this process: build, warm up, time `steps` steps."""
    import torch

    torch.set_num_threads(threads)
    lora = LoraConfig(rank=16, alpha=32.0)
    ids = np.random.default_rng(0).integers(0, vocab, (batch_size, seq_len)).astype(np.int64)
    # Two warm-up steps on each side: onnxruntime's arena still grows in its second run at longer sequences
    # (B=1, T=1024: 4.8 s, then 3.7 s a step), as engine.backends.choose.measure notes.
    if side == "ours":
        backend, step = ours_stepper(model_dir, lora, ids, threads)
    else:
        backend, step = None, peft_stepper(model_dir, lora, ids)
    first = step()
    step()
    memory = backend.memory_bytes() if backend else None
    return {"first_loss": first, "times": timed(step, steps), "memory_bytes": memory}


def spawn_side(side: str, model_dir: Path, args, threads: int, vocab: int) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--model", str(model_dir), "--steps", str(args.steps),
           "--threads", str(threads), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--vocab", str(vocab)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="default: the cores this process may use")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--model", type=Path, default=None, help="a HF folder instead of the random model")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--side", choices=("ours", "peft"), help=argparse.SUPPRESS)   # internal: one side
    parser.add_argument("--vocab", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    from engine.backends.hardware import cpu_threads

    threads = args.threads or cpu_threads()
    if args.side:
        print(json.dumps(run_side(args.side, args.model, args.batch_size, args.seq_len, args.steps, threads,
                                  args.vocab)))
        return

    import onnxruntime
    import peft
    import torch
    import transformers

    config = TINY if args.quick else SMOLLM2_135M
    times = {"ours": [], "peft": []}
    first, memory = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or write_random_model(config, Path(tmp) / "model")
        vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
        for _ in range(args.rounds):
            for side in ("ours", "peft"):
                result = spawn_side(side, Path(model_dir), args, threads, vocab)
                times[side] += result["times"]
                first[side] = result["first_loss"]
                memory = result["memory_bytes"] if side == "ours" else memory
    tokens = args.batch_size * args.seq_len
    median = {k: statistics.median(v) for k, v in times.items()}
    lora = LoraConfig(rank=16, alpha=32.0)
    result = {
        "benchmark": "cpu_backend", "model": str(args.model) if args.model else
        ("tiny random llama" if args.quick else "SmolLM2-135M shape, random weights"),
        "batch_size": args.batch_size, "seq_len": args.seq_len, "lora": {"rank": lora.rank, "alpha": lora.alpha,
                                                                        "targets": list(lora.targets)},
        "threads": threads, "steps_per_side": args.steps * args.rounds,
        "machine": {"cpu": cpu_model(), "usable_cores": cpu_threads(), "simd": cpu_flags(),
                    "os": platform.platform(), "python": platform.python_version()},
        "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "numpy": np.__version__},
        "first_step_loss": first,
        "ours": {"tokens_per_s": tokens / median["ours"], "s_per_step_median": median["ours"],
                 "s_per_step_all": [round(t, 4) for t in times["ours"]], "memory_bytes": memory},
        "peft_fp32": {"tokens_per_s": tokens / median["peft"], "s_per_step_median": median["peft"],
                      "s_per_step_all": [round(t, 4) for t in times["peft"]]},
        "ratio_ours_over_peft": median["peft"] / median["ours"],
        "goal_ratio": 1.5,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
