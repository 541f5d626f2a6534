"""Where a model's frozen tensors come from, one tensor at a time and in the format they are stored in.

A `WeightSource` is a safetensors folder (f32, f16 or bf16, one file or shards) or a GGUF file (block formats
too). Both answer the same three questions: which tensors there are (`stored`: name, format, shape), a tensor's
bytes as stored (`raw`: uint8 [rows, bytes per row], GGUF's byte layout, which for f32/f16/bf16 is the plain
little-endian array), and a tensor as float32 (`f32`). `as_format` gives a tensor in another format, quantized
from its f32 values where the stored format differs. Nothing here holds more than the tensor asked for: a backend
converts and uploads tensor by tensor, so loading never builds a full f32 copy of the model.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.model.files import WeightFileError, check_gguf, safetensors_header
from engine.model.weight_formats import FORMATS, WeightFormat, dequantize, quantize

GGUF_MARKER = "lora-lab-source.json"   # a model folder whose weights are a GGUF file names it here ({"gguf": ...})


@dataclass(frozen=True)
class StoredTensor:
    name: str                    # Hugging Face state-dict name
    format: WeightFormat         # as stored in the file
    shape: tuple[int, ...]       # torch shape: [out, in] for a weight, [n] for a norm or bias


class WeightSource(ABC):
    origin: Path

    @abstractmethod
    def stored(self) -> dict[str, StoredTensor]:
        """Every tensor of the model, by name."""

    @abstractmethod
    def raw(self, name: str) -> np.ndarray:
        """uint8 [rows, bytes per row] of one tensor as stored (1-D tensors: one row)."""

    def require(self, name: str, shape: tuple[int, ...]) -> StoredTensor:
        """The tensor `name`, or a ValueError naming the model and what is wrong with it."""
        tensor = self.stored().get(name)
        if tensor is None:
            raise ValueError(f"{self.origin}: weight {name!r} is missing")
        if tensor.shape != tuple(shape):
            raise ValueError(f"{self.origin}: weight {name!r} has shape {tensor.shape}, expected {tuple(shape)}")
        return tensor

    def f32(self, name: str) -> np.ndarray:
        """One tensor as float32 in its torch shape (block formats dequantized exactly as gguf-py does)."""
        tensor = self.stored()[name]
        return dequantize(self.raw(name), tensor.format, tensor.shape).reshape(tensor.shape)

    def as_format(self, name: str, fmt: WeightFormat) -> np.ndarray:
        """uint8 [rows, bytes per row] of one tensor in `fmt`: as stored when it is stored so, else quantized (or
        widened) from its float32 values."""
        tensor = self.stored()[name]
        if tensor.format == fmt:
            return self.raw(name)
        rows = tensor.shape[0] if len(tensor.shape) == 2 else 1
        FORMATS[fmt].check_shape(tensor.shape, f"{self.origin}: {name}")
        return np.frombuffer(quantize(self.f32(name), fmt), np.uint8).reshape(rows, -1)


class SafetensorsWeights(WeightSource):
    """A Hugging Face folder's *.safetensors (adapters excluded), each tensor read on demand."""

    DTYPES = {"F32": WeightFormat.F32, "F16": WeightFormat.F16, "BF16": WeightFormat.BF16}

    def __init__(self, folder: Path):
        self.origin = folder
        self._files: dict[str, Path] = {}
        self._stored: dict[str, StoredTensor] = {}
        for file in safetensors_files(folder):
            # The header checked against the file first: a truncated or edited file is refused here, by name.
            for key, entry in safetensors_header(file, "model weights").items():
                if entry.dtype not in self.DTYPES:
                    raise WeightFileError(f"{file}: tensor {key} is stored as {entry.dtype}; the engine reads F32, "
                                          "F16 and BF16 safetensors")
                self._files[key] = file
                self._stored[key] = StoredTensor(key, self.DTYPES[entry.dtype], entry.shape)

    def stored(self) -> dict[str, StoredTensor]:
        return self._stored

    def raw(self, name: str) -> np.ndarray:
        import torch
        from safetensors import safe_open

        with safe_open(self._files[name], framework="pt") as handle:
            tensor = handle.get_tensor(name)        # torch: numpy has no bfloat16
        shape = self._stored[name].shape
        rows = shape[0] if len(shape) == 2 else 1
        return tensor.contiguous().view(torch.uint8).numpy().reshape(rows, -1)


