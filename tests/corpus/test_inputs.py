"""Reading what users drop on the dialog: encodings, binary files, CRLF, hostile nesting and line lengths,
streaming with progress and cancellation."""
from __future__ import annotations

import json
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from engine.corpus import CorpusCancelled, CorpusConfig, load_corpus
from engine.corpus.readers import JsonArraySplitter, json_depth_exceeds
from engine.corpus.textstream import TextStream
from tests.corpus_helpers import seq_lists, write_jsonl

RECORDS = [{"prompt": "What is the capital of France?", "completion": " Paris."},
           {"text": "Héllo wörld — 你好 🙂\nsecond line"}]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def ids_of(corpus):
    return [seq_lists(s) for s in corpus.train]


def test_utf8_bom_and_utf16_with_bom_read_like_plain_utf8(tmp_path, tok):
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS)
    want = None
    for name, data in [("plain", text.encode("utf-8")), ("bom8", b"\xef\xbb\xbf" + text.encode("utf-8")),
                       ("le", b"\xff\xfe" + text.encode("utf-16-le")), ("be", b"\xfe\xff" + text.encode("utf-16-be"))]:
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(data)
        corpus = load_corpus([path], tok, CorpusConfig(read_chunk_bytes=16))  # characters split across chunks
        fs = corpus.stats.files[0]
        assert fs.refused is None and not fs.skipped and fs.records == 2, fs
        want = want or ids_of(corpus)
        assert ids_of(corpus) == want, name
    assert fs.encoding == "UTF-16 BE with BOM"


def test_crlf_is_normalised_even_across_chunk_boundaries(tmp_path, tok):
    text = "The quick brown fox.\nHello world!\n\nHow are you today?\n" * 3
    (tmp_path / "lf.txt").write_text(text, encoding="utf-8", newline="\n")
    (tmp_path / "crlf.txt").write_bytes(text.replace("\n", "\r\n").encode())
    lf = load_corpus([tmp_path / "lf.txt"], tok, CorpusConfig())
    for chunk in (16, 17, 21, 1 << 20):
        crlf = load_corpus([tmp_path / "crlf.txt"], tok, CorpusConfig(read_chunk_bytes=chunk))
        assert ids_of(crlf) == ids_of(lf)
    assert "\r" not in crlf.preview(0)[0][0]
    jsonl = "".join(json.dumps(r) + "\r\n" for r in RECORDS).encode()
    (tmp_path / "crlf.jsonl").write_bytes(jsonl)
    assert load_corpus([tmp_path / "crlf.jsonl"], tok, CorpusConfig(read_chunk_bytes=16)).stats.files[0].records == 2


def test_latin1_file_is_refused_with_the_byte_offset(tmp_path, tok):
    data = '{"text": "The quick brown fox."}\n{"oops": 1}\n{"text": "café au lait"}\n'.encode("latin-1")
    (tmp_path / "latin1.jsonl").write_bytes(data)
    write_jsonl(tmp_path / "good.jsonl", RECORDS)
    for chunk in (16, 1 << 20):
        corpus = load_corpus([tmp_path / "latin1.jsonl", tmp_path / "good.jsonl"], tok,
                             CorpusConfig(read_chunk_bytes=chunk))
        bad, good = corpus.stats.files
        assert bad.refused is not None and f"byte offset {data.index(0xE9)}" in bad.refused
        assert "0xE9" in bad.refused and "latin1.jsonl" in bad.refused and "UTF-8" in bad.refused
        # What was read before the bad byte is not used or listed either: the file counts as a whole.
        assert bad.records == bad.tokens == bad.skipped_count == 0 and bad.formats == {} and bad.skipped == []
        assert good.records == 2 and len(corpus.train) == 2
    assert "REFUSED" in corpus.stats.format_text()


def test_truncated_utf8_at_the_end_is_refused(tmp_path, tok):
    data = '{"text": "abc"}\n{"text": "你'.encode()[:-1]
    (tmp_path / "cut.jsonl").write_bytes(data)
    fs = load_corpus([tmp_path / "cut.jsonl"], tok, CorpusConfig()).stats.files[0]
    assert f"byte offset {len(data) - 2}" in fs.refused


