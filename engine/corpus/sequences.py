"""From tokenized examples to training sequences (windows, truncation, packing), the validation split, and the
batches the trainer consumes.

Units: raw text is cut into windows of `seq_len` tokens (the last one shorter); every other example is one unit,
truncated to `seq_len`. The validation split picks units, so even one long text file can be split. Without
packing each unit is a sequence; with packing units are laid end to end, in order, without being cut, and a new
sequence starts when the next unit does not fit. An EOS (label -100) separates two packed units unless the
first already ends with EOS. `Sequence.segments` says where each unit starts, for block-diagonal attention.

Labels follow the Hugging Face convention: aligned with input_ids, not shifted. The trainer predicts token t+1
from position t and takes the loss against labels[t + 1] wherever it is not -100 (so labels[0] is never used).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from engine.backends.base import IGNORE_LABEL



@dataclass(frozen=True)
class Segment:
    start: int   # token offset of this unit in the sequence
    file: int    # index into CorpusStats.files
    line: int    # line of the record (for raw text: of the text block the window starts in)


@dataclass(frozen=True, eq=False)
class Sequence:
    input_ids: np.ndarray       # (T,) int32, T <= seq_len
    labels: np.ndarray          # (T,) int32, IGNORE_LABEL (-100) where not trained
    segments: tuple[Segment, ...]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trainable_tokens(self) -> int:
        return int(np.count_nonzero(self.labels != IGNORE_LABEL))


@dataclass(frozen=True, eq=False)
class Unit:
    ids: np.ndarray
    labels: np.ndarray
    file: int
    line: int


class Windower:
    """Consecutive windows of `seq_len` tokens over a stream of ids, fed block by block; only the unfinished
    window is held."""

    def __init__(self, seq_len: int, file: int):
        self.seq_len, self.file = seq_len, file
        self.ids: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.size, self.line = 0, 0
        self.shared = True   # labels are the ids themselves (nothing masked): keep one array, not two

    def feed(self, ids: np.ndarray, labels: np.ndarray, line: int) -> Iterator[Unit]:
        pos = 0
        block_shared = labels is ids
        while pos < len(ids):
            if self.size == 0:
                self.line = line
            self.shared = self.shared and block_shared
            take = min(self.seq_len - self.size, len(ids) - pos)
            self.ids.append(ids[pos:pos + take])
            self.labels.append(labels[pos:pos + take])
            self.size += take
            pos += take
            if self.size == self.seq_len:
                yield self._take()

    def finish(self) -> Iterator[Unit]:
        if self.size:
            yield self._take()

    def _take(self) -> Unit:
        ids = np.concatenate(self.ids)
        labels = ids if self.shared else np.concatenate(self.labels)
        self.ids, self.labels, self.size, self.shared = [], [], 0, True
        return Unit(ids, labels, self.file, self.line)


def to_sequences(units: list[Unit], seq_len: int, packing: bool, eos_id: int) -> list[Sequence]:
    """Sequences from `units`, which are consumed (the list is left empty): each unit is freed once packed, so
    packing does not need twice the corpus's memory."""
    units.reverse()   # popping from the end is O(1); reversing first keeps the order
    if not packing:
        out = []
        while units:
            u = units.pop()
            out.append(Sequence(u.ids, u.labels, (Segment(0, u.file, u.line),)))
        return out
    out: list[Sequence] = []
    ids: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    segments: list[Segment] = []
    size = 0

    def flush():
        nonlocal ids, labels, segments, size
        if ids:
            out.append(Sequence(np.concatenate(ids), np.concatenate(labels), tuple(segments)))
        ids, labels, segments, size = [], [], [], 0

    separator = np.array([eos_id], np.int32), np.array([IGNORE_LABEL], np.int32)
    while units:
        u = units.pop()
        sep = bool(ids) and int(ids[-1][-1]) != eos_id
        if size + sep + len(u.ids) > seq_len:
            flush()
            sep = False
        if sep:
            ids.append(separator[0])
            labels.append(separator[1])
            size += 1
        segments.append(Segment(size, u.file, u.line))
        ids.append(u.ids)
        labels.append(u.labels)
        size += len(u.ids)
    flush()
    return out


def validation_count(n_units: int, fraction: float) -> int:
    """How many of `n_units` examples a validation `fraction` holds out: round(n * fraction), at least one, never
    all; none when fraction is 0 or there are fewer than two."""
    if fraction <= 0 or n_units < 2:
        return 0
    return min(max(round(n_units * fraction), 1), n_units - 1)


def choose_validation(n_units: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the units held out: round(n * fraction) of them (at least one, never all), chosen by a
    seeded permutation, so the same corpus and seed always give the same split."""
    held = np.zeros(n_units, bool)
    n_val = validation_count(n_units, fraction)
    if n_val == 0:
        return held
    held[np.random.default_rng(seed).permutation(n_units)[:n_val]] = True
    return held


def batch_count(n_sequences: int, batch_size: int) -> int:
    return -(-n_sequences // batch_size)


def batch_order(n_sequences: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """The order sequences are visited in one epoch: a permutation seeded by (seed, epoch)."""
    if not shuffle:
        return np.arange(n_sequences)
    return np.random.default_rng([seed, epoch]).permutation(n_sequences)


def batches(sequences: list[Sequence], batch_size: int, seq_len: int, pad_id: int, shuffle: bool = True,
            seed: int = 0, epoch: int = 0, start_batch: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of (input_ids [B, T], labels [B, T]) int32 arrays, T = seq_len, right-padded with `pad_id` and
    labels -100. The last batch is filled up with empty rows (all -100) so every batch has the same shape.

    Deterministic in (seed, epoch); `start_batch` resumes mid-epoch exactly where batch `start_batch` begins."""
    for name, value, lo in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1), ("start_batch", start_batch, 0),
                            ("epoch", epoch, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
            raise ValueError(f"batches: {name} must be an integer >= {lo}, got {value!r}")
    longest = max((len(s) for s in sequences), default=0)
    if longest > seq_len:
        raise ValueError(f"batches: a sequence has {longest} tokens, more than seq_len {seq_len}; build the "
                         "corpus with the same seq_len")
    order = batch_order(len(sequences), shuffle, seed, epoch)
    for b in range(start_batch, batch_count(len(sequences), batch_size)):
        ids = np.full((batch_size, seq_len), pad_id, np.int32)
        labels = np.full((batch_size, seq_len), IGNORE_LABEL, np.int32)
        for row, i in enumerate(order[b * batch_size:(b + 1) * batch_size]):
            s = sequences[i]
            ids[row, :len(s)] = s.input_ids
            labels[row, :len(s)] = s.labels
        yield ids, labels
