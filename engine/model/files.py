"""The one check every weight or config file passes before anything reads it: safetensors, GGUF and JSON configs.

safetensors and gguf-py read well-formed files fast, but a truncated, empty or edited one makes them raise
their own errors (`SafetensorError: … InvalidHeaderDeserialization`, `struct.error: unpack_from requires a
buffer…`, `cannot reshape array of size 66784 into shape (576,360)`) that name neither the file nor what to do.
These functions read only the headers, check them against the file's size, and raise `WeightFileError`: one
sentence naming the file, what is wrong with it and what to do. Nothing is read past a header here; the readers
(engine.model.weights, engine.lora.peft_read, engine.train.checkpoint) call them first.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from engine.errors import UserError

# safetensors' own limit on the JSON header (safetensors/src/tensor.rs MAX_HEADER_SIZE).
MAX_SAFETENSORS_HEADER = 100_000_000

# Bytes per element of every dtype the safetensors format defines.
SAFETENSORS_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                          "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = ("F32", "F16", "BF16")

_REDO = "download or export it again"


class WeightFileError(UserError, ValueError):
    """A weight or config file that cannot be read; the message names the file, what is wrong and what to do.

    A ValueError too, so every caller that already reports ValueError as one line reports this one."""


@dataclass(frozen=True)
class SafetensorsEntry:
    dtype: str                 # as in the header: "F32", "BF16", …
    shape: tuple[int, ...]
    nbytes: int


def safetensors_header(path: str | Path, what: str = "weights") -> dict[str, SafetensorsEntry]:
    """{tensor name: entry} of a safetensors file, after checking that its header is whole and that every
    tensor's bytes lie inside the file and match its dtype and shape; WeightFileError otherwise."""
    path = Path(path)

    def bad(why: str) -> WeightFileError:
        return WeightFileError(f"{path}: {why}; this {what} file is corrupt or incomplete — {_REDO}")

    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if size < 8:
                raise bad("the file is empty" if size == 0 else f"the file is only {size} bytes, shorter than a "
                          "safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_SAFETENSORS_HEADER:
                raise bad(f"its header claims {length:,} bytes, more than safetensors allows "
                          f"({MAX_SAFETENSORS_HEADER:,})")
            if length > size - 8:
                raise bad(f"its header claims {length:,} bytes but the file holds {size - 8:,} after the length "
                          "field (truncated?)")
            raw = handle.read(length)
    except OSError as exc:
        raise WeightFileError(f"{path}: cannot read this {what} file ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {type(header).__name__}, not an object")
    data_bytes = size - 8 - length
    entries, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise bad(f"tensor {name!r} has no dtype, shape and offsets in the header")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in SAFETENSORS_ITEM_BYTES:
            raise bad(f"tensor {name!r} has the unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise bad(f"tensor {name!r} has the shape {shape!r}, not a list of sizes")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise bad(f"tensor {name!r} has the data offsets {offsets!r}")
        count = 1
        for n in shape:
            count *= n
        nbytes = count * SAFETENSORS_ITEM_BYTES[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise bad(f"tensor {name!r} is {dtype} {shape} ({nbytes:,} bytes) but the header gives it "
                      f"{offsets[1] - offsets[0]:,} bytes (a dtype or shape that does not match the data)")
        if offsets[1] > data_bytes:
            raise bad(f"tensor {name!r} ends at byte {offsets[1]:,} of the data but the file holds "
                      f"{data_bytes:,} (truncated?)")
        entries[name] = SafetensorsEntry(dtype, tuple(shape), nbytes)
        spans.append(tuple(offsets))
    spans.sort()
    end = 0
    for start, stop in spans:   # safetensors requires the data to be exactly the tensors, back to back
        if start != end:
            raise bad(f"its tensors' data {'overlaps' if start < end else 'has a gap'} at byte {min(start, end):,}")
        end = stop
    if end != data_bytes:
        raise bad(f"its tensors take {end:,} bytes but the file holds {data_bytes:,} after the header")
    return entries


def check_gguf(path: str | Path) -> None:
    """Open a .gguf file's header and tensor table and check that every tensor's data lies inside the file;
    WeightFileError otherwise. gguf-py memory-maps the file, so this reads no tensor data."""
    path = Path(path)

    def bad(why: str) -> WeightFileError:
        return WeightFileError(f"{path}: {why}; this GGUF file is corrupt or incomplete — {_REDO}")

    try:
        size = path.stat().st_size
    except OSError as exc:
        raise WeightFileError(f"{path}: cannot read this GGUF file ({exc.strerror or exc})") from None
    if size == 0:
        raise bad("the file is empty")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise WeightFileError(f"{path}: cannot read this GGUF file ({exc.strerror or exc})") from None
    if magic != b"GGUF":
        raise WeightFileError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a .gguf model "
                              "or a Hugging Face model folder")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path, "r")
    except (ValueError, struct.error, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError) as exc:
        # gguf-py builds numpy views of the tensor table and data: a cut file fails while it does.
        raise bad(f"its {size:,} bytes cannot be read as GGUF: the header, the tensor table or a tensor's data "
                  f"runs short or is garbled (truncated? gguf-py: {exc})") from None
    except OSError as exc:
        raise WeightFileError(f"{path}: cannot read this GGUF file ({exc.strerror or exc})") from None
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise bad(f"tensor {tensor.name} ends at byte {end:,} but the file has {size:,} (truncated?)")


def read_json_object(path: str | Path, what: str) -> dict:
    """A JSON config file (config.json, adapter_config.json) as a dict; WeightFileError naming the file when it
    cannot be read, is not JSON, or is not an object. `what` says what the file is, for the message."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise WeightFileError(f"{path}: this {what} is not UTF-8 text; restore it from the model's source") from None
    except OSError as exc:
        raise WeightFileError(f"{path}: cannot read this {what} ({exc.strerror or exc})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WeightFileError(f"{path}: this {what} is not valid JSON ({exc.msg} at line {exc.lineno} column "
                              f"{exc.colno}); fix or restore it") from None
    if not isinstance(value, dict):
        raise WeightFileError(f"{path}: this {what} is a JSON {type(value).__name__}, expected an object "
                              "({\"key\": value, ...}); fix or restore it")
    return value
