"""GGUF LoRA adapter export, read back with gguf.GGUFReader: metadata, names, shapes, values vs PEFT."""
from __future__ import annotations

import errno
import math

import numpy as np
import pytest

from engine.atomic import DiskFullError
from engine.export.gguf import GGUF_ARCHS, GGUF_TENSOR_NAMES, export_gguf_adapter, llama_permute_rows
from engine.lora.peft_read import read_base_config
from bench.peft_adapters import load_base, make_adapter, make_mistral, quiet_peft
from bench.tiny_models import ARCHITECTURES

MODEL_TYPES = (*ARCHITECTURES, "mistral", "gemma3", "gemma2", "phi3")
# Phi-3's projections as llama.cpp's phi3 arch holds them: fused attn_qkv and ffn_up (gate then up).
PHI3_PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def projections(arch: str) -> list[str]:
    fused = ("self_attn.qkv_proj", "mlp.gate_up_proj")
    return list(PHI3_PROJECTIONS) if arch == "phi3" else [p for p in GGUF_TENSOR_NAMES if p not in fused]


@pytest.fixture(scope="module")
def bases(tiny_model_dirs, tiny_gemma3_dir, tiny_gemma2_dir, tiny_phi3_dir, tmp_path_factory):
    return {**tiny_model_dirs, "mistral": make_mistral(tmp_path_factory.mktemp("tiny-mistral")),
            "gemma3": tiny_gemma3_dir, "gemma2": tiny_gemma2_dir, "phi3": tiny_phi3_dir}


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory):
    return {arch: make_adapter(bases[arch], tmp_path_factory.mktemp(f"adapter-{arch}"), seed=3,
                               target_modules=[p.split(".")[-1] for p in projections(arch)])
            for arch in MODEL_TYPES}


def _fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def _tensors(reader) -> dict:
    return {t.name: (tuple(int(n) for n in t.shape), np.array(t.data)) for t in reader.tensors}


def _peft_lora(base_dir, adapter_dir) -> dict:
    """{gguf base name: (A, B, PEFT delta)} from PEFT's own loaded layers."""
    from peft import PeftModel

    with quiet_peft():
        model = PeftModel.from_pretrained(load_base(base_dir), adapter_dir)
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            parts = name.split(".")  # base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}
            gguf_name = f"blk.{parts[4]}.{GGUF_TENSOR_NAMES['.'.join(parts[5:7])]}.weight"
            out[gguf_name] = (module.lora_A["default"].weight.detach().numpy(),
                              module.lora_B["default"].weight.detach().numpy(),
                              module.get_delta_weight("default").detach().numpy())
    return out


def _reference_permutation(rows: int, n_head: int) -> np.ndarray:
    """Index form of llama.cpp's Q/K permutation: GGUF row h*d + 2j + t holds HF row h*d + t*d/2 + j."""
    d = rows // n_head
    order = np.empty(rows, dtype=np.int64)
    for h in range(n_head):
        for j in range(d // 2):
            for t in range(2):
                order[h * d + 2 * j + t] = h * d + t * (d // 2) + j
    return order


def test_permutation_matches_index_formula():
    w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
    for n_head in (1, 2, 3, 6):
        np.testing.assert_array_equal(llama_permute_rows(w, n_head), w[_reference_permutation(48, n_head)])


def test_tensor_names_are_llama_cpps():
    import gguf

    for arch in (*ARCHITECTURES, "gemma3", "gemma2", "phi3"):
        name_map = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), 4)
        for projection in projections(arch):
            assert name_map.get_name(f"model.layers.3.{projection}") == f"blk.3.{GGUF_TENSOR_NAMES[projection]}"


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("arch", MODEL_TYPES)
def test_gguf_reads_back_as_peft(arch, dtype, bases, adapters, tmp_path):
    import gguf

    base_dir = bases[arch]
    permuted = arch in ("llama", "mistral")
    result = export_gguf_adapter(adapters[arch], base_dir, tmp_path / "a.gguf", dtype=dtype)
    reader = gguf.GGUFReader(result.path)
    fields = _fields(reader)
    model_type = read_base_config(base_dir)["model_type"]
    assert fields["general.architecture"] == GGUF_ARCHS[model_type][0] == ("llama" if permuted else arch)
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(8.0)

    cfg = read_base_config(base_dir)
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    tensors = _tensors(reader)
    peft = _peft_lora(base_dir, adapters[arch])
    expected_names = {f"{n}.lora_{ab}" for n in peft for ab in "ab"}
    assert set(tensors) == expected_names
    assert len(expected_names) == 2 * len(projections(arch)) * cfg["num_hidden_layers"]
    np_dtype = np.float32 if dtype == "f32" else np.float16
    for name, (a, b, _) in peft.items():
        (shape_a, got_a), (shape_b, got_b) = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        assert shape_a == (a.shape[1], a.shape[0]) and shape_b == (b.shape[1], b.shape[0])  # ggml ne order
        assert got_a.dtype == np_dtype and got_b.dtype == np_dtype
        if permuted and (".attn_q." in name or ".attn_k." in name):
            b = b[_reference_permutation(b.shape[0], n_head if ".attn_q." in name else n_kv)]
        np.testing.assert_array_equal(got_a, a.astype(np_dtype))
        np.testing.assert_array_equal(got_b, b.astype(np_dtype))
    if permuted:
        assert sorted(result.permuted) == sorted(n for n in peft if ".attn_q." in n or ".attn_k." in n)
    else:
        assert result.permuted == ()


