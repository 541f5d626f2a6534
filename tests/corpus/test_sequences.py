"""Windows, truncation, packing, the validation split, batches and the config's validation."""
from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from engine.corpus import IGNORE_LABEL as IGNORE, CorpusConfig, batch_count, batches, load_corpus
from engine.corpus.sequences import Segment, Sequence
from tests.corpus_helpers import seq_lists, write_jsonl

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello world!"}]}
PC = {"prompt": "What is the capital of France?", "completion": " Paris."}
TEXT = {"text": "The quick brown fox jumps over the lazy dog. " * 6}


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_long_text_is_split_into_windows_that_join_back(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [TEXT])
    whole = tok(TEXT["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    corpus = load_corpus([path], tok, CorpusConfig(seq_len=16))
    assert [len(s) for s in corpus.train] == [16] * (len(whole) // 16) + ([len(whole) % 16] if len(whole) % 16 else [])
    assert [t for s in corpus.train for t in seq_lists(s)[0]] == whole
    assert all(seq_lists(s)[0] == seq_lists(s)[1] for s in corpus.train)   # raw text: everything trained
    fs = corpus.stats.files[0]
    assert fs.records == 1 and fs.tokens == len(whole) and fs.truncated_records == 0


def test_other_examples_are_truncated_and_the_cut_is_reported(tmp_path, tok):
    full = load_corpus([write_jsonl(tmp_path / "a.jsonl", [PC])], tok, CorpusConfig())
    ids, labels = seq_lists(full.train[0])
    n_prompt = labels.count(IGNORE)
    seq_len = n_prompt + 2
    corpus = load_corpus([tmp_path / "a.jsonl"], tok, CorpusConfig(seq_len=seq_len))
    assert seq_lists(corpus.train[0]) == (ids[:seq_len], labels[:seq_len])
    fs = corpus.stats.files[0]
    assert (fs.truncated_records, fs.truncated_tokens, fs.tokens, fs.trainable_tokens) == (
        1, len(ids) - seq_len, seq_len, 2)
    short = load_corpus([tmp_path / "a.jsonl"], tok, CorpusConfig(seq_len=n_prompt))
    fs = short.stats.files[0]
    assert short.train == [] and fs.records == 0
    assert "nothing left to train on after cutting to seq_len" in fs.skipped[0].reason


def test_packing_keeps_every_example_whole_and_separates_them(tmp_path, tok):
    records = [CHAT, PC, {"input_ids": [5, 6, 7]}, TEXT, CHAT, {"input_ids": [8, 9]}, PC]
    path = write_jsonl(tmp_path / "m.jsonl", records)
    plain = load_corpus([path], tok, CorpusConfig(seq_len=48))
    packed = load_corpus([path], tok, CorpusConfig(seq_len=48, packing=True))
    units = [seq_lists(s) for s in plain.train]
    assert len(packed.train) < len(plain.train) and all(len(s) <= 48 for s in packed.train)
    eos = tok.eos_token_id
    rebuilt = []
    for s in packed.train:
        ids, labels = seq_lists(s)
        starts = [g.start for g in s.segments] + [len(s)]
        assert starts[0] == 0
        for a, b in zip(starts, starts[1:]):
            unit = (ids[a:b], labels[a:b])
            bare = (ids[a:b - 1], labels[a:b - 1])
            if b < len(s) and unit[0][-1] == eos and labels[b - 1] == IGNORE and bare in units:
                unit = bare   # an EOS separator, masked, after a unit that does not end in EOS
            rebuilt.append(unit)
    assert rebuilt == units
    origins = [(g.file, g.line) for s in packed.train for g in s.segments]
    assert origins == [(0, s.segments[0].line) for s in plain.train]
    assert [line for _, line in origins if line != 4] == [1, 2, 3, 5, 6, 7]   # line 4: the text, in windows
    separators = sum(len(s) for s in packed.train) - sum(len(s) for s in plain.train)
    assert separators == packed.stats.train.tokens - plain.stats.train.tokens > 0
    assert packed.stats.train.trainable_tokens == plain.stats.train.trainable_tokens
    assert packed.stats.train.fill > plain.stats.train.fill


def test_validation_fraction_is_exact_seeded_and_deterministic(tmp_path, tok):
    records = [{"text": f"example number {i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "v.jsonl", records)

    def split(seed):
        c = load_corpus([path], tok, CorpusConfig(val_fraction=0.25, seed=seed))
        return sorted(s.segments[0].line for s in c.train), sorted(s.segments[0].line for s in c.val)

    train, val = split(0)
    assert len(val) == 10 and sorted(train + val) == list(range(1, 41))
    assert split(0) == (train, val) and split(1)[1] != val
    tiny = load_corpus([write_jsonl(tmp_path / "one.jsonl", records[:1])], tok, CorpusConfig(val_fraction=0.5))
    assert len(tiny.train) == 1 and tiny.val == [] and "too few to split" in tiny.stats.notes[0]


def test_one_long_text_file_can_still_be_split(tmp_path, tok):
    (tmp_path / "book.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 40)
    corpus = load_corpus([tmp_path / "book.txt"], tok, CorpusConfig(seq_len=32, val_fraction=0.2))
    n = len(corpus.train) + len(corpus.val)
    assert n > 5 and len(corpus.val) == round(n * 0.2)


def test_validation_files_go_only_to_validation(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", [PC, CHAT])
    val = write_jsonl(tmp_path / "val.jsonl", [CHAT])
    corpus = load_corpus([train], tok, CorpusConfig(val_files=(val,)))
    assert len(corpus.train) == 2 and len(corpus.val) == 1
    assert [f.split for f in corpus.stats.files] == ["train", "val"]
    assert corpus.val[0].segments[0].file == 1
    assert corpus.sequences_of(0) == [0, 1] and corpus.sequences_of(1) == [] and corpus.sequences_of(1, "val") == [0]
    with pytest.raises(ValueError, match="given twice"):
        load_corpus([train], tok, CorpusConfig(val_files=(train,)))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_corpus([tmp_path / "missing.jsonl"], tok, CorpusConfig())


def make_sequences(lengths):
    out = []
    for k, n in enumerate(lengths):
        ids = np.arange(1, n + 1, dtype=np.int32) + 100 * k
        labels = ids.copy()
        labels[0] = IGNORE
        out.append(Sequence(ids, labels, (Segment(0, 0, k + 1),)))
    return out


def test_batches_are_padded_deterministic_and_resumable():
    seqs = make_sequences([5, 8, 3, 8, 1, 7, 2])
    epoch0 = list(batches(seqs, 3, 8, pad_id=0, seed=7, epoch=0))
    assert len(epoch0) == batch_count(7, 3) == 3
    for ids, labels in epoch0:
        assert ids.shape == labels.shape == (3, 8) and ids.dtype == labels.dtype == np.int32
        assert np.all(labels[ids == 0] == IGNORE)          # padding is never trained
    rows = [tuple(r[r != 0]) for ids, _ in epoch0 for r in ids if (r != 0).any()]
    assert sorted(rows) == sorted(tuple(s.input_ids) for s in seqs)   # each sequence once per epoch
    assert not epoch0[-1][0][1:].any() and np.all(epoch0[-1][1][1:] == IGNORE)  # last batch: 1 real row + 2 empty
    again = list(batches(seqs, 3, 8, pad_id=0, seed=7, epoch=0))
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(epoch0, again))
    resumed = list(batches(seqs, 3, 8, pad_id=0, seed=7, epoch=0, start_batch=1))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(epoch0[1:], resumed)) and len(resumed) == 2
    epoch1 = list(batches(seqs, 3, 8, pad_id=0, seed=7, epoch=1))
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(epoch0, epoch1))
    ordered = np.concatenate([ids for ids, _ in batches(seqs, 7, 8, pad_id=0, shuffle=False)])
    assert [tuple(r[r != 0]) for r in ordered] == [tuple(s.input_ids) for s in seqs]
    with pytest.raises(ValueError, match="more than seq_len 6"):
        next(batches(seqs, 3, 6, pad_id=0))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        next(batches(seqs, 0, 8, pad_id=0))


def test_corpus_batches_use_its_pad_id_and_seq_len(tmp_path, tok):
    corpus = load_corpus([write_jsonl(tmp_path / "b.jsonl", [PC, CHAT, PC])], tok, CorpusConfig(seq_len=40))
    ids, labels = next(corpus.batches(2, shuffle=False))
    assert ids.shape == (2, 40)
    n = len(corpus.train[0])
    assert np.all(ids[0, n:] == tok.pad_token_id) and np.all(labels[0, n:] == IGNORE)
    assert ids[0, :n].tolist() == corpus.train[0].input_ids.tolist()


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq_len=1), "seq_len must be between 2"),
    (dict(seq_len=12.5), "seq_len must be an integer"),
    (dict(val_fraction=1.0), r"val_fraction must be a number in \[0, 1\)"),
    (dict(val_fraction=0.1, val_files=("v.jsonl",)), "choose either val_fraction"),
    (dict(val_files="v.jsonl"), "list of paths"),
    (dict(mask_prompt="yes"), "mask_prompt must be True, False or None"),
    (dict(packing=1), "packing must be True or False"),
    (dict(max_json_depth=1), "max_json_depth must be between 2"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CorpusConfig(**kwargs)
