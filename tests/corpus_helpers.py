"""Shared pieces of the corpus tests: writing record files and the piece-by-piece oracle for ids and labels."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.backends.base import IGNORE_LABEL as IGNORE


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def expected_from_pieces(tokenizer, pieces: list[tuple[str, bool]], eos: bool = False):
    """The oracle: hand-written text pieces, each tokenized on its own, trained or masked as written.
    Also checks that tokenizing piece by piece gives the same ids as tokenizing the whole text."""
    ids, labels = [], []
    for text, trained in pieces:
        part = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if trained else [IGNORE] * len(part)
    whole = tokenizer("".join(t for t, _ in pieces), add_special_tokens=False)["input_ids"]
    assert ids == whole, "fixture pieces must end on token boundaries"
    if eos:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return ids, labels


def seq_lists(seq) -> tuple[list[int], list[int]]:
    assert seq.input_ids.dtype == np.int32 and seq.labels.dtype == np.int32
    return seq.input_ids.tolist(), seq.labels.tolist()
