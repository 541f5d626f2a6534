"""engine.model.files: every damaged safetensors or GGUF file is refused by name, and nothing the readers accept is
refused. Hypothesis edits real files' headers and cuts them at random places."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.model.files import WeightFileError, check_gguf, read_json_object, safetensors_header


def _safetensors_bytes() -> bytes:
    from safetensors.numpy import save

    return save({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(5, np.float16)},
                metadata={"format": "pt"})


def _loads(path) -> bool:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        load_file(path)
        return True
    except SafetensorError:
        return False


def test_a_whole_file_passes(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(_safetensors_bytes())
    entries = safetensors_header(path)
    assert {k: (e.dtype, e.shape, e.nbytes) for k, e in entries.items()} == {"a": ("F32", (2, 3), 24),
                                                                             "b": ("F16", (5,), 10)}


def _header_edit(data: bytes, edit) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


CASES = {
    "empty": (lambda d: b"", "empty"),
    "truncated": (lambda d: d[:len(d) - 7], "truncated"),
    "cut in the length": (lambda d: d[:5], "only 5 bytes"),
    "huge header length": (lambda d: struct.pack("<Q", 1 << 40) + d[8:], "more than safetensors allows"),
    "header longer than the file": (lambda d: struct.pack("<Q", len(d)) + d[8:], "truncated"),
    "small header length": (lambda d: struct.pack("<Q", 10) + d[8:], "not valid JSON"),
    "flipped header byte": (lambda d: d[:8] + bytes([d[8] ^ 0xFF]) + d[9:], "not valid JSON"),
    "a dtype that lies about its size": (lambda d: _header_edit(d, lambda h: h["a"].update(dtype="F64")),
                                         "does not match the data"),
    "a list header": (lambda d: struct.pack("<Q", 2) + b"[]", "not an object"),
    "unknown dtype": (lambda d: _header_edit(d, lambda h: h["a"].update(dtype="Q4")), "unknown dtype"),
}


@pytest.mark.parametrize("case", CASES)
def test_each_damage_is_one_sentence_naming_the_file(tmp_path, case):
    damage, words = CASES[case]
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(damage(_safetensors_bytes()))
    with pytest.raises(WeightFileError) as info:
        safetensors_header(path, "adapter weights")
    message = str(info.value)
    assert message.startswith(f"{path}: ") and words in message and "\n" not in message
    assert "again" in message            # what to do
    assert not _loads(path)              # safetensors refuses it too: nothing valid was refused


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 200), flips=st.lists(st.tuples(st.integers(0, 199), st.integers(1, 255)), max_size=3),
       length=st.one_of(st.none(), st.integers(0, 1 << 64 - 1)))
def test_random_damage_is_refused_exactly_when_safetensors_refuses_it(tmp_path, cut, flips, length):
    data = bytearray(_safetensors_bytes())
    for at, bits in flips:
        if at < len(data):
            data[at] ^= bits
    if length is not None:
        data[:8] = struct.pack("<Q", length)
    path = tmp_path / "w.safetensors"
    path.write_bytes(bytes(data[:cut] if cut < len(data) else data))
    try:
        safetensors_header(path)
        accepted = True
    except WeightFileError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
        accepted = False
    if accepted:
        assert _loads(path)      # what we accept, safetensors reads; what it refuses, we refused by name first


@pytest.fixture(scope="module")
def gguf_file(tiny_llama_dir, tmp_path_factory):
    from bench.gguf_base import write_gguf_base

    return write_gguf_base(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_a_whole_gguf_passes(gguf_file):
    check_gguf(gguf_file)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(0.0, 0.9999))
def test_a_cut_gguf_is_refused_by_name(gguf_file, tmp_path, fraction):
    data = gguf_file.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:int(len(data) * fraction)])
    with pytest.raises(WeightFileError) as info:
        check_gguf(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_a_gguf_with_a_flipped_string_byte_is_refused_by_name(gguf_file, tmp_path):
    data = bytearray(gguf_file.read_bytes())
    at = data.index(b"general.architecture")
    data[at] = 0x91                      # not UTF-8: gguf-py raised UnicodeDecodeError naming no file
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(WeightFileError, match=r"bad\.gguf: .*cannot be read as GGUF"):
        check_gguf(path)


def test_not_a_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04 a zip")
    with pytest.raises(WeightFileError, match="not a GGUF file"):
        check_gguf(path)


@pytest.mark.parametrize("text, words", [("{", r"not valid JSON \(Expecting"), ("[1]", "is a JSON list"),
                                         (b"\xff\xfe", "not UTF-8")])
def test_json_configs_name_their_file(tmp_path, text, words):
    path = tmp_path / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(WeightFileError, match=words) as info:
        read_json_object(path, "model config")
    assert str(info.value).startswith(f"{path}: this model config")
