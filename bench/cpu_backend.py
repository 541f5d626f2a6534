"""CPU training throughput: our ONNX Runtime backend against PyTorch + PEFT (fp32), same threads, same step.

A SmolLM2-135M-shaped model with random weights (hidden 576, 30 layers, 9 heads / 3 KV, MLP 1536, vocab 49152,
tied), LoRA r=16 alpha=32 on all seven projections, AdamW, clipping at 1.0, B=1, T=256 by default. Each side
runs one warm-up step, then `--steps` timed steps; the two are measured in alternating rounds so that a noisy
(shared) machine penalises both alike, and the median step time of each is reported.

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
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from engine.backend import OptimizerConfig  # noqa: E402
from engine.lora import LoraConfig  # noqa: E402

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                    max_position_embeddings=8192, tie_word_embeddings=True)
TINY = dict(SMOLLM2_135M, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


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
    from engine.onnx_backend import OnnxBackend

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="default: the cores this process may use")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--model", type=Path, default=None, help="a HF folder instead of the random model")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()

    import onnxruntime
    import peft
    import torch
    import transformers

    from engine.hardware import cpu_model
    from engine.onnx_backend.session import cpu_threads

    threads = args.threads or cpu_threads()
    torch.set_num_threads(threads)
    lora = LoraConfig(rank=16, alpha=32.0)
    ids = np.random.default_rng(0).integers(0, 512 if args.quick else 49152,
                                            (args.batch_size, args.seq_len)).astype(np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or write_random_model(TINY if args.quick else SMOLLM2_135M, Path(tmp) / "model")
        backend, ours = ours_stepper(model_dir, lora, ids, threads)
        theirs = peft_stepper(model_dir, lora, ids)
        first = {"ours": ours(), "peft": theirs()}      # warm-up; also the same loss on both sides
        times = {"ours": [], "peft": []}
        for _ in range(args.rounds):
            times["ours"] += timed(ours, args.steps)
            times["peft"] += timed(theirs, args.steps)
        memory = backend.memory_bytes()
        backend.close()
    tokens = args.batch_size * args.seq_len
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "cpu_backend", "model": str(args.model) if args.model else
        ("tiny random llama" if args.quick else "SmolLM2-135M shape, random weights"),
        "batch_size": args.batch_size, "seq_len": args.seq_len, "lora": {"rank": lora.rank, "alpha": lora.alpha,
                                                                        "targets": list(lora.targets)},
        "threads": threads, "steps": args.steps * args.rounds,
        "machine": {"cpu": cpu_model(), "logical_cores": cpu_threads(), "os": platform.platform(),
                    "python": platform.python_version()},
        "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "numpy": np.__version__},
        "first_step_loss": first,
        "ours": {"tokens_per_s": tokens / median["ours"], "s_per_step_median": median["ours"],
                 "s_per_step_all": times["ours"], "memory_bytes": memory},
        "peft_fp32": {"tokens_per_s": tokens / median["peft"], "s_per_step_median": median["peft"],
                      "s_per_step_all": times["peft"]},
        "ratio_ours_over_peft": median["peft"] / median["ours"],
        "goal_ratio": 1.5,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
