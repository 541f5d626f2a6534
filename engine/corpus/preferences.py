"""`load_preferences`: files of preference pairs in, chosen/rejected token rows plus statistics out.

The same reading as load_corpus (textstream, readers: refusals per file, skipped records with their line and
reason, per-format counts), with pairs instead of sequences: no packing and no windows, since a pair's two rows
are compared as wholes. A pair longer than seq_len is cut like an SFT record (both rows to seq_len) and counted
as truncated; one left with no completion token in either row is skipped.

    prefs = load_preferences(["pairs.jsonl"], tokenizer, CorpusConfig(seq_len=512, val_fraction=0.1))
    for input_ids, labels in prefs.batches(pairs=4, epoch=e, start_batch=b):   # [2P, T]: chosen rows, then rejected
        ...
    holds_pairs(["pairs.jsonl"])        # whether files are read as pairs (the corpus dialog and the CLI's plan)
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.backends.base import IGNORE_LABEL
from engine.corpus.config import CorpusConfig
from engine.corpus.formats import RecordError
from engine.corpus.loader import _check_paths
from engine.corpus.pairs import check_shared_prompt, is_pair, to_pair
from engine.corpus.readers import container_of, read_json_array, read_jsonl
from engine.corpus.render import CorpusTokenizer, load_tokenizer, render, tokenize
from engine.corpus.sequences import batch_count, batch_order, choose_validation
from engine.corpus.stats import CorpusStats, FileStats, SplitStats
from engine.corpus.textstream import RefusedFile, TextStream


@dataclass(frozen=True, eq=False)
class Pair:
    chosen_ids: np.ndarray        # (Tc,) int32
    chosen_labels: np.ndarray     # (Tc,) int32, IGNORE_LABEL on the prompt
    rejected_ids: np.ndarray      # (Tr,) int32
    rejected_labels: np.ndarray   # (Tr,) int32
    prompt_tokens: int            # shared by both rows, checked token by token
    file: int
    line: int


@dataclass
class PreferenceCorpus:
    train: list[Pair]
    val: list[Pair]
    stats: CorpusStats
    tokenizer: CorpusTokenizer
    config: CorpusConfig

    def preview(self, index: int = 0, split: str = "train") -> dict[str, list[tuple[str, bool]]]:
        """Pair `index` token by token, for the corpus dialog: {"prompt": [(text, False)], "chosen": [(text,
        trained)], "rejected": [...]}, one piece per token (the chosen and rejected pieces follow the shared
        prompt; `trained` is whether the objective counts that token). Built from the ids and labels the
        trainer gets, truncation included."""
        p = self._split(split)[index]
        n = p.prompt_tokens
        return {"prompt": [(text, False) for text in self._token_texts(p.chosen_ids[:n])],
                "chosen": self._completion(p.chosen_ids, p.chosen_labels, n),
                "rejected": self._completion(p.rejected_ids, p.rejected_labels, n)}

    def _completion(self, ids: np.ndarray, labels: np.ndarray, prompt: int) -> list[tuple[str, bool]]:
        texts = self._token_texts(ids, start=prompt)
        return [(text, bool(label != IGNORE_LABEL)) for text, label in zip(texts, labels[prompt:])]

    def _token_texts(self, ids: np.ndarray, start: int = 0) -> list[str]:
        """The text each of ids[start:] adds: decoded as prefixes, so a character split across tokens (UTF-8
        bytes of one emoji) comes out whole at the token that completes it, not as replacement marks."""
        decode = self.tokenizer.decode
        out, before = [], decode(ids[:start])
        for end in range(start + 1, len(ids) + 1):
            text = decode(ids[:end])
            if text.startswith(before) and not text.endswith("\ufffd"):
                out.append(text[len(before):])
                before = text
            else:           # an incomplete character: shown with the token that completes it
                out.append("")
        return out

    def batches(self, pairs: int, split: str = "train", shuffle: bool = True, epoch: int = 0,
                start_batch: int = 0, seed: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One epoch of (input_ids [2P, T], labels [2P, T]) int32, T = seq_len: rows 0..P−1 the chosen answers,
        rows P..2P−1 the rejected ones of the same pairs (TRL's concatenated layout), right-padded with the pad id
        and labels −100. The last batch is filled with empty pairs (all −100), which count for nothing.
        Deterministic in (seed, epoch), seed defaulting to the corpus's; `start_batch` resumes exactly."""
        group = self._split(split)
        seq_len, pad = self.config.seq_len, self.tokenizer.pad_id
        order = batch_order(len(group), shuffle, self.config.seed if seed is None else seed, epoch)
        for b in range(start_batch, batch_count(len(group), pairs)):
            ids = np.full((2 * pairs, seq_len), pad, np.int32)
            labels = np.full((2 * pairs, seq_len), IGNORE_LABEL, np.int32)
            for row, i in enumerate(order[b * pairs:(b + 1) * pairs]):
                p = group[i]
                ids[row, :len(p.chosen_ids)], labels[row, :len(p.chosen_ids)] = p.chosen_ids, p.chosen_labels
                r = pairs + row
                ids[r, :len(p.rejected_ids)], labels[r, :len(p.rejected_ids)] = p.rejected_ids, p.rejected_labels
            yield ids, labels

    def _split(self, split: str) -> list[Pair]:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.train if split == "train" else self.val


