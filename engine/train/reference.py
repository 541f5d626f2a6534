"""DPO's reference log-probabilities: a forward pass of the base model (the adapter off) per micro-batch, or
computed once per pair and reused.

The reference never changes during a run, so a row's reference S (the sum of its completion log-probabilities,
engine.backends.preference) is the same every time the row is seen: in every epoch, and at every validation. The
cache keeps S per row, keyed by the row's exact tokens and labels (a pair is its two rows), filled the first time
a micro-batch holding the row is seen: the cached run makes the same reference passes as the per-step one in its
first epoch and none after it, so it never costs more passes; it holds a 16-byte key and a float per row (about a
hundred bytes with Python's dict overhead: 10 MB for 50,000 pairs).

Exactness: a row's S does not depend on the other rows of its micro-batch (attention and the LM head work within a
row; tests/train/test_reference.py checks that cached and per-step runs give identical losses), and a resumed run
starts with an empty cache that fills with the values a forward pass gives again, so resume stays exact.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np

REFERENCE_MODES = ("auto", "cached", "per-step")


def choose_reference_mode(requested: str, total_steps: int, grad_accum: int, batches_per_epoch: int,
                          evaluations: int) -> str:
    """cached or per-step. `auto` caches when some row is seen more than once: training past one epoch, or the
    validation pairs evaluated more than once; otherwise each row's reference pass happens once either way and
    the cache would only hold memory."""
    if requested not in REFERENCE_MODES:
        raise ValueError(f"reference_logps {requested!r} is unknown; choose from {', '.join(REFERENCE_MODES)}")
    if requested != "auto":
        return requested
    repeats = total_steps * grad_accum > batches_per_epoch or evaluations > 1
    return "cached" if repeats else "per-step"


def describe_reference(mode: str) -> str:
    """The run log's line about the reference, as the README explains it."""
    if mode == "cached":
        return ("DPO reference: the base model (adapter off); its log-probabilities are computed once per pair, the "
                "first time the pair is seen, and reused (the reference never changes)")
    return "DPO reference: the base model (adapter off), a forward pass for every micro-batch"


class ReferenceLogps:
    """reference(input_ids, labels) -> the reference S per row [B] float64, from `forward` (a backend's
    sequence_logps with adapter=False) every time, or once per row when `cached`."""

    def __init__(self, forward: Callable[[np.ndarray, np.ndarray], np.ndarray], cached: bool):
        self._forward, self.cached = forward, cached
        self._rows: dict[bytes, float] = {}
        self.passes = 0              # reference forward passes made (for tests and the run summary)

    def __call__(self, input_ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
        if not self.cached:
            return self._run(input_ids, labels)
        keys = [_row_key(i, l) for i, l in zip(input_ids, labels)]
        if all(k in self._rows for k in keys):
            return np.array([self._rows[k] for k in keys], np.float64)
        # A row not seen yet: the whole micro-batch's pass, exactly what the per-step mode would compute now.
        values = self._run(input_ids, labels)
        for k, v in zip(keys, values):
            self._rows.setdefault(k, float(v))
        return values

    def _run(self, input_ids, labels) -> np.ndarray:
        self.passes += 1
        return np.asarray(self._forward(input_ids, labels), np.float64)


def _row_key(ids: np.ndarray, labels: np.ndarray) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(ids, np.int32).tobytes())
    h.update(np.ascontiguousarray(labels, np.int32).tobytes())
    return h.digest()