class GgufWeights(WeightSource):
    """A .gguf file's tensors under their Hugging Face names, memory-mapped, never dequantized unless asked.

    Names and llama.cpp's Q/K row order come from transformers' own GGUF loader (engine.model.gguf_tensors)."""

    def __init__(self, path: Path):
        from engine.model.gguf_tensors import gguf_tensor_index

        self.origin = path
        check_gguf(path)
        self._index = gguf_tensor_index(path)
        self._stored = {name: StoredTensor(name, entry.format, entry.shape) for name, entry in self._index.items()}

    def stored(self) -> dict[str, StoredTensor]:
        return self._stored

    def raw(self, name: str) -> np.ndarray:
        return self._index[name].read()


class ArrayWeights(WeightSource):
    """Tensors already in memory ({name: float32 array}): random models built for benchmarks and tests."""

    def __init__(self, arrays: dict[str, np.ndarray], origin: str = "arrays"):
        self.origin = Path(origin)
        self._arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}
        self._stored = {k: StoredTensor(k, WeightFormat.F32, v.shape) for k, v in self._arrays.items()}

    def stored(self) -> dict[str, StoredTensor]:
        return self._stored

    def raw(self, name: str) -> np.ndarray:
        array = self._arrays[name]
        return array.view(np.uint8).reshape(array.shape[0] if array.ndim == 2 else 1, -1)

    def f32(self, name: str) -> np.ndarray:
        return self._arrays[name]