def test_binary_files_are_refused(tmp_path, tok):
    nul_data = b'{"text": "a"}\n{"te\x00xt": 1}\n'
    (tmp_path / "nul.jsonl").write_bytes(nul_data)
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "utf32.txt").write_bytes("hi".encode("utf-32"))
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4")
    corpus = load_corpus([tmp_path / n for n in ("nul.jsonl", "image.txt", "utf32.txt", "notes.pdf")], tok,
                         CorpusConfig())
    nul, image, utf32, pdf = (f.refused for f in corpus.stats.files)
    assert f"byte offset {nul_data.index(0)}: NUL byte" in nul and "binary" in nul
    assert "byte offset 0" in image and "0x89" in image
    assert "UTF-32" in utf32
    assert "unsupported file type '.pdf'" in pdf
    assert corpus.train == [] and corpus.stats.totals["refused_files"] == 4


def test_hostile_nesting_is_skipped_without_parsing(tmp_path, tok):
    deep = "[" * 200_000 + "]" * 200_000
    (tmp_path / "deep.jsonl").write_text(f'{{"text": {deep}}}\n' + json.dumps(RECORDS[0]) + "\n")
    (tmp_path / "deep.json").write_text(f'[{{"text": {deep}}}, {json.dumps(RECORDS[0])}]')
    for name in ("deep.jsonl", "deep.json"):
        fs = load_corpus([tmp_path / name], tok, CorpusConfig(max_json_depth=32)).stats.files[0]
        assert fs.records == 1 and [s.line for s in fs.skipped] == [1]
        assert "deeper than the limit of 32 levels" in fs.skipped[0].reason
    (tmp_path / "digits.jsonl").write_text('{"text": "a", "n": ' + "7" * 100_000 + "}\n")
    fs = load_corpus([tmp_path / "digits.jsonl"], tok, CorpusConfig()).stats.files[0]
    assert fs.records == 0 and "not usable JSON" in fs.skipped[0].reason
    text_inside = json.dumps({"text": "[[[[[[[[[[" * 10})  # brackets inside strings are not nesting
    assert not json_depth_exceeds(text_inside, 3) and json_depth_exceeds('{"a": [[[1]]]}', 3)


def test_overlong_lines_are_skipped_with_bounded_memory(tmp_path, tok):
    path = tmp_path / "long.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps(RECORDS[0]) + "\n")
        f.write('{"text": "' + "x" * (20 << 20) + '"}\n')   # a 20 MB line
        f.write(json.dumps(RECORDS[1]) + "\n")
    config = CorpusConfig(max_line_bytes=64 << 10, read_chunk_bytes=64 << 10)
    tracemalloc.start()
    corpus = load_corpus([path], tok, config)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    fs = corpus.stats.files[0]
    assert fs.records == 2 and [s.line for s in fs.skipped] == [2] and "65536 bytes" in fs.skipped[0].reason
    assert peak < 4 << 20, f"reading a 20 MB line peaked at {peak / 2**20:.1f} MiB"


def test_overlong_json_array_element_and_text_line_are_skipped(tmp_path, tok):
    (tmp_path / "long.json").write_text(json.dumps([RECORDS[0], {"text": "y" * 5000}, RECORDS[1]]))
    fs = load_corpus([tmp_path / "long.json"], tok, CorpusConfig(max_line_bytes=1000)).stats.files[0]
    assert fs.records == 2 and "record longer than the limit of 1000 bytes" in fs.skipped[0].reason
    (tmp_path / "long.txt").write_text("The quick brown fox.\n" + "z" * 5000 + "\nHello world!\n")
    corpus = load_corpus([tmp_path / "long.txt"], tok, CorpusConfig(max_line_bytes=1000))
    assert [s.line for s in corpus.stats.files[0].skipped] == [2]
    assert corpus.preview(0) == [("The quick brown fox.\nHello world!\n<|im_end|>", True)]


