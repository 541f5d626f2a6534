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

    def epoch_batches(self, epoch: int, seed: int, start: int = 0) -> Iterator[Batch]:
        """The epoch's batches from index `start` on, in the order `seed` fixes; the same arguments give the
        same batches."""


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

    def epoch_batches(self, epoch: int, seed: int, start: int = 0) -> Iterator[Batch]:
        order = (np.random.default_rng([seed, epoch]).permutation(self.batches_per_epoch) if self.shuffle
                 else np.arange(self.batches_per_epoch))
        for index in order[start:]:
            yield self._batches[index]


class CorpusBatches:
    """The training split of an engine.corpus Corpus, batched by engine.corpus.batches (shuffled per epoch)."""

    def __init__(self, sequences, batch_size: int, seq_len: int, pad_id: int, shuffle: bool = True):
        from engine.corpus import batch_count

        if not sequences:
            raise ValueError("no training sequences: nothing in the data files was usable for training")
        self._sequences, self._batch_size, self._seq_len, self._pad_id = sequences, batch_size, seq_len, pad_id
        self.shuffle = shuffle
        self.batches_per_epoch = batch_count(len(sequences), batch_size)
        self.fingerprint = fingerprint_arrays(
            [np.array([batch_size, seq_len, pad_id, int(shuffle)])]
            + [a for s in sequences for a in (s.input_ids, s.labels)])

    def epoch_batches(self, epoch: int, seed: int, start: int = 0) -> Iterator[Batch]:
        from engine.corpus import batches

        return batches(self._sequences, self._batch_size, self._seq_len, self._pad_id, self.shuffle, seed, epoch,
                       start)


def corpus_val_batches(sequences, batch_size: int, seq_len: int, pad_id: int) -> list[Batch]:
    """The validation split as fixed, unshuffled batches."""
    from engine.corpus import batches

    return list(batches(sequences, batch_size, seq_len, pad_id, shuffle=False)) if sequences else []


class PreferenceBatches:
    """The training pairs of an engine.corpus.preferences PreferenceCorpus, `batch_size // 2` pairs a batch in the
    concatenated layout (chosen rows, then rejected rows), shuffled per epoch."""

    def __init__(self, corpus, batch_size: int, shuffle: bool = True):
        from engine.corpus import batch_count

        if not corpus.train:
            raise ValueError("no training pairs: nothing in the data files was a usable preference pair")
        self._corpus, self._pairs, self.shuffle = corpus, batch_size // 2, shuffle
        self.batches_per_epoch = batch_count(len(corpus.train), self._pairs)
        self.fingerprint = fingerprint_arrays(
            [np.array([batch_size, corpus.config.seq_len, corpus.tokenizer.pad_id, int(shuffle)])]
            + [a for p in corpus.train for a in (p.chosen_ids, p.chosen_labels, p.rejected_ids, p.rejected_labels)])

    def epoch_batches(self, epoch: int, seed: int, start: int = 0) -> Iterator[Batch]:
        return self._corpus.batches(self._pairs, shuffle=self.shuffle, epoch=epoch, start_batch=start, seed=seed)


def preference_val_batches(corpus, batch_size: int) -> list[Batch]:
    """The validation pairs as fixed, unshuffled batches of batch_size // 2 pairs."""
    return list(corpus.batches(batch_size // 2, split="val", shuffle=False)) if corpus.val else []