def _llama_cpp_delta(reader, name: str, alpha: float, unpermute_heads: int | None) -> np.ndarray:
    """What llama.cpp adds to the weight: alpha / r * B @ A, rows mapped back to HF order."""
    tensors = _tensors(reader)
    a, b = (tensors[f"{name}.lora_{x}"][1].astype(np.float64) for x in "ab")
    delta = alpha / a.shape[0] * (b @ a)
    if unpermute_heads:
        delta[_reference_permutation(delta.shape[0], unpermute_heads)] = delta.copy()
    return delta


@pytest.mark.parametrize("config", [
    dict(r=8, lora_alpha=16, use_rslora=True),
    dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6}, alpha_pattern={"v_proj": 3.0}),
], ids=["rslora", "patterns"])
def test_llama_cpp_scaling_reproduces_peft_delta(config, tiny_llama_dir, tmp_path):
    import gguf

    adapter_dir = make_adapter(tiny_llama_dir, tmp_path / "adapter", **config)
    result = export_gguf_adapter(adapter_dir, tiny_llama_dir, tmp_path / "a.gguf", dtype="f32")
    reader = gguf.GGUFReader(result.path)
    alpha = float(_fields(reader)["adapter.lora.alpha"])
    if config.get("use_rslora"):
        # alpha' = alpha * sqrt(r), so llama.cpp's alpha'/r equals rsLoRA's alpha/sqrt(r); B is not touched.
        assert alpha == pytest.approx(16 * math.sqrt(8), rel=1e-6) and result.rescaled == ()
    else:
        # A different rank alone needs nothing (PEFT divides by each module's rank too); alpha_pattern does.
        assert sorted(result.rescaled) == ["blk.0.attn_v.weight", "blk.1.attn_v.weight"]
    for name, (_, _, peft_delta) in _peft_lora(tiny_llama_dir, adapter_dir).items():
        heads = {"attn_q": 3, "attn_k": 1}.get(name.split(".")[2])
        np.testing.assert_allclose(_llama_cpp_delta(reader, name, alpha, heads), peft_delta, rtol=1e-5, atol=1e-6)


def test_unknown_architecture_is_refused(tiny_llama_dir, adapters, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    (base / "config.json").write_text((base / "config.json").read_text().replace('"llama"', '"gpt_neox"'))
    with pytest.raises(ValueError, match="'gpt_neox' is not supported"):
        export_gguf_adapter(adapters["llama"], base, tmp_path / "out" / "a.gguf")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_f16_overflow_is_refused_and_f32_works(tiny_llama_dir, tmp_path):
    adapter_dir = make_adapter(tiny_llama_dir, tmp_path / "adapter", b_std=1e6)
    with pytest.raises(ValueError, match="overflows f16"):
        export_gguf_adapter(adapter_dir, tiny_llama_dir, tmp_path / "a.gguf", dtype="f16")
    assert export_gguf_adapter(adapter_dir, tiny_llama_dir, tmp_path / "a.gguf", dtype="f32").size_bytes > 0


def test_full_disk_leaves_no_partial_file(tiny_llama_dir, adapters, tmp_path, monkeypatch):
    import gguf

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    out = tmp_path / "out"
    with pytest.raises(DiskFullError, match="disk full while writing .*a.gguf"):
        export_gguf_adapter(adapters["llama"], tiny_llama_dir, out / "a.gguf")
    assert list(out.iterdir()) == []


def test_permutation_is_what_transformers_gguf_loader_undoes(bases, tmp_path):
    """Independent oracle: transformers' GGUF loader reverses llama.cpp's Q/K permutation on load, so a base
    written with our permutation must load back with the original HF weights (llama and mistral alike)."""
    from transformers import AutoModelForCausalLM

    from bench.gguf_base import write_gguf_base

    for arch in ("llama", "mistral"):  # the permuted ones (transformers cannot load a GGUF qwen3 whose head_dim
        #                               is not hidden/heads, and qwen is not permuted anyway)
        path = write_gguf_base(bases[arch], tmp_path / f"{arch}.gguf")
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).state_dict()
        original = load_base(bases[arch]).state_dict()
        for key in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
            assert (loaded[key] == original[key]).all(), (arch, key)
