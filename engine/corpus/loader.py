"""`load_corpus`: files in, training and validation sequences plus statistics out.

Files are read one chunk at a time (progress is reported per chunk, cancellation checked there too); records
are rendered and tokenized in batches; only the token arrays are kept. A file refused midway (say a Latin-1
byte after a million good lines) contributes nothing, so the stats never describe data that was not used.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.corpus.config import CorpusConfig
from engine.corpus.formats import RecordError, to_example
from engine.corpus.readers import container_of, read_csv, read_json_array, read_jsonl, read_text_blocks, too_long
from engine.backends.base import IGNORE_LABEL
from engine.corpus.render import CorpusTokenizer, Rendered, load_tokenizer, render, tokenize
from engine.corpus.sequences import Sequence, Unit, Windower, batches, choose_validation, to_sequences
from engine.corpus.stats import CorpusStats, FileStats, SplitStats
from engine.corpus.textstream import RefusedFile, TextStream

RENDER_BATCH = 256   # records tokenized per call: amortises the tokenizer's per-call cost


class CorpusCancelled(Exception):
    """Loading stopped because `cancel()` returned True."""


@dataclass
class Corpus:
    train: list[Sequence]
    val: list[Sequence]
    stats: CorpusStats
    tokenizer: CorpusTokenizer
    config: CorpusConfig

    def preview(self, index: int = 0, split: str = "train") -> list[tuple[str, bool]]:
        """Sequence `index` of `split` as (text, trained) pieces: consecutive tokens with the same flag decoded
        together, so the GUI can show masked text dimmed. Built from the ids and labels, it shows exactly what
        the trainer gets, truncation and packing included."""
        seq = self._split(split)[index]
        trained = seq.labels != IGNORE_LABEL
        cuts = np.flatnonzero(np.diff(trained.astype(np.int8))) + 1
        bounds = [0, *cuts.tolist(), len(seq)]
        return [(self.tokenizer.decode(seq.input_ids[a:b]), bool(trained[a])) for a, b in zip(bounds, bounds[1:])
                if b > a]

    def sequences_of(self, file: int, split: str = "train") -> list[int]:
        """Indices of the sequences of `split` holding examples from `stats.files[file]`, for a per-file preview."""
        return [i for i, s in enumerate(self._split(split)) if any(g.file == file for g in s.segments)]

    def batches(self, batch_size: int, split: str = "train", shuffle: bool = True, epoch: int = 0,
                start_batch: int = 0):
        """`sequences.batches` over a split, with this corpus's seq_len, pad id and seed."""
        return batches(self._split(split), batch_size, self.config.seq_len, self.tokenizer.pad_id, shuffle,
                       self.config.seed, epoch, start_batch)

    def _split(self, split: str) -> list[Sequence]:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.train if split == "train" else self.val


def load_corpus(files: Iterable[str | Path], tokenizer, config: CorpusConfig | None = None,
                progress: Callable[[int, int], None] | None = None,
                cancel: Callable[[], bool] | None = None) -> Corpus:
    """Read `files` (plus `config.val_files`) into sequences. `tokenizer`: a transformers tokenizer, a
    CorpusTokenizer, or a model folder. `progress(done_bytes, total_bytes)` is called per chunk read;
    `cancel()` returning True raises CorpusCancelled. Unusable records and files are reported in
    `corpus.stats`, not raised; an empty `corpus.train` means nothing was usable."""
    config = config or CorpusConfig()
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    tok = tokenizer if isinstance(tokenizer, CorpusTokenizer) else CorpusTokenizer(tokenizer)
    jobs = [(Path(f), "train") for f in files] + [(p, "val") for p in config.val_files]
    _check_paths([p for p, _ in jobs])
    total = sum(p.stat().st_size for p, _ in jobs)
    done = 0

    def on_bytes(n: int):
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)
        if cancel is not None and cancel():
            raise CorpusCancelled("corpus loading cancelled")

    on_bytes(0)
    units = {"train": [], "val": []}
    all_stats = []
    for index, (path, split) in enumerate(jobs):
        fs = FileStats(str(path), split, bytes=path.stat().st_size, skipped_limit=config.max_skipped_listed)
        all_stats.append(fs)
        before = done
        try:
            units[split] += _read_file(path, index, fs, tok, config, on_bytes)
        except RefusedFile as exc:
            fs.refuse(str(exc))
            on_bytes(fs.bytes - (done - before))   # the unread rest, so progress still reaches the total
        else:
            if fs.records == 0 and fs.skipped_count == 0:   # said aloud: an empty file is usually the wrong file
                fs.refuse("the file is empty: no records to train on")
    stats = CorpusStats(all_stats, config.seq_len, config.packing)
    train_units, val_units = units.pop("train"), units.pop("val")
    if config.val_fraction > 0:
        held = choose_validation(len(train_units), config.val_fraction, config.seed)
        val_units = [u for u, h in zip(train_units, held) if h]
        train_units = [u for u, h in zip(train_units, held) if not h]
        if not held.any():
            stats.notes.append(f"val_fraction {config.val_fraction} asked for, but {len(train_units)} example(s) "
                               "are too few to split: no validation set")
    train = to_sequences(train_units, config.seq_len, config.packing, tok.eos_id)
    val = to_sequences(val_units, config.seq_len, config.packing, tok.eos_id)
    stats.train, stats.val = _split_stats(train, config.seq_len), _split_stats(val, config.seq_len)
    return Corpus(train, val, stats, tok, config)


