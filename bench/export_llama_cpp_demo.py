"""llama.cpp agreement of our GGUF LoRA export on the real demo model (SmolLM2-135M-Instruct), printed as JSON.

Needs llama-cpp-python (builds llama.cpp from source; not a project dependency) and the demo model
(`lora-lab models pull-demo`). A random PEFT adapter on q_proj/k_proj (where the Llama row permutation matters)
is exported and run by llama.cpp on two bases: an f32 GGUF of the converted demo folder (tests/gguf_base.py), where
logits must agree with PEFT to float precision, and the shipped Q4_1 GGUF that Ollama would use, where the
quantised base sets the noise floor. Each is compared with an export that skips the permutation.

    python -m bench.export_llama_cpp_demo
"""
from __future__ import annotations

import json
import platform
import tempfile
from pathlib import Path

import numpy as np

# The first 16 tokens of a ChatML turn in SmolLM2's vocabulary.
TOKENS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411]


def _llama_cpp_logits(llama_cpp, base_gguf: Path, lora: Path | None) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(base_gguf), lora_path=str(lora) if lora else None, n_ctx=64,
                          logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0)  # f32 KV cache
    try:
        llm.eval(TOKENS)
        return np.array(llm.scores[:len(TOKENS)], dtype=np.float32)
    finally:
        llm.close()


def _no_repack(llama_cpp) -> None:
    # llama-cpp-python 0.3.36 built here (AVX-512/AMX CPU) segfaults in the CPU repack path for Q4_1 weights;
    # plain CPU buffers compute the same maths.
    default = llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    import llama_cpp.llama as module
    module.llama_cpp.llama_model_default_params = params


def main() -> dict:
    from importlib import metadata

    import llama_cpp
    import peft
    import torch
    import transformers

    from engine.export import gguf as export_gguf
    from engine.model.references import demo_gguf_path, demo_model_dir
    from bench.gguf_base import write_gguf_base
    from bench.peft_adapters import make_adapter, peft_logits

    _no_repack(llama_cpp)
    base_dir, q4_1 = demo_model_dir(), demo_gguf_path()
    if not (base_dir / "config.json").is_file() or not q4_1.is_file():
        raise SystemExit("demo model missing: run `lora-lab models pull-demo` first")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        adapter = make_adapter(base_dir, tmp / "adapter", r=8, lora_alpha=16, b_std=0.05, seed=2,
                               target_modules=["q_proj", "k_proj"])
        want, base = peft_logits(base_dir, adapter, TOKENS), peft_logits(base_dir, None, TOKENS)
        good = export_gguf.export_gguf_adapter(adapter, base_dir, tmp / "good.gguf", dtype="f32").path
        saved = export_gguf.GGUF_ARCHS["llama"]
        export_gguf.GGUF_ARCHS["llama"] = ("llama", False)
        try:
            bad = export_gguf.export_gguf_adapter(adapter, base_dir, tmp / "bad.gguf", dtype="f32").path
        finally:
            export_gguf.GGUF_ARCHS["llama"] = saved
        f32 = write_gguf_base(base_dir, tmp / "base-f32.gguf")
        result = {"model": "SmolLM2-135M-Instruct", "tokens": len(TOKENS),
                  "peft_shift_max_abs": float(np.abs(want - base).max())}
        for name, gguf_base in (("f32_base", f32), ("q4_1_base", q4_1)):
            result[name] = {
                "base_vs_transformers_max_abs": float(np.abs(_llama_cpp_logits(llama_cpp, gguf_base, None)
                                                             - base).max()),
                "lora_vs_peft_max_abs": float(np.abs(_llama_cpp_logits(llama_cpp, gguf_base, good) - want).max()),
                "unpermuted_lora_vs_peft_max_abs": float(np.abs(_llama_cpp_logits(llama_cpp, gguf_base, bad)
                                                                - want).max()),
            }
    result["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine()}
    result["versions"] = {"llama_cpp_python": llama_cpp.__version__, "gguf": metadata.version("gguf"),
                          "torch": torch.__version__, "transformers": transformers.__version__,
                          "peft": peft.__version__}
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
