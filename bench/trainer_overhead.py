"""What the trainer adds per step over calling the backend directly: scheduling, data, callbacks, memory reads.

The same CPU backend (onnxruntime) on a small random Llama runs `--steps` steps twice, alternately: in a bare
loop of backend.train_step(...).result(), and through engine.train.trainer.Trainer (timed between its first and last
on_step, so backend construction, the final checkpoint and the adapter export are outside both). Prints JSON.
    python bench/trainer_overhead.py [--steps 40] [--rounds 3] [--batch-size 2] [--seq-len 64]
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

from bench.cpu_backend import TINY, write_random_model  # noqa: E402
from engine.backends.base import MemoryOptions
from engine.backends.base import OptimizerConfig  # noqa: E402
from engine.lora.config import LoraConfig  # noqa: E402
from engine.train.config import TrainConfig  # noqa: E402
from engine.train.data import ArrayBatches  # noqa: E402
from engine.train.trainer import Trainer, TrainerCallback  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()

    import onnxruntime

    from engine.backends.choose import create_backend

    lora = LoraConfig(rank=8, alpha=16)
    rng = np.random.default_rng(0)
    batches = [(ids, ids.copy()) for ids in
               (rng.integers(0, TINY["vocab_size"], (args.batch_size, args.seq_len)).astype(np.int32)
                for _ in range(8))]
    bare, trained = [], []
    with tempfile.TemporaryDirectory() as tmp:
        model = write_random_model(TINY, Path(tmp) / "model")

        def factory(lora_, optim, batch_size, seq_len, seed=0, init_state=None, memory=MemoryOptions()):
            return create_backend("cpu", model, lora_, optim, batch_size, seq_len, seed, init_state,
                                  memory=memory)[0]

        for round_ in range(args.rounds):
            backend = factory(lora, OptimizerConfig(), args.batch_size, args.seq_len)
            backend.train_step([batches[0]], 1e-4, 1.0).result()          # warm-up, as the trainer's first step
            start = time.perf_counter()
            for i in range(args.steps - 1):
                backend.train_step([batches[(i + 1) % len(batches)]], 1e-4, 1.0).result()
            bare.append((time.perf_counter() - start) / (args.steps - 1))
            backend.close()

            class Clock(TrainerCallback):
                first = last = None

                def on_step(self, event):
                    now = time.perf_counter()
                    self.first = self.first or now
                    self.last = now

            clock = Clock()
            config = TrainConfig(lora=lora, batch_size=args.batch_size, seq_len=args.seq_len, lr=1e-4,
                                 max_steps=args.steps, schedule="cosine")
            Trainer(config, factory, ArrayBatches(batches), Path(tmp) / f"run{round_}", base_model="bench",
                    callback=clock).run()
            trained.append((clock.last - clock.first) / (args.steps - 1))
    bare_s, trainer_s = statistics.median(bare), statistics.median(trained)
    print(json.dumps({
        "bench": "trainer_overhead", "machine": platform.node(), "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
        "model": {k: TINY[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
        "batch": [args.batch_size, args.seq_len], "steps": args.steps, "rounds": args.rounds,
        "bare_ms_per_step": round(bare_s * 1e3, 3), "trainer_ms_per_step": round(trainer_s * 1e3, 3),
        "overhead_ms_per_step": round((trainer_s - bare_s) * 1e3, 3),
    }))


if __name__ == "__main__":
    main()