def load_preferences(files: Iterable[str | Path], tokenizer, config: CorpusConfig | None = None) -> PreferenceCorpus:
    """Read pair files (.jsonl or .json; plus config.val_files) into pairs. Unusable records and files are
    reported in `stats`, not raised; an empty `train` means nothing was usable."""
    config = config or CorpusConfig()
    if config.packing:
        raise ValueError("packing does not apply to preference pairs (each pair is compared as a whole); "
                         "turn packing off")
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    tok = tokenizer if isinstance(tokenizer, CorpusTokenizer) else CorpusTokenizer(tokenizer)
    jobs = [(Path(f), "train") for f in files] + [(p, "val") for p in config.val_files]
    _check_paths([p for p, _ in jobs])
    found = {"train": [], "val": []}
    all_stats = []
    for index, (path, split) in enumerate(jobs):
        fs = FileStats(str(path), split, bytes=path.stat().st_size, skipped_limit=config.max_skipped_listed)
        all_stats.append(fs)
        try:
            found[split] += _read_pairs(path, index, fs, tok, config)
        except RefusedFile as exc:
            fs.refuse(str(exc))
    stats = CorpusStats(all_stats, config.seq_len, packing=False)
    train, val = found["train"], found["val"]
    if config.val_fraction > 0:
        held = choose_validation(len(train), config.val_fraction, config.seed)
        val = [p for p, h in zip(train, held) if h]
        train = [p for p, h in zip(train, held) if not h]
        if not held.any():
            stats.notes.append(f"val_fraction {config.val_fraction} asked for, but {len(train)} pair(s) are too "
                               "few to split: no validation set")
    stats.train, stats.val = _split_stats(train, config.seq_len), _split_stats(val, config.seq_len)
    return PreferenceCorpus(train, val, stats, tok, config)


def holds_pairs(files: Iterable[str | Path], config: CorpusConfig | None = None) -> bool:
    """Whether `files` are a preference corpus: every one a .jsonl/.json file whose first readable record is a
    pair ('chosen' and 'rejected'). Mixed corpora are read as supervised data, where each pair is skipped with
    its reason, so nothing is dropped silently."""
    config = config or CorpusConfig()
    paths = [Path(f) for f in files]
    return bool(paths) and all(_first_record_is_pair(p, config) for p in paths)


