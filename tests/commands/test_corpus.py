"""`lora-lab corpus --model M FILE... [--json]`: per-file statistics, totals and skipped lines."""
from __future__ import annotations

import json

from engine.cli import main
from tests.corpus_helpers import write_jsonl

RECORDS = [{"prompt": "What is the capital of France?", "completion": " Paris."}, {"foo": 1},
           {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]


def test_corpus_command_prints_json_stats(tmp_path, tiny_llama_dir, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    (tmp_path / "notes.md").write_text("# Notes\nThe quick brown fox.\n")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    code = main(["corpus", "--model", str(tiny_llama_dir), str(data), str(tmp_path / "notes.md"),
                 str(tmp_path / "latin1.txt"), "--json", "--seq-len", "64"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    files = {f["path"].rsplit("/", 1)[-1]: f for f in out["files"]}
    assert files["data.jsonl"]["formats"] == {"prompt_completion": 1, "openai": 1}
    assert files["data.jsonl"]["skipped"] == [{"line": 2, "reason": files["data.jsonl"]["skipped"][0]["reason"]}]
    assert "unknown record format" in files["data.jsonl"]["skipped"][0]["reason"]
    assert files["notes.md"]["formats"] == {"raw_text": 1} and files["notes.md"]["trainable_tokens"] > 0
    assert "byte offset 3" in files["latin1.txt"]["refused"]
    totals = out["totals"]
    assert totals["records"] == 3 and totals["skipped"] == 1 and totals["refused_files"] == 1
    assert totals["tokens"] == sum(f["tokens"] for f in out["files"]) == out["train"]["tokens"]
    assert out["seq_len"] == 64


def test_corpus_command_text_output_and_empty_corpus(tmp_path, tiny_llama_dir, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    assert main(["corpus", "--model", str(tiny_llama_dir), str(data)]) == 0
    text = capsys.readouterr().out
    assert "data.jsonl [train]: jsonl, UTF-8" in text and "line 2: unknown record format" in text
    assert text.startswith("corpus: 1 file(s), 2 records")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"foo": 1}])
    assert main(["corpus", "--model", str(tiny_llama_dir), str(bad)]) == 2
    captured = capsys.readouterr()
    assert "line 1: unknown record format" in captured.out and "no usable training data" in captured.err
    assert main(["corpus", "--model", str(tiny_llama_dir), str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err


def test_corpus_command_reads_preference_pairs(tmp_path, tiny_llama_dir, capsys):
    good = {"prompt": "Q?", "chosen": " Yes.", "rejected": " No."}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, {"prompt": "Q?", "chosen": " Yes."}])
    assert main(["corpus", str(path), "--model", str(tiny_llama_dir), "--pairs", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    (fs,) = stats["files"]
    assert fs["formats"] == {"pair_explicit": 1} and fs["skipped"] == [
        {"line": 2, "reason": "a preference pair needs both 'chosen' and 'rejected'; 'rejected' is missing"}]
    assert stats["train"]["sequences"] == 2
