"""Exported adapters are exactly what PEFT writes and loads; imports refuse what cannot be honoured."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from engine.lora.peft_read import AdapterError, import_adapter
from engine.lora.peft_write import export_adapter, peft_config
from engine.backends.base import OptimizerConfig
from engine.backends.choose import create_backend
from engine.lora.config import LoraConfig
from engine.model.spec import load_model_spec
from tests.oracle import random_lora_state

LORA = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"), use_rslora=True)


def _base(model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")


def _engine(kind, request, model_dir, state):
    if kind == "cpu":
        return create_backend("cpu", model_dir, LORA, OptimizerConfig(), 2, 16, init_state=state)[0]
    from engine.backends.wgpu.backend import WgpuBackend
    return WgpuBackend(model_dir, LORA, OptimizerConfig(), 2, 16, ctx=request.getfixturevalue("gpu_device"),
                       lora_state=state)


@pytest.mark.parametrize("kind", ["cpu", pytest.param("wgpu", marks=pytest.mark.gpu)])
def test_export_loads_in_peft_and_transformers_with_equal_logits(kind, request, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from peft.utils import load_peft_weights

    spec = load_model_spec(tiny_model_dir)
    state = random_lora_state(spec, LORA, seed=4)
    # A real engine after one training step, so the exported tensors are its own.
    backend = _engine(kind, request, tiny_model_dir, state)
    ids = np.random.default_rng(0).integers(0, spec.vocab_size, (2, 16)).astype(np.int32)
    assert not backend.train_step([(ids, ids)], 1e-3, 1.0).result().skipped
    engine_logits = backend.logits(ids)
    state = backend.lora_state()
    export_adapter(tmp_path, backend.lora_state(), LORA, base_model=str(tiny_model_dir), summary={"steps": 3})

    with safe_open(tmp_path / "adapter_model.safetensors", framework="np") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
        assert f.get_tensor(key).shape == (4, spec.intermediate) and f.get_tensor(key).dtype == np.float32
    assert keys == set(state)

    peft_model = PeftModel.from_pretrained(_base(tiny_model_dir), tmp_path)
    loaded = {n.replace(".default.weight", ".weight"): p.detach().numpy()
              for n, p in peft_model.named_parameters() if "lora_" in n}
    assert set(loaded) == set(load_peft_weights(str(tmp_path))) == keys   # nothing missing, nothing unexpected
    assert all(np.array_equal(loaded[k], state[k]) for k in keys)
    with torch.no_grad():
        peft_logits = peft_model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(peft_logits, engine_logits, atol=1e-4, rtol=0)

    hf = _base(tiny_model_dir)
    info = hf.load_adapter(str(tmp_path), adapter_name="trained")
    assert not info.missing_keys and not info.unexpected_keys and not info.mismatched_keys
    with torch.no_grad():
        hf_logits = hf(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(hf_logits, engine_logits, atol=1e-4, rtol=0)


def test_config_has_exactly_peft_fields(tiny_llama_dir, tmp_path):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    model = get_peft_model(_base(tiny_llama_dir), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                 task_type="CAUSAL_LM", use_rslora=True))
    model.save_pretrained(tmp_path)
    theirs = json.loads((tmp_path / "adapter_config.json").read_text())
    ours = peft_config(LoraConfig(rank=4, alpha=8, targets=("q_proj",), use_rslora=True), str(tiny_llama_dir))
    assert set(ours) == set(theirs)
    assert {k: v for k, v in ours.items() if k != "base_model_name_or_path"} == \
        {k: v for k, v in theirs.items() if k != "base_model_name_or_path"}


def test_peft_adapter_import_export_round_trips_exactly(tiny_model_dirs, tmp_path):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    model_dir = tiny_model_dirs["qwen3"]
    model = get_peft_model(_base(model_dir), PeftLoraConfig(r=3, lora_alpha=5, target_modules=["k_proj", "gate_proj"],
                                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()       # B = 0 would round-trip trivially
    model.save_pretrained(tmp_path / "peft")
    spec = load_model_spec(model_dir)
    lora, state, config = import_adapter(tmp_path / "peft", spec)
    assert (lora.rank, lora.alpha, lora.targets) == (3, 5.0, ("k_proj", "gate_proj"))
    export_adapter(tmp_path / "ours", state, lora, config["base_model_name_or_path"])
    for name in ("adapter_model.safetensors",):
        with safe_open(tmp_path / "peft" / name, "np") as a, safe_open(tmp_path / "ours" / name, "np") as b:
            assert set(a.keys()) == set(b.keys())
            assert all(np.array_equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    theirs, ours = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "ours"))
    # PEFT writes target_modules from a set, in whatever order string hashing gives this process.
    assert sorted(theirs.pop("target_modules")) == sorted(ours.pop("target_modules"))
    assert theirs == ours


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("changes, reason", [
    (dict(use_dora=True), "DoRA"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(peft_type="IA3"), "only LORA"),
    (dict(target_modules=["q_proj", "lm_head"]), "lm_head"),
    (dict(rank_pattern={"q_proj": 8}), "per-module ranks"),
    (dict(layer_replication=[[0, 1]]), "layer_replication"),
    (dict(use_bdlora={"block_size": 2}), "LoRA variant"),
])
def test_import_refuses_what_cannot_be_honoured(tiny_llama_dir, tmp_path, changes, reason):
    spec = load_model_spec(tiny_llama_dir)
    lora = LoraConfig(rank=4, alpha=8, targets=("q_proj",))
    export_adapter(tmp_path / "a", random_lora_state(spec, lora), lora, "base")
    with pytest.raises(AdapterError, match=reason):
        import_adapter(_edit_config(tmp_path / "a", tmp_path / "b", **changes), spec)


def test_import_refuses_an_adapter_for_another_base(tiny_model_dirs, tmp_path):
    lora = LoraConfig(rank=4, alpha=8, targets=("q_proj",))
    qwen2 = load_model_spec(tiny_model_dirs["qwen2"])
    export_adapter(tmp_path, random_lora_state(qwen2, lora), lora, "qwen2-base")
    with pytest.raises(AdapterError, match="different base model"):
        import_adapter(tmp_path, load_model_spec(tiny_model_dirs["llama"]))


def test_export_refuses_non_finite_and_replaces_files_atomically(tiny_llama_dir, tmp_path):
    spec = load_model_spec(tiny_llama_dir)
    lora = LoraConfig(rank=2, alpha=4, targets=("q_proj",))
    state = random_lora_state(spec, lora)
    export_adapter(tmp_path, state, lora, "base")
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    state[next(iter(state))][0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        export_adapter(tmp_path, state, lora, "base")
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json",
                                                          "adapter_model.safetensors"]
