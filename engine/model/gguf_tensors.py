"""A `.gguf` model's tensors as stored, one at a time, under their Hugging Face names, never dequantized.

`read_gguf_tensors(path)` memory-maps the file (gguf.GGUFReader) and yields `GgufTensor(name, format, shape,
raw)` where `raw` is the tensor's GGUF bytes [rows, bytes per row]: a view of the mapped file, or, for the
rows llama.cpp permutes, a permuted copy of that one tensor. `engine.model.weight_formats.dequantize(t.raw,
t.format, t.shape)` is then bit for bit the f32 tensor that transformers' GGUF loader makes of it (which chat
uses: engine.model.weights.from_pretrained_args).

Names and the Q/K row order come from that same loader: its GGUF -> HF name map, built from a weightless (meta
device) model of the file's config, and its per-architecture tensor processor, which undoes llama.cpp's Q/K row permutation for
Llama-family models. That permutation reorders whole rows, and blocks run along a row, so it applies to the
quantized bytes unchanged.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.model.weight_formats import WeightFormat


# llama.cpp architectures whose converter adds 1 to every norm weight (transformers' loader subtracts it from the
# dequantized values, which the raw-bytes path here cannot do).
NORM_SHIFTED_ARCHITECTURES = ("gemma", "gemma2", "gemma3")


@dataclass(frozen=True)
class GgufTensor:
    name: str                 # Hugging Face state-dict name (model.layers.0.self_attn.q_proj.weight)
    gguf_name: str            # as in the file (blk.0.attn_q.weight)
    format: WeightFormat
    shape: tuple[int, ...]    # torch shape: [out_features, in_features] for a weight, [n] for a norm or bias
    raw: np.ndarray           # uint8 [rows, bytes per row] (1-D tensors: [1, bytes]) in HF row order


def gguf_model_config(path: str | Path):
    """The transformers config of a GGUF model, as transformers reads it (no tensors are read)."""
    from transformers import AutoConfig

    path = Path(path)
    return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)


@dataclass(frozen=True)
class GgufEntry:
    """One tensor of a GGUF file, found but not read: `read()` gives its raw rows in HF row order."""
    gguf_name: str
    format: WeightFormat
    shape: tuple[int, ...]
    _data: np.ndarray = field(repr=False)       # the memory-mapped bytes
    _process: Callable = field(repr=False)      # the architecture's row processor (Llama Q/K un-permutation)

    def read(self) -> np.ndarray:
        rows = self.shape[0] if len(self.shape) == 2 else 1
        return self._process(self._data.view(np.uint8).reshape(rows, -1), self.gguf_name)


def gguf_tensor_index(path: str | Path) -> dict[str, GgufEntry]:
    """The tensor index (below) of the file as it is now, built once per process while its size and mtime stay
    (a run opens the model's weights to check them, to plan memory and to upload them; indexing the demo takes
    seconds)."""
    path = Path(path).resolve()
    stat = path.stat()
    return _gguf_tensor_index(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _gguf_tensor_index(path: Path, _size: int, _mtime_ns: int) -> dict[str, GgufEntry]:
    """{HF name: GgufEntry} of every tensor of the model at `path` that the HF model has, in file order.

    Tensors transformers' loader drops (rope_freqs and the like, which HF recomputes) are skipped as it skips
    them. A tensor in a format engine.model.weight_formats does not hold (q5_0, iq*, …) raises a ValueError naming
    it. The file stays memory-mapped; nothing is read until an entry's `read()`.
    """
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        read_field,
    )

    path = Path(path)
    reader = GGUFReader(path, "r")
    architecture = read_field(reader, "general.architecture")[0]
    if architecture in NORM_SHIFTED_ARCHITECTURES:
        raise ValueError(f"{path.name}: a {architecture} GGUF stores its norm weights as 1 + w (llama.cpp adds "
                         f"Gemma's 1); reading them as stored bytes is not supported. Use the model's Hugging Face "
                         f"folder (safetensors) instead")
    config = gguf_model_config(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    names = get_gguf_hf_weights_map(model, processor)
    del model
    parsed = {"config": config.to_dict(), "tensors": {}}

    def process(raw: np.ndarray, gguf_name: str) -> np.ndarray:
        # The processor reorders rows (Llama's Q/K) exactly as for the dequantized tensor in the f32 conversion.
        return processor.process(weights=raw, name=gguf_name, tensor_key_mapping=names,
                                 parsed_parameters=parsed).weights

    index = {}
    for t in reader.tensors:
        if t.name not in names:
            continue
        try:
            fmt = WeightFormat.parse(int(t.tensor_type))
        except ValueError:
            raise ValueError(f"{path.name}: tensor {t.name} is stored as {t.tensor_type.name}, which the engine "
                             f"cannot train on; supported: {', '.join(f.name for f in WeightFormat)}") from None
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        index[names[t.name]] = GgufEntry(t.name, fmt, shape, t.data, process)
    return index


def read_gguf_tensors(path: str | Path) -> Iterator[GgufTensor]:
    """Every tensor of gguf_tensor_index(path), read one at a time in file order."""
    for name, entry in gguf_tensor_index(path).items():
        yield GgufTensor(name, entry.gguf_name, entry.format, entry.shape, entry.read())