def test_broken_json_files(tmp_path, tok):
    (tmp_path / "object.json").write_text('{"text": "a"}')
    (tmp_path / "open.json").write_text('[{"text": "a"}, {"text": "b"')
    (tmp_path / "tail.json").write_text('[{"text": "a"}]\n{"x": 1}')
    (tmp_path / "empty.json").write_text("  \n")
    (tmp_path / "empty.txt").write_text(" \n\n")
    (tmp_path / "bad.csv").write_text("name,value\na,b\n")
    files = ["object.json", "open.json", "tail.json", "empty.json", "empty.txt", "bad.csv"]
    stats = load_corpus([tmp_path / n for n in files], tok, CorpusConfig()).stats.files
    obj, open_, tail, empty, empty_txt, bad_csv = stats
    assert "must hold an array of records" in obj.refused and ".jsonl" in obj.refused
    assert open_.records == 1 and "file ends inside this record" in open_.skipped[0].reason
    assert "line 2: unexpected '{' after the closing ]" in tail.refused
    assert "empty" in empty.refused
    assert empty_txt.records == 0 and "the file is empty" in empty_txt.refused   # refused aloud, not skipped
    assert "needs a 'text' column" in bad_csv.refused and "'name'" in bad_csv.refused


@settings(max_examples=60, deadline=None)
@given(records=st.lists(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='ab"\\[]{},\n \u00e9\u4f60'),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='k"\\[,', max_size=3), inner,
                                                                 max_size=3), max_leaves=8), max_size=5),
    chunk=st.integers(1, 40), indent=st.sampled_from([None, 1]))
def test_json_array_splitter_matches_json_loads(records, chunk, indent):
    text = json.dumps(records, indent=indent, ensure_ascii=False)
    splitter = JsonArraySplitter("t.json", 1 << 20, 64)
    out = []
    for i in range(0, len(text), chunk):
        out += splitter.feed(text[i:i + chunk])
    out += splitter.finish()
    assert [r.error for r in out] == [None] * len(records)
    assert [r.value for r in out] == records
    if indent:  # each element starts on its own line: 1-based, after the "[" line
        starts = [n + 1 for n, line in enumerate(text.split("\n"))
                  if line.startswith(" ") and not line.startswith("  ") and line[1] not in "]}"]
        assert [r.line for r in out] == starts


