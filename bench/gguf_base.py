"""Write a tiny HF model (tests/tiny.py) as a float32 GGUF *base* model, for the llama.cpp round-trip test.

The `gguf` package ships no full converter and llama.cpp's convert_hf_to_gguf.py needs a llama.cpp checkout
(and refuses our freshly trained BPE, whose pre-tokenizer hash it does not know), so this writes the few
hparams, the vocabulary and the tensors llama.cpp's llama/qwen2/qwen3 loaders read, with gguf's own tensor
name map and the Llama Q/K row permutation. The test checks llama.cpp's base logits against transformers, so
a mistake here fails loudly instead of hiding one in the adapter.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.model.weight_formats import WeightFormat, quantize


def write_gguf_base(model_dir: Path, out_path: Path, formats: tuple[str, ...] = ()) -> Path:
    """`formats` (engine.model.weight_formats names): 2-D weights are stored in them in turn (by gguf-py where it
    quantizes, else by engine.model.weight_formats), 1-D ones (norms, biases) stay f32; empty: every tensor f32."""
    import gguf
    from safetensors.numpy import load_file

    from engine.export.gguf import GGUF_ARCHS, llama_permute_rows

    cfg = json.loads((model_dir / "config.json").read_text())
    arch, permute = GGUF_ARCHS[cfg["model_type"]]
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    n_layers, n_head = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head

    w = gguf.GGUFWriter(out_path, arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(n_layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta")))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_vocab(w, model_dir, cfg)

    names = gguf.get_tensor_name_map(arch_enum, n_layers)
    n_stored = 0
    for key, value in load_file(model_dir / "model.safetensors").items():
        value = value.astype(np.float32)
        if permute and key.endswith("self_attn.q_proj.weight"):
            value = llama_permute_rows(value, n_head)
        elif permute and key.endswith("self_attn.k_proj.weight"):
            value = llama_permute_rows(value, n_kv)
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        assert name is not None, key
        if formats and value.ndim == 2:
            _add_stored(w, name, value, formats[n_stored % len(formats)])
            n_stored += 1
        else:
            w.add_tensor(name, np.ascontiguousarray(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


# What gguf.quants.quantize can write; the K-quants it only reads.
GGUF_QUANTIZES = (WeightFormat.F32, WeightFormat.F16, WeightFormat.BF16, WeightFormat.Q8_0, WeightFormat.Q4_0,
                  WeightFormat.Q4_1)


def gguf_bytes(x: np.ndarray, fmt: WeightFormat) -> bytes:
    """GGUF bytes of x in fmt: written by gguf-py where it can, else by engine.model.weight_formats.quantize."""
    if fmt in GGUF_QUANTIZES:
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize as gguf_quantize
        return np.ascontiguousarray(gguf_quantize(x, GGMLQuantizationType(fmt.value))).tobytes()
    return quantize(x, fmt)



def _add_stored(w, name: str, value: np.ndarray, fmt_name: str) -> None:
    import gguf

    fmt = WeightFormat.parse(fmt_name)
    raw = np.frombuffer(gguf_bytes(np.ascontiguousarray(value), fmt), np.uint8).reshape(value.shape[0], -1)
    w.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType(fmt.value))


def _add_vocab(w, model_dir: Path, cfg: dict) -> None:
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    special = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    vocab.update(special)
    size = cfg["vocab_size"]
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # UNUSED until filled
    for text, idx in vocab.items():
        tokens[idx] = text
        types[idx] = 3 if text in special else 1
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_bos_token(False)