def _check_paths(paths: list[Path]):
    seen = set()
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"corpus file {p} does not exist")
        if p.is_dir():
            raise ValueError(f"corpus file {p} is a folder; give the files in it")
        key = p.resolve()
        if key in seen:
            raise ValueError(f"corpus file {p} is given twice (a validation file must not also be a training file)")
        seen.add(key)


def _split_stats(seqs: list[Sequence], seq_len: int) -> SplitStats:
    tokens = sum(len(s) for s in seqs)
    return SplitStats(len(seqs), tokens, sum(s.trainable_tokens for s in seqs),
                      tokens / (len(seqs) * seq_len) if seqs else 0.0)


def _read_file(path: Path, index: int, fs: FileStats, tok: CorpusTokenizer, config: CorpusConfig,
               on_bytes) -> list[Unit]:
    fs.container = container_of(path)
    stream = TextStream(path, config.read_chunk_bytes, on_bytes)
    fs.encoding = stream.encoding_label
    if fs.container == "text":
        return _read_text(stream, index, fs, tok, config)
    if fs.container == "jsonl":
        records = read_jsonl(stream, config.max_line_bytes, config.max_json_depth)
    elif fs.container == "json":
        records = read_json_array(stream, config.max_line_bytes, config.max_json_depth)
    else:
        records = read_csv(stream, config.max_line_bytes)
    units: list[Unit] = []
    pending: list[tuple[int, str, Rendered]] = []
    for rec in records:
        if rec.error is not None:
            fs.skip(rec.line, rec.error)
            continue
        try:
            example = to_example(rec.value)
            pending.append((rec.line, example.format, render(example, tok, config.mask_prompt)))
        except RecordError as exc:
            fs.skip(rec.line, str(exc))
        if len(pending) >= RENDER_BATCH:
            units += _tokenize_pending(pending, index, fs, tok, config)
            pending = []
            on_bytes(0)   # a chance to cancel between chunks: a megabyte of chats takes seconds to render
    units += _tokenize_pending(pending, index, fs, tok, config)
    return units


def _tokenize_pending(pending, index: int, fs: FileStats, tok: CorpusTokenizer, config: CorpusConfig) -> list[Unit]:
    units = []
    seq_len = config.seq_len
    for (line, fmt, rendered), tokens in zip(pending, _tokenize_each(pending, fs, tok)):
        if tokens is None:
            continue
        ids, labels = tokens
        if rendered.splittable:
            windower = Windower(seq_len, index)
            made = [*windower.feed(ids, labels, line), *windower.finish()]
        else:
            cut = max(len(ids) - seq_len, 0)
            if cut:  # copies, so the cut-off tail is freed rather than kept alive by a view
                shared = labels is ids
                ids = ids[:seq_len].copy()
                labels = ids if shared else labels[:seq_len].copy()
            if not np.any(labels != IGNORE_LABEL):
                fs.skip(line, f"nothing left to train on after cutting to seq_len {seq_len} (the record has "
                              f"{len(ids) + cut} tokens; its prompt fills the sequence)" if cut else
                              f"every label is {IGNORE_LABEL}: nothing to train on")
                continue
            if cut:
                fs.truncated_records += 1
                fs.truncated_tokens += cut
            made = [Unit(ids, labels, index, line)]
        fs.records += 1
        fs.formats[fmt] = fs.formats.get(fmt, 0) + 1
        _count(fs, made)
        units += made
    return units


def _tokenize_each(pending, fs: FileStats, tok: CorpusTokenizer) -> list:
    """Tokenize the batch in one call; should the tokenizer fail on it, one record at a time, so the record it
    cannot take is skipped with the tokenizer's reason instead of stopping the whole corpus."""
    try:
        return tokenize([r for _, _, r in pending], tok)
    except Exception:
        out = []
        for line, _, rendered in pending:
            try:
                out += tokenize([rendered], tok)
            except Exception as exc:
                fs.skip(line, f"the tokenizer failed on this record: {type(exc).__name__}: {exc}")
                out.append(None)
        return out


def _count(fs: FileStats, units: list[Unit]):
    for u in units:
        fs.tokens += len(u.ids)
        fs.trainable_tokens += len(u.ids) if u.labels is u.ids else int(np.count_nonzero(u.labels != IGNORE_LABEL))


def _read_text(stream: TextStream, index: int, fs: FileStats, tok: CorpusTokenizer, config: CorpusConfig
               ) -> list[Unit]:
    """A raw text file is one document: [BOS] text EOS, tokenized block by block, windowed as it goes."""
    windower = Windower(config.seq_len, index)
    units: list[Unit] = []
    started = False
    line = 1
    for line, text in read_text_blocks(stream, config.max_line_bytes):
        if text is None:
            fs.skip(line, f"line {too_long(config.max_line_bytes)}; left out of the text")
            continue
        if not started and not text.strip():
            continue
        rendered = Rendered([(text, True)], tok.bos_prefix if not started else ())
        started = True
        ids, labels = tokenize([rendered], tok)[0]
        units += windower.feed(ids, labels, line)
    if not started:
        raise RefusedFile("the file is empty: no text to train on")
    eos = np.array([tok.eos_id], np.int32)
    units += windower.feed(eos, eos, line)
    units += windower.finish()
    fs.records, fs.formats = 1, {"raw_text": 1}
    _count(fs, units)
    return units