def _first_record_is_pair(path: Path, config: CorpusConfig) -> bool:
    try:
        container = container_of(path)
        if container not in ("jsonl", "json"):
            return False
        stream = TextStream(path, config.read_chunk_bytes, lambda n: None)
        records = (read_jsonl(stream, config.max_line_bytes, config.max_json_depth) if container == "jsonl" else
                   read_json_array(stream, config.max_line_bytes, config.max_json_depth))
        try:
            first = next((r.value for r in records if r.error is None), None)
        finally:
            records.close()     # the rest of the file is not read
    except (OSError, RefusedFile):      # the reading proper says why, per file
        return False
    return first is not None and is_pair(first)


def _split_stats(pairs: list[Pair], seq_len: int) -> SplitStats:
    """Counted in rows (two per pair)."""
    rows = [(ids, labels) for p in pairs for ids, labels in ((p.chosen_ids, p.chosen_labels),
                                                             (p.rejected_ids, p.rejected_labels))]
    tokens = sum(len(ids) for ids, _ in rows)
    trained = sum(int(np.count_nonzero(labels != IGNORE_LABEL)) for _, labels in rows)
    return SplitStats(len(rows), tokens, trained, tokens / (len(rows) * seq_len) if rows else 0.0)


def _read_pairs(path: Path, index: int, fs: FileStats, tok: CorpusTokenizer, config: CorpusConfig) -> list[Pair]:
    fs.container = container_of(path)
    if fs.container not in ("jsonl", "json"):
        raise RefusedFile(f"{path}: preference pairs are read from .jsonl or .json files (records with 'chosen' "
                          f"and 'rejected'), not {fs.container}")
    stream = TextStream(path, config.read_chunk_bytes, lambda n: None)
    fs.encoding = stream.encoding_label
    records = (read_jsonl(stream, config.max_line_bytes, config.max_json_depth) if fs.container == "jsonl" else
               read_json_array(stream, config.max_line_bytes, config.max_json_depth))
    pairs = []
    for rec in records:
        if rec.error is not None:
            fs.skip(rec.line, rec.error)
            continue
        try:
            pairs.append(_pair(rec.value, rec.line, index, fs, tok, config))
        except RecordError as exc:
            fs.skip(rec.line, str(exc))
    return pairs


def _pair(record, line: int, index: int, fs: FileStats, tok: CorpusTokenizer, config: CorpusConfig) -> Pair:
    if not is_pair(record):
        raise RecordError("not a preference pair: expected 'chosen' and 'rejected' (with 'prompt', "
                          "'conversations' or 'instruction', or two conversations sharing their prompt)")
    example = to_pair(record)
    try:
        rows = tokenize([render(example.chosen, tok, True), render(example.rejected, tok, True)], tok)
    except RecordError:
        raise
    except Exception as exc:  # the tokenizer cannot take this record
        raise RecordError(f"the tokenizer failed on this record: {type(exc).__name__}: {exc}") from None
    prompt = check_shared_prompt(*rows)
    cut = sum(max(len(ids) - config.seq_len, 0) for ids, _ in rows)
    rows = [(ids[:config.seq_len].copy(), labels[:config.seq_len].copy()) for ids, labels in rows]
    if any(not np.any(labels[1:] != IGNORE_LABEL) for _, labels in rows):
        raise RecordError(f"nothing left to compare after cutting to seq_len {config.seq_len}: the prompt "
                          f"({prompt} tokens) fills the sequence")
    if cut and np.array_equal(rows[0][0], rows[1][0]):
        raise RecordError(f"chosen and rejected are the same after cutting to seq_len {config.seq_len} (the "
                          f"prompt has {prompt} tokens; they differ later): raise seq_len")
    if cut:
        fs.truncated_records += 1
        fs.truncated_tokens += cut
    fs.records += 1
    fs.formats[example.format] = fs.formats.get(example.format, 0) + 1
    for ids, labels in rows:
        fs.tokens += len(ids)
        fs.trainable_tokens += int(np.count_nonzero(labels != IGNORE_LABEL))
    (c_ids, c_labels), (r_ids, r_labels) = rows
    return Pair(c_ids, c_labels, r_ids, r_labels, prompt, index, line)
