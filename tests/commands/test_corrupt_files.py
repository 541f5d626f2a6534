"""Issue 22: every damaged weight or config file, through every command that reads it, ends in one line naming
the file (exit code 2, no traceback) and changes no file that existed before."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from engine.cli import main

DATA = "The quick brown fox jumps over the lazy dog. " * 8


def _rewrite_header(data: bytes, edit) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    for name, info in header.items():
        if name != "__metadata__":
            edit(info)
            break
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


# name -> (bytes -> bytes, words the message must hold)
DAMAGE = {
    "truncated": (lambda d: d[:len(d) * 2 // 3], "truncated"),
    "empty": (lambda d: b"", "empty"),
    "flipped header byte": (lambda d: d[:9] + bytes([d[9] ^ 0x55]) + d[10:], "not valid JSON"),
    "huge header length": (lambda d: struct.pack("<Q", 1 << 62) + d[8:], "more than safetensors allows"),
    "small header length": (lambda d: struct.pack("<Q", 7) + d[8:], "not valid JSON"),
    "dtype that lies about its size": (lambda d: _rewrite_header(d, lambda t: t.update(dtype="F16")),
                                       "does not match the data"),
    "integer dtype": (lambda d: _rewrite_header(d, lambda t: t.update(dtype="I32")), "stored as I32"),
}


def _snapshot(*folders: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for f in folders if f.exists()
            for p in sorted(f.rglob("*")) if p.is_file()}


def _one_line_error(capsys, command: str, code: int, *words: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("lora-lab")]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"lora-lab {command}: error: "), err
    for word in words:
        assert word in lines[0], err
    return lines[0]


@pytest.fixture(scope="module")
def good_adapter(tiny_llama_dir, tmp_path_factory):
    from bench.peft_adapters import make_adapter

    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("good") / "adapter")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text(DATA)
    return path


def _commands(model: Path, adapter: Path, data: Path, out: Path) -> dict[str, list[str]]:
    m, a, d, o = str(model), str(adapter), str(data), str(out)
    return {
        "eval": ["eval", "--model", m, "--adapter", a, "--data", d, "--seq-len", "16", "--backend", "cpu"],
        "export gguf": ["export", "--model", m, "--adapter", a, "--to", "gguf", "--out", o],
        "export merged": ["export", "--model", m, "--adapter", a, "--to", "merged", "--out", o],
        "chat": ["chat", "--model", m, "--adapter", a, "--prompt", "hi", "--device", "cpu", "--max-new-tokens", "2"],
        "train --init-adapter": ["train", "--model", m, "--init-adapter", a, "--data", d, "--out", o,
                                 "--seq-len", "16", "--batch-size", "1", "--steps", "1", "--backend", "cpu"],
    }


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_adapter_file_is_one_line_in_every_command(tiny_llama_dir, good_adapter, data_file, tmp_path,
                                                             capsys, damage):
    edit, words = DAMAGE[damage]
    adapter = tmp_path / "adapter"
    shutil.copytree(good_adapter, adapter)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(edit(weights.read_bytes()))
    before = _snapshot(adapter, tiny_llama_dir)
    for name, argv in _commands(tiny_llama_dir, adapter, data_file, tmp_path / "out").items():
        line = _one_line_error(capsys, argv[0], main(argv), str(weights), words)
        assert not (tmp_path / "out").exists(), (name, line)
    assert _snapshot(adapter, tiny_llama_dir) == before


def test_a_non_finite_adapter_is_refused_by_every_command(tiny_llama_dir, good_adapter, data_file, tmp_path,
                                                          capsys):
    """`export --to gguf` wrote 16384 NaN values without a word while eval, train and --to merged refused."""
    from safetensors.numpy import load_file, save_file

    adapter = tmp_path / "adapter"
    shutil.copytree(good_adapter, adapter)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    first = sorted(tensors)[0]
    tensors[first][0, 0] = np.nan
    save_file(tensors, weights)
    for name, argv in _commands(tiny_llama_dir, adapter, data_file, tmp_path / "out").items():
        _one_line_error(capsys, argv[0], main(argv), str(weights), "non-finite", first)
        assert not (tmp_path / "out").exists(), name


@pytest.fixture
def broken_base(tiny_llama_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    return base


@pytest.mark.parametrize("damage", ["truncated", "flipped header byte", "integer dtype"])
def test_a_damaged_base_model_is_one_line_in_every_command(broken_base, good_adapter, data_file, tmp_path, capsys,
                                                           damage):
    edit, words = DAMAGE[damage]
    weights = broken_base / "model.safetensors"
    weights.write_bytes(edit(weights.read_bytes()))
    before = _snapshot(broken_base)
    commands = _commands(broken_base, good_adapter, data_file, tmp_path / "out")
    commands["train"] = [a for a in commands.pop("train --init-adapter") if a != "--init-adapter"
                         and a != str(good_adapter)]
    commands["eval base"] = [a for a in commands["eval"] if a not in ("--adapter", str(good_adapter))]
    del commands["export gguf"]          # reads the base's config only, never its weights
    for name, argv in commands.items():
        code = main(argv)
        if name == "chat":               # transformers reads the weights; its refusal names the folder
            _one_line_error(capsys, "chat", code, str(broken_base))
        else:
            _one_line_error(capsys, argv[0], code, str(weights), words)
        assert not (tmp_path / "out").exists(), name
    assert _snapshot(broken_base) == before


def test_a_base_config_that_is_not_json_names_its_file(broken_base, good_adapter, data_file, tmp_path, capsys):
    config = broken_base / "config.json"
    config.write_text(config.read_text()[:-20])
    for name, argv in _commands(broken_base, good_adapter, data_file, tmp_path / "out").items():
        if name == "chat":
            continue     # transformers parses config.json itself: a one-line error, named by folder (below)
        _one_line_error(capsys, argv[0], main(argv), str(config), "not valid JSON")


@pytest.fixture(scope="module")
def cut_gguf(tiny_llama_dir, tmp_path_factory):
    from bench.gguf_base import write_gguf_base

    path = write_gguf_base(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def test_a_truncated_gguf_is_one_line_in_every_command(cut_gguf, good_adapter, data_file, tmp_path, capsys,
                                                       monkeypatch):
    monkeypatch.setenv("LORA_LAB_HOME", str(tmp_path / "home"))
    commands = _commands(cut_gguf, good_adapter, data_file, tmp_path / "out")
    commands["models resolve"] = ["models", "resolve", str(cut_gguf)]
    commands["corpus"] = ["corpus", "--model", str(cut_gguf), str(data_file)]
    commands["train"] = ["train", "--model", str(cut_gguf), "--data", str(data_file), "--out", str(tmp_path / "out"),
                         "--steps", "1", "--backend", "cpu"]
    for name, argv in commands.items():
        _one_line_error(capsys, argv[0], main(argv), str(cut_gguf), "truncated")
        assert not (tmp_path / "out").exists(), name
    assert not (tmp_path / "home" / "models").exists() or not any((tmp_path / "home" / "models").iterdir())