class FusedSplit(WeightSource):
    """Another source with Phi-3's fused projections also under their members' names: qkv_proj's rows
    [q | k | v] as q_proj, k_proj and v_proj, gate_up_proj's [gate | up] (Phi3MLP's chunk(2) order) as gate_proj
    and up_proj. A member is a block of whole rows, so its bytes are the fused tensor's rows in any stored format
    (GGUF blocks run along a row). The fused names stay (`views` are the added ones), so checks against
    transformers' own names still find them."""

    def __init__(self, inner: WeightSource):
        from engine.model.hf_names import FUSED_TARGETS

        self.origin, self.inner = inner.origin, inner
        self._stored = dict(inner.stored())
        self.views: dict[str, tuple[str, int, int]] = {}     # member name -> (fused name, first row, rows)
        for name, tensor in inner.stored().items():
            for fused, members in FUSED_TARGETS.items():
                if not name.endswith(f".{fused}.weight") or len(tensor.shape) != 2:
                    continue
                rows = tensor.shape[0]
                if fused == "qkv_proj":
                    # q's width is o_proj's input; k and v share the rest equally.
                    o_proj = self._stored.get(name.replace(".qkv_proj.", ".o_proj."))
                    q = o_proj.shape[1] if o_proj is not None and len(o_proj.shape) == 2 else None
                    if q is None or q >= rows or (rows - q) % 2:
                        raise ValueError(f"{self.origin}: {name} has {rows} rows, which its o_proj "
                                         f"({o_proj.shape if o_proj else 'missing'}) does not split into q, k, v")
                    sizes = (q, (rows - q) // 2, (rows - q) // 2)
                else:
                    if rows % 2:
                        raise ValueError(f"{self.origin}: {name} has {rows} rows; gate_up_proj holds gate and up")
                    sizes = (rows // 2, rows // 2)
                first = 0
                for member, n in zip(members, sizes):
                    view = name.replace(f".{fused}.", f".{member}.")
                    self.views[view] = (name, first, n)
                    self._stored[view] = StoredTensor(view, tensor.format, (n, tensor.shape[1]))
                    first += n

    def stored(self) -> dict[str, StoredTensor]:
        return self._stored

    def raw(self, name: str) -> np.ndarray:
        if name not in self.views:
            return self.inner.raw(name)
        fused, first, rows = self.views[name]
        return self.inner.raw(fused)[first:first + rows]


def split_fused(source: WeightSource) -> WeightSource:
    """`source` itself, or a FusedSplit of it where it stores fused projections (Phi-3); a source already split
    (open_weights splits what it opens) is returned as it is, not wrapped again."""
    from engine.model.hf_names import FUSED_TARGETS

    if isinstance(source, FusedSplit):
        return source
    fused = tuple(f".{name}.weight" for name in FUSED_TARGETS)
    return FusedSplit(source) if any(name.endswith(fused) for name in source.stored()) else source


def safetensors_files(folder: Path) -> list[Path]:
    files = [f for f in sorted(Path(folder).glob("*.safetensors")) if not f.name.startswith("adapter_")]
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (convert .bin checkpoints or a .gguf first)")
    return files


def gguf_of(folder: Path) -> Path | None:
    """The GGUF file a model folder's weights live in, when the folder was made from one and holds no copy.

    engine.model.references writes the marker with the file's size and mtime; a GGUF that has since been
    replaced or moved is refused here rather than read with a config and tokenizer made from another file."""
    marker = Path(folder) / GGUF_MARKER
    if not marker.is_file() or any(Path(folder).glob("model*.safetensors")):
        return None
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
        name = info.get("gguf")
    except (json.JSONDecodeError, AttributeError):
        return None
    if not name:
        return None
    # The demo's marker names its GGUF by file name: it lies beside the folder.
    path = Path(name) if Path(name).is_absolute() else Path(folder).parent / name
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: its weights are the GGUF file {path}, which is gone; pass the .gguf "
                                "file itself as the model again (its folder is then made anew)")
    stat = path.stat()
    recorded = (info.get("size"), info.get("mtime_ns"))
    if recorded != (None, None) and recorded != (stat.st_size, stat.st_mtime_ns):
        raise ValueError(f"{folder}: the GGUF file {path} changed since this folder was made from it (size, mtime "
                         f"{recorded[0]}, {recorded[1]} then, {stat.st_size}, {stat.st_mtime_ns} now); pass the "
                         ".gguf file itself as the model again (its folder is then made anew)")
    return path


def from_pretrained_args(folder: Path) -> tuple[Path, dict]:
    """(path, extra keyword arguments) for transformers' `from_pretrained` to load a model folder's weights: the
    folder itself, or, when its weights are a GGUF file, that file through transformers' GGUF loader."""
    gguf = gguf_of(folder)
    if gguf is None:
        return Path(folder), {}
    from transformers import GgufConfig

    # Dense weights in the dtype asked for: peft's LoRA layers wrap plain Linear modules, not transformers'
    # packed GgufLinear (which also needs the `kernels` package, and warns about non-f32 dtypes without it).
    return gguf.parent, {"gguf_file": gguf.name, "quantization_config": GgufConfig(dequantize=True)}


def open_weights(model: str | Path) -> WeightSource:
    """The weights of a model folder (its safetensors, or the GGUF file it was made from) or of a .gguf file."""
    model = Path(model)
    if model.is_file() and model.suffix.lower() == ".gguf":
        return split_fused(GgufWeights(model))
    gguf = gguf_of(model)
    return split_fused(GgufWeights(gguf) if gguf is not None else SafetensorsWeights(model))


def load_weights(model: str | Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """{name: float32 array} of every tensor (or of `names`): for tests and small models only, since it holds the
    whole f32 model; the backends read tensor by tensor through open_weights. Phi-3's fused projections are
    given as stored (not also split)."""
    source = open_weights(model)
    views = getattr(source, "views", {})
    return {name: source.f32(name) for name in (names if names is not None else source.stored()) if
            names is not None or name not in views}


def check_model_files(folder: str | Path) -> None:
    """Refuse a model folder whose weight files are damaged or do not match its config.json, before a consumer
    that loads through transformers (chat) reads them: transformers fills a missing weight with random values
    and answers, so a 4-layer config over 2-layer weights, or a GPT-2 config over Llama weights, must stop here.

    Checks headers only (engine.model.files) and compares names and shapes with a weightless (meta device) model
    of the config. A folder with neither safetensors nor a GGUF (.bin weights) is left to transformers."""
    folder = Path(folder)
    if gguf_of(folder) is None and not [f for f in folder.glob("*.safetensors") if not f.name.startswith("adapter_")]:
        return
    stored = open_weights(folder).stored()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, ZeroDivisionError, AttributeError) as exc:
        raise WeightFileError(f"{folder / 'config.json'}: transformers cannot build this model from it "
                              f"({type(exc).__name__}: {exc}); fix or restore config.json") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    if getattr(config, "tie_word_embeddings", False):
        expected = {k: v for k, v in expected.items() if not k.startswith("lm_head.")}
    del model
    missing, wrong = [], []
    for name, shape in expected.items():
        # Some checkpoints (GPT-2's) store the base model's weights without its prefix; transformers accepts both.
        tensor = stored.get(name) or (stored.get(name[len(prefix):]) if prefix and name.startswith(prefix) else None)
        if tensor is None:
            missing.append(name)
        elif tensor.shape != shape:
            wrong.append(f"{name} is {list(tensor.shape)}, the config needs {list(shape)}")
    if missing or wrong:
        detail = _mismatch(missing, wrong)
        raise WeightFileError(f"{folder}: the weights do not match config.json ({config.model_type}, "
                              f"{getattr(config, 'num_hidden_layers', '?')} layers): {detail}; the config and "
                              "the weights come from different models — restore the folder from one source")


def _mismatch(missing: list[str], wrong: list[str]) -> str:
    """"3 weights the config needs are missing (e.g. …); 1 has the wrong shape (e.g. …)" for a refusal."""
    parts = ([f"{len(missing)} weights the config needs are missing (e.g. {missing[0]})"] if missing else []) + \
            ([f"{len(wrong)} have the wrong shape (e.g. {wrong[0]})"] if wrong else [])
    return "; ".join(parts)


def block_tensor_shapes(spec) -> dict[str, tuple[int, ...]]:
    """Torch shapes of one decoder block's frozen tensors by short name (hf_names.LAYER_TENSORS, with Gemma's and
    OLMo 2's POST_NORM_TENSORS), as `spec` (a ModelSpec) needs them: the one list both the weight check
    (expected_shapes) and the WGSL engine's buffers (backends.wgpu.buffers.layer_weight_shapes) read."""
    from engine.model.hf_names import bias_name

    C, I, HD = spec.hidden, spec.intermediate, spec.head_dim
    block = {"ln1": (C,), "q": (spec.q_dim, C), "k": (spec.kv_dim, C), "v": (spec.kv_dim, C), "o": (C, spec.q_dim),
             "ln2": (C,), "gate": (I, C), "up": (I, C), "down": (C, I)}
    if not spec.pre_norms:
        del block["ln1"], block["ln2"]
    for target in spec.bias_targets:
        block[bias_name(target)] = (spec.projection_shape(target)[0],)
    if spec.qk_norm:
        full = spec.qk_norm_full      # OLMo 2 normalises the whole projection, the others each head
        block.update(q_norm=(spec.q_dim if full else HD,), k_norm=(spec.kv_dim if full else HD,))
    if spec.post_norms:
        block.update(post_attn_norm=(C,), post_mlp_norm=(C,))
    return block


def expected_shapes(spec) -> dict[str, tuple[int, ...]]:
    """{Hugging Face name: torch shape} of every frozen tensor the engines read for `spec` (a ModelSpec)."""
    from engine.model.hf_names import EMBED_WEIGHT, FINAL_NORM_WEIGHT, LM_HEAD_WEIGHT, layer_tensor

    out = {EMBED_WEIGHT: (spec.vocab_size, spec.hidden), FINAL_NORM_WEIGHT: (spec.hidden,)}
    if not spec.tied_embeddings:
        out[LM_HEAD_WEIGHT] = (spec.vocab_size, spec.hidden)
    block = block_tensor_shapes(spec)
    for i in range(spec.layers):
        out.update({layer_tensor(i, name, spec.post_norms): shape for name, shape in block.items()})
    return out


def check_weights_fit(spec, source: WeightSource) -> None:
    """Refuse, before any backend is built, weights that lack a tensor `spec` needs or hold one of another shape
    (a config.json from another model: hidden_size, vocab_size or layer count that the weights do not have)."""
    stored = source.stored()
    missing, wrong = [], []
    for name, shape in expected_shapes(spec).items():
        if name not in stored:
            missing.append(name)
        elif stored[name].shape != shape:
            wrong.append(f"{name} is {list(stored[name].shape)}, the config needs {list(shape)}")
    if missing or wrong:
        detail = _mismatch(missing, wrong)
        raise WeightFileError(f"{source.origin}: the weights do not match config.json ({spec.model_type}, "
                              f"{spec.layers} layers, hidden size {spec.hidden}, vocabulary {spec.vocab_size}): "
                              f"{detail}; the config and the weights come from different models — restore the "
                              "folder from one source")
