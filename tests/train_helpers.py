"""Small learnable data and a recording callback for trainer tests."""
from __future__ import annotations

import numpy as np

from engine.train.data import ArrayBatches
from engine.train.trainer import TrainerCallback


def pattern_batches(vocab: int, n_batches: int, batch: int, seq: int, seed: int = 0):
    """Batches of a few repeated token patterns (learnable, so the loss can fall), the first 2 labels masked."""
    rng = np.random.default_rng(seed)
    patterns = rng.integers(4, vocab, (3, 5))
    out = []
    for _ in range(n_batches):
        rows = [np.resize(patterns[rng.integers(0, 3)], seq) for _ in range(batch)]
        ids = np.stack(rows).astype(np.int32)
        labels = ids.copy()
        labels[:, :2] = -100
        out.append((ids, labels))
    return out


def pattern_source(vocab, n_batches=3, batch=2, seq=12, seed=0, shuffle=True):
    return ArrayBatches(pattern_batches(vocab, n_batches, batch, seq, seed), shuffle=shuffle)


class Recorder(TrainerCallback):
    def __init__(self):
        self.steps, self.evals, self.checkpoints, self.finished, self.failures = [], [], [], [], []

    def on_step(self, event):
        self.steps.append(event)

    def on_eval(self, event):
        self.evals.append(event)

    def on_checkpoint(self, event):
        self.checkpoints.append(event)

    def on_finish(self, summary):
        self.finished.append(summary)

    def on_failure(self, step, message):
        self.failures.append((step, message))
