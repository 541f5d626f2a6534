"""llama.cpp itself (llama-cpp-python) runs a GGUF base plus our LoRA GGUF and moves the logits as PEFT does.

llama-cpp-python builds llama.cpp from source, so it is not a CI dependency: the module skips without it.
The base GGUF is written by tests/gguf_base.py; its own logits are checked against transformers first.
To run it (about 4 minutes of compiling on 2 cores, llama-cpp-python 0.3.36):

    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
      -DLLAMA_BUILD_SERVER=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 pip install llama-cpp-python
"""
from __future__ import annotations

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from engine.export.gguf import GGUF_ARCHS, export_gguf_adapter  # noqa: E402
from bench.gguf_base import write_gguf_base  # noqa: E402
from bench.peft_adapters import PROBE_TOKENS, make_adapter, make_mistral, peft_logits  # noqa: E402
from bench.tiny_models import ARCHITECTURES  # noqa: E402

F32 = 0  # GGML_TYPE_F32: an f32 KV cache, so the comparison is not limited by llama.cpp's default f16 cache


def _llama_cpp_logits(base_gguf, lora_gguf=None) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(base_gguf), lora_path=str(lora_gguf) if lora_gguf else None, n_ctx=64,
                          logits_all=True, verbose=False, n_threads=1, type_k=F32, type_v=F32)
    try:
        llm.eval(PROBE_TOKENS)
        return np.array(llm.scores[:len(PROBE_TOKENS)], dtype=np.float32)
    finally:
        llm.close()


MODEL_TYPES = (*ARCHITECTURES, "mistral")


@pytest.fixture(scope="module")
def bases(tiny_model_dirs, tmp_path_factory):
    return {**tiny_model_dirs, "mistral": make_mistral(tmp_path_factory.mktemp("tiny-mistral"))}


@pytest.fixture(scope="module")
def gguf_bases(bases, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf-bases")
    return {arch: write_gguf_base(bases[arch], folder / f"{arch}.gguf") for arch in MODEL_TYPES}


@pytest.mark.parametrize("arch", MODEL_TYPES)
def test_llama_cpp_base_matches_transformers(arch, bases, gguf_bases):
    np.testing.assert_allclose(_llama_cpp_logits(gguf_bases[arch]), peft_logits(bases[arch], None),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch, config", [
    ("llama", dict(r=4, lora_alpha=8)), ("qwen2", dict(r=4, lora_alpha=8)), ("qwen3", dict(r=4, lora_alpha=8)),
    ("mistral", dict(r=4, lora_alpha=8)),
    ("llama", dict(r=8, lora_alpha=4, use_rslora=True)),
    ("qwen3", dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3.0})),
    # An adaptive-rank run's folded adapter: a rank per module, one projection pruned to nothing (no tensors).
    ("llama", dict(r=4, lora_alpha=8, rank_pattern={"model.layers.0.self_attn.q_proj": 1,
                                                    "model.layers.1.mlp.down_proj": 6},
                   exclude_modules=["model.layers.1.self_attn.v_proj"])),
], ids=["llama", "qwen2", "qwen3", "mistral", "llama-rslora", "qwen3-patterns", "llama-per-module-ranks"])
def test_llama_cpp_lora_moves_logits_as_peft(arch, config, bases, gguf_bases, tmp_path):
    base_dir = bases[arch]
    adapter_dir = make_adapter(base_dir, tmp_path / "adapter", seed=7, **config)
    want, base = peft_logits(base_dir, adapter_dir), peft_logits(base_dir, None)
    assert np.abs(want - base).max() > 0.5  # the adapter moves the logits well beyond the tolerance
    f32 = export_gguf_adapter(adapter_dir, base_dir, tmp_path / "a32.gguf", dtype="f32").path
    np.testing.assert_allclose(_llama_cpp_logits(gguf_bases[arch], f32), want, atol=1e-4, rtol=0)
    f16 = export_gguf_adapter(adapter_dir, base_dir, tmp_path / "a16.gguf", dtype="f16").path
    np.testing.assert_allclose(_llama_cpp_logits(gguf_bases[arch], f16), want, atol=2e-2, rtol=0)


def test_without_the_permutation_llama_logits_are_wrong(tiny_llama_dir, gguf_bases, tmp_path, monkeypatch):
    """Negative control: the Q/K permutation of lora_b is what makes llama's logits right."""
    adapter_dir = make_adapter(tiny_llama_dir, tmp_path / "adapter", seed=7, target_modules=["q_proj", "k_proj"])
    want = peft_logits(tiny_llama_dir, adapter_dir)
    monkeypatch.setitem(GGUF_ARCHS, "llama", ("llama", False))
    unpermuted = export_gguf_adapter(adapter_dir, tiny_llama_dir, tmp_path / "bad.gguf", dtype="f32").path
    assert np.abs(_llama_cpp_logits(gguf_bases["llama"], unpermuted) - want).max() > 1e-2