def test_text_blocks_tokenize_like_the_whole_file(tmp_path, tok):
    paragraph = "The quick brown fox jumps over the lazy dog.\n  indented line\n\n\nWhat is the capital?\n"
    (tmp_path / "big.txt").write_text(paragraph * 4000)   # ~340 KB: several 64 KB blocks
    corpus = load_corpus([tmp_path / "big.txt"], tok, CorpusConfig(seq_len=4096))
    ids = [t for s in corpus.train for t in s.input_ids.tolist()]
    assert ids == tok(paragraph * 4000, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_progress_reaches_the_total_and_cancel_stops(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", RECORDS * 50)
    b = tmp_path / "b.txt"
    b.write_text("The quick brown fox.\n" * 100)
    calls = []
    load_corpus([a, b], tok, CorpusConfig(read_chunk_bytes=256), progress=lambda d, t: calls.append((d, t)))
    total = a.stat().st_size + b.stat().st_size
    assert calls[-1] == (total, total) and len(calls) > 10
    assert all(x[0] <= y[0] for x, y in zip(calls, calls[1:])) and {t for _, t in calls} == {total}
    seen = []
    with pytest.raises(CorpusCancelled):
        load_corpus([a, b], tok, CorpusConfig(read_chunk_bytes=256), progress=lambda d, t: seen.append(d),
                    cancel=lambda: len(seen) >= 3)
    assert len(seen) == 3


def test_a_file_of_garbage_streams_in_bounded_memory(tmp_path, tok):
    path = tmp_path / "garbage.jsonl"
    line = json.dumps({"unknown": "x" * 200}) + "\n"
    path.write_text(line * 30_000)   # 6.4 MB, every record skipped
    tracemalloc.start()
    corpus = load_corpus([path], tok, CorpusConfig(max_skipped_listed=10, read_chunk_bytes=256 << 10))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    fs = corpus.stats.files[0]
    assert fs.skipped_count == 30_000 and len(fs.skipped) == 10
    assert "and 29,990 more skipped records" in corpus.stats.format_text()
    assert peak < 3 << 20, f"peak {peak / 2**20:.1f} MiB for a 6.4 MB file"


def test_stream_lines_report_line_numbers(tmp_path):
    (tmp_path / "x.txt").write_bytes(b"a\r\n\r\nbbbbbbbbbb\nc")
    lines = list(TextStream(tmp_path / "x.txt", 3).lines(5))
    assert [(x.number, x.text) for x in lines] == [(1, "a"), (2, ""), (3, None), (4, "c")]


def test_text_blocks_stay_bounded_when_every_line_is_indented(tmp_path):
    from engine.corpus.readers import read_text_blocks

    (tmp_path / "code.txt").write_text("    indented line of code\n" * 2000)   # 52 KB, never a clean boundary
    blocks = list(read_text_blocks(TextStream(tmp_path / "code.txt", 4096), 1 << 20, block_chars=256))
    assert max(len(t) for _, t in blocks) <= 16 * 256 + 26
    assert "".join(t for _, t in blocks) == "    indented line of code\n" * 2000
    assert [line for line, _ in blocks][:2] == [1, 1 + len(blocks[0][1]) // 26]


def test_unpaired_surrogate_escapes_are_skipped_and_pairs_kept(tmp_path, tok):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "bad \\ud800 here"}\n{"text": "emoji \\ud83d\\ude00 ok"}\n'
                    '{"text": "\\\\ud800 literal"}\n')
    corpus = load_corpus([path], tok, CorpusConfig())
    fs = corpus.stats.files[0]
    assert [s.line for s in fs.skipped] == [1] and "unpaired UTF-16 surrogate" in fs.skipped[0].reason
    assert fs.records == 2 and corpus.preview(0)[0][0].startswith("emoji \U0001F600 ok")


def test_a_record_the_tokenizer_rejects_is_skipped_not_fatal(tok):
    from engine.corpus.loader import _tokenize_each
    from engine.corpus.render import CorpusTokenizer, Rendered
    from engine.corpus.stats import FileStats

    fs = FileStats("x.jsonl")
    good, bad = Rendered([("The quick brown fox.", True)]), Rendered([("lone \ud800", True)])
    out = _tokenize_each([(1, "text", good), (2, "text", bad), (3, "text", good)], fs, CorpusTokenizer(tok))
    assert out[1] is None and out[0][0].tolist() == out[2][0].tolist() == tok("The quick brown fox.")["input_ids"]
    assert [s.line for s in fs.skipped] == [2] and "the tokenizer failed on this record" in fs.skipped[0].reason


_KEYS = ["text", "prompt", "completion", "instruction", "input", "output", "system", "messages", "conversations",
         "input_ids", "labels", "role", "content", "from", "value", "type"]
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-200, 1 << 40) | st.floats(allow_nan=False) | st.sampled_from(
        ["", "Hi", "user", "assistant", "system", "gpt", "human", "text", " "]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(_KEYS), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=40, deadline=None)
@given(records=st.lists(st.dictionaries(st.sampled_from(_KEYS), _JSON, max_size=4), min_size=1, max_size=6))
def test_any_json_record_is_used_or_skipped_never_fatal(tmp_path_factory, tok, records):
    path = write_jsonl(tmp_path_factory.mktemp("fuzz") / "f.jsonl", records)
    corpus = load_corpus([path], tok, CorpusConfig(seq_len=16))
    fs = corpus.stats.files[0]
    assert fs.refused is None and fs.records + fs.skipped_count == len(records)
    assert all(s.reason for s in fs.skipped)
    assert sum(s.trainable_tokens for s in corpus.train) == fs.trainable_tokens


def test_csv_row_with_an_overlong_line_is_skipped_whole(tmp_path, tok):
    (tmp_path / "l.csv").write_text('text\n"first\n' + "w" * 3000 + '\nlast"\nThe quick brown fox.\n' +
                                    "v" * 3000 + "\nHello world!\n")
    corpus = load_corpus([tmp_path / "l.csv"], tok, CorpusConfig(max_line_bytes=1000))
    fs = corpus.stats.files[0]
    assert [(s.line, s.reason.split(" longer")[0]) for s in fs.skipped] == [(2, "line 3"), (6, "line 6")]
    assert [corpus.preview(i)[0][0] for i in range(2)] == ["The quick brown fox.<|im_end|>", "Hello world!<|im_end|>"]
