"""What the trainer reads: batches of (input_ids, labels) per epoch, in an order fixed by a seed.

A source is re-iterable per (epoch, seed), so the trainer's data position — epoch, batch index and the epoch's
shuffle seed — is all a checkpoint needs to continue on exactly the batch where it stopped.
"""
from __future__ import annotations

import hashlib
from typing import Iterator, Protocol, Sequence

import numpy as np

Batch = tuple[np.ndarray, np.ndarray]   # input_ids [B, T] int32, labels [B, T] int32 (−100: not counted)


class BatchSource(Protocol):
    batches_per_epoch: int
    fingerprint: str          # changes when the data changes, so a resume on other data is refused

    def epoch_batches(self, epoch: int, seed: int) -> Iterator[Batch]:
        """The epoch's batches in the order `seed` fixes; the same arguments give the same batches."""


def fingerprint_arrays(arrays) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


class ArrayBatches:
    """Ready-made batches (all [B, T]), shuffled per epoch as whole batches when `shuffle`."""

    def __init__(self, batches: Sequence[Batch], shuffle: bool = True):
        if not batches:
            raise ValueError("no training batches: the training data produced no sequences")
        self._batches = [(np.asarray(i, np.int32), np.asarray(l, np.int32)) for i, l in batches]
        self.shuffle = shuffle
        self.batches_per_epoch = len(self._batches)
        self.fingerprint = fingerprint_arrays(a for pair in self._batches for a in pair)

    def epoch_batches(self, epoch: int, seed: int) -> Iterator[Batch]:
        order = (np.random.default_rng([seed, epoch]).permutation(self.batches_per_epoch) if self.shuffle
                 else np.arange(self.batches_per_epoch))
        for index in order:
            yield self._batches[index]
