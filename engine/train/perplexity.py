"""Perplexity of a model (with or without an adapter) on a token stream, by strided sliding windows.

This follows Hugging Face's perplexity guide: windows of `window` tokens start every `stride` tokens, and each
window scores only the tokens the previous window did not (the overlap is context, labelled −100), so every
token after the first is predicted once, with up to `window − stride` tokens of context before it. The guide
weights each window's mean loss by an approximate count (`valid − batch`); we sum the exact token
cross-entropies the backend returns, so the result is the true per-token mean.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.backends.base import IGNORE_LABEL, TrainingBackend


@dataclass(frozen=True)
class Perplexity:
    loss: float          # mean token cross-entropy (nats)
    perplexity: float
    tokens: int          # tokens scored
    windows: int

    def to_json(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens}


def windows(n_tokens: int, window: int, stride: int):
    """(begin, end, scored) per window: tokens [begin, end) are fed, the last `scored` of them are scored."""
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"perplexity needs window >= 2 and 1 <= stride <= window, got window {window}, "
                         f"stride {stride}")
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        yield begin, end, end - prev_end
        prev_end = end
        if end == n_tokens:
            break


def strided_perplexity(backend: TrainingBackend, input_ids: np.ndarray, labels: np.ndarray | None = None,
                       window: int | None = None, stride: int | None = None,
                       progress=None) -> Perplexity:
    """Perplexity over one token stream `input_ids` [N]; `labels` [N] (−100: not scored) defaults to the ids."""
    ids = np.asarray(input_ids, np.int32).reshape(-1)
    labels = ids.copy() if labels is None else np.asarray(labels, np.int32).reshape(-1)
    if labels.shape != ids.shape:
        raise ValueError(f"labels {labels.shape} and input_ids {ids.shape} differ in length")
    if ids.size < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, the data has {ids.size}")
    window = window or backend.seq_len
    if window > backend.seq_len:
        raise ValueError(f"window {window} exceeds the backend's sequence length {backend.seq_len}")
    stride = stride or max(1, window // 2)
    total, count, n_windows = 0.0, 0, 0
    spans = list(windows(ids.size, window, stride))
    for begin, end, scored in spans:
        target = labels[begin:end].copy()
        target[:-scored] = IGNORE_LABEL
        s, n = backend.eval_loss(ids[None, begin:end], target[None])
        total, count, n_windows = total + s, count + n, n_windows + 1
        if progress is not None:
            progress(n_windows, len(spans))
    if count == 0:
        raise ValueError("no token of the data is scored (every label is masked)")
    loss = total / count
    return Perplexity(loss=loss, perplexity=math.exp(loss) if loss < 700 else math.inf, tokens=count,
                      windows=n_windows)
