"""Write a PEFT LoRA adapter as a llama.cpp GGUF LoRA adapter, with the `gguf` package only.

What llama.cpp (src/llama-adapter.cpp, llama-graph.cpp) expects, and what this writes:
- metadata `general.architecture` = the base's llama.cpp arch (`llama` for Llama and Mistral, `qwen2`, `qwen3`,
  `gemma3` for Gemma 3 text, `gemma2` for Gemma 2, `phi3` for Phi-3 and Phi-4-mini (fused `attn_qkv`, `ffn_up`);
  the loader refuses a mismatch), `general.type` = `adapter`, `adapter.type` = `lora`, `adapter.lora.alpha`
  (float32).
- per adapted weight `blk.{i}.attn_q.weight` two tensors, `….lora_a` with torch shape (r, in) (ggml ne [in, r])
  and `….lora_b` with torch shape (out, r) (ggml ne [r, out]) — PEFT's own layouts, as convert_lora_to_gguf.py
  writes them. At run time llama.cpp adds `scale * B @ (A @ x)` with `scale = alpha / r`, r = lora_b's ne[0].
- Llama-family GGUF bases (Llama, Mistral) store wq and wk with their rows permuted (convert_hf_to_gguf.py's
  LlamaModel.permute, which reorders each head's rotary halves into interleaved pairs). B's rows are output
  rows, so the same row permutation is applied to lora_b of q_proj and k_proj; A is untouched. Qwen2/Qwen3 bases
  are not permuted.

Scaling. llama.cpp has one alpha per file and divides by each tensor's rank. We write
`alpha' = scale_0 * r_0` taken from the first module, so `alpha' / r` reproduces PEFT's scale exactly: for plain
LoRA alpha' = alpha, for rsLoRA (scale alpha/sqrt(r)) alpha' = alpha * sqrt(r), and B is left as trained. Only
where rank_pattern/alpha_pattern give a module a different scale is the remaining factor folded into its B.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.atomic import atomic_path, check_free_space
from engine.lora.peft_read import LoraAdapter, LoraModule, check_fits_base, read_adapter, read_base_config

# HF model_type -> (llama.cpp architecture name, whether its converter permutes Q/K rows).
GGUF_ARCHS: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "mistral": ("llama", True),  # llama.cpp converts MistralForCausalLM as a Llama (convert_hf_to_gguf.py)
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
    # Gemma 3 text: convert_hf_to_gguf.py's Gemma3Model (registered for Gemma3ForCausalLM) maps the seven
    # projections to the same blk names and permutes nothing (llama.cpp ropes Gemma 3 NEOX-style). Its +1 on
    # norm weights concerns the base only: an adapter holds no norm.
    "gemma3_text": ("gemma3", False),
    # Gemma 2: convert_hf_to_gguf.py's Gemma2Model, the same names and no permutation as Gemma 3.
    "gemma2": ("gemma2", False),
    # Phi-3 / Phi-4-mini: convert_hf_to_gguf.py's Phi3MiniModel keeps the fused weights (attn_qkv, and ffn_up
    # holding gate then up, 2·intermediate rows) and permutes nothing (llama.cpp ropes Phi-3 NEOX-style, partial
    # rotary included); PEFT's qkv_proj / gate_up_proj LoRA maps onto them as it is.
    "phi3": ("phi3", False),
}

# Projection (engine.lora.peft_read.PROJECTIONS) -> llama.cpp tensor base name inside blk.{i}.
GGUF_TENSOR_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",
}

GGUF_DTYPES = {"f16": np.float16, "f32": np.float32}
_F16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class GgufExport:
    path: Path
    arch: str                 # llama.cpp architecture written to general.architecture
    alpha: float              # adapter.lora.alpha as written
    n_tensors: int
    permuted: tuple[str, ...]  # tensor names whose lora_b rows were permuted
    rescaled: tuple[str, ...]  # tensor names whose lora_b carries a folded scale factor
    ranks: tuple[int, ...]     # rank of each adapted weight, in file order
    size_bytes: int


def gguf_arch(base_config: Mapping) -> tuple[str, bool]:
    """(llama.cpp arch, permute Q/K?) for a base config, or a ValueError saying why it cannot be exported."""
    model_type = base_config.get("model_type")
    if model_type not in GGUF_ARCHS:
        raise ValueError(f"cannot export to GGUF: base architecture {model_type!r} is not supported"
                         f" (supported: {', '.join(GGUF_ARCHS)}); use --to merged for a plain HF folder instead")
    return GGUF_ARCHS[model_type]


def llama_permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder rows as convert_hf_to_gguf.py's LlamaModel.permute does for wq (n_head) and wk (n_kv_head).

    Within each head the HF layout holds the rotary halves [x_0..x_{d/2-1}, y_0..y_{d/2-1}]; GGUF wants the
    pairs interleaved [x_0, y_0, x_1, y_1, …]. w: (n_head * head_dim, k) -> same shape.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot permute {rows} rows into {n_head} heads of even size")
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(adapter: LoraAdapter, base_config: Mapping) -> tuple[float, list[tuple[str, np.ndarray]],
                                                                       list[str], list[str]]:
    """(alpha', [(name, float32 array)], permuted names, rescaled names) in llama.cpp's layout and naming."""
    _, permute = gguf_arch(base_config)
    n_head = int(base_config["num_attention_heads"])
    n_kv = int(base_config.get("num_key_value_heads") or n_head)
    first = adapter.modules[0]
    alpha = first.scale * first.rank
    out, permuted, rescaled = [], [], []
    for mod in adapter.modules:
        name = f"blk.{mod.layer}.{GGUF_TENSOR_NAMES[mod.projection]}.weight"
        b = _b_for_llama_cpp(mod, alpha)
        if not np.isclose(mod.scale * mod.rank, alpha, rtol=1e-6, atol=0.0):
            rescaled.append(name)
        if permute and mod.projection in ("self_attn.q_proj", "self_attn.k_proj"):
            b = llama_permute_rows(b, n_head if mod.projection == "self_attn.q_proj" else n_kv)
            permuted.append(name)
        out.append((f"{name}.lora_a", np.ascontiguousarray(mod.a, dtype=np.float32)))
        out.append((f"{name}.lora_b", np.ascontiguousarray(b, dtype=np.float32)))
    return alpha, out, permuted, rescaled


def _b_for_llama_cpp(mod: LoraModule, alpha: float) -> np.ndarray:
    # llama.cpp applies alpha / rank; PEFT applies mod.scale. Fold the ratio into B only when they differ.
    factor = mod.scale * mod.rank / alpha
    return mod.b if np.isclose(factor, 1.0, rtol=1e-6, atol=0.0) else mod.b * np.float32(factor)


def export_gguf_adapter(adapter_dir: Path | str, base_dir: Path | str, out_path: Path | str,
                        dtype: str = "f32") -> GgufExport:
    """Write `adapter_dir` (PEFT) as a llama.cpp LoRA GGUF for the base model in `base_dir`, atomically."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"GGUF tensor type {dtype!r} is not supported; use one of {', '.join(GGUF_DTYPES)}")
    out_path = Path(out_path)
    adapter = read_adapter(adapter_dir)
    base_config = read_base_config(base_dir)
    arch, _ = gguf_arch(base_config)
    check_fits_base(adapter, base_config)
    alpha, tensors, permuted, rescaled = gguf_tensors(adapter, base_config)

    np_dtype = GGUF_DTYPES[dtype]
    if np_dtype is np.float16:
        worst = max(float(np.abs(t).max()) for _, t in tensors)
        if worst > _F16_MAX:
            raise ValueError(f"a LoRA value ({worst:.3g}) overflows f16; export with --gguf-dtype f32")
    payload = sum(t.size for _, t in tensors) * np.dtype(np_dtype).itemsize
    check_free_space(out_path.parent, payload + (1 << 20))

    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_name(adapter.path.resolve().name)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if np_dtype is np.float16 else gguf.LlamaFileType.ALL_F32)
        for name, array in tensors:
            writer.add_tensor(name, array.astype(np_dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return GgufExport(path=out_path, arch=arch, alpha=float(alpha), n_tensors=len(tensors),
                      permuted=tuple(permuted), rescaled=tuple(rescaled),
                      ranks=tuple(m.rank for m in adapter.modules), size_bytes=out_path.stat().st_size)
