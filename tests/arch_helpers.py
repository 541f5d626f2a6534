"""What the architecture tests share: the PEFT reference of a tiny model, the tolerances it is met with, and a
config-only model folder for the spec's refusals."""
import json

import numpy as np
import pytest

from engine.lora.config import LoraConfig
from engine.model.spec import load_model_spec
from tests.oracle import loss_and_grads, peft_model, random_batch, random_lora_state

B, T = 2, 7
LORAS = {"all-targets": LoraConfig(rank=4, alpha=8),
         "rslora-subset": LoraConfig(rank=3, alpha=5, use_rslora=True, targets=("q_proj", "o_proj", "down_proj"))}
# Phi-3's: the fused projections' LoRA (one A for q/k/v, one for gate/up), every target and a subset.
FUSED_LORAS = {"all-targets": LoraConfig(rank=4, alpha=8, targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
               "rslora-subset": LoraConfig(rank=3, alpha=5, use_rslora=True, targets=("qkv_proj", "down_proj"))}


def lora_for(model_dir, name: str) -> LoraConfig:
    """LORAS[name], or FUSED_LORAS[name] for a model with fused projections (Phi-3)."""
    return (FUSED_LORAS if load_model_spec(model_dir).fused else LORAS)[name]


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def reference(model_dir, lora, masked_fraction=0.3):
    spec = load_model_spec(model_dir)
    state = random_lora_state(spec, lora, seed=1)
    ids, labels = random_batch(spec.vocab_size, B, T, seed=2, masked_fraction=masked_fraction)
    return state, ids, labels, loss_and_grads(peft_model(model_dir, lora, state), ids, labels)


def assert_matches_peft(logits, loss, grads, ref) -> None:
    np.testing.assert_allclose(logits, ref.logits, atol=1e-4, rtol=0)
    assert loss == pytest.approx(ref.loss, rel=1e-5)
    assert grads.keys() == ref.grads.keys()
    for key, want in ref.grads.items():
        assert rel_err(grads[key], want) < 1e-3, key


def config_dir(tmp_path, name, **config):
    """A model folder with config.json only (the spec needs no weights)."""
    base = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, max_position_embeddings=128)
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**base, **config}))
    return folder


def cpu_logits_with_spec(model_dir, spec, lora, state, ids) -> np.ndarray:
    """The CPU backend's logits with `spec` in place of the model's own: a quirk switched off, to show it matters."""
    import engine.backends.onnx.backend as onnx_backend
    from engine.backends.base import OptimizerConfig

    original = onnx_backend.load_model_spec
    onnx_backend.load_model_spec = lambda _dir: spec
    try:
        with onnx_backend.OnnxBackend(model_dir, lora, OptimizerConfig(), B, T, init_state=state, threads=1) as be:
            return be.logits(ids)
    finally:
        onnx_backend.load_model_spec = original


def assert_adapter_round_trip(model_dir, tmp_path) -> None:
    """The CPU backend's adapter written as PEFT files: PEFT's loss is the backend's; chat (transformers + PEFT)
    gives PEFT's logits; the merged folder gives them without PEFT (this base is f32, so the merged folder is)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from engine.backends.base import OptimizerConfig
    from engine.backends.onnx import OnnxBackend
    from engine.chat.inference import ChatEngine
    from engine.export.merged import export_merged
    from engine.lora.peft_write import export_adapter

    lora = lora_for(model_dir, "all-targets")
    state, ids, labels, _ = reference(model_dir, lora)
    with OnnxBackend(model_dir, lora, OptimizerConfig(), B, T, init_state=state, threads=1) as be:
        total, counted = be.eval_loss(ids, labels)
        trained = be.lora_state()
    adapter = export_adapter(tmp_path / "adapter", trained, lora, str(model_dir))
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, adapter, is_trainable=True).eval()
    assert loss_and_grads(peft, ids, labels).loss == pytest.approx(total / counted, rel=1e-5)
    tokens = torch.from_numpy(ids[:1].astype(np.int64))
    with torch.no_grad():
        want = peft(input_ids=tokens).logits[0]

    chat = ChatEngine(device="cpu", dtype=torch.float32)
    chat.load(model_dir)
    try:
        chat.set_active_adapter(chat.load_adapter(adapter))
        text = chat.tokenizer.decode(ids[0])
        got = chat.logits(text)
        chat_ids = chat.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            torch.testing.assert_close(got, peft(input_ids=chat_ids).logits[0], rtol=1e-4, atol=1e-5)
    finally:
        chat.unload()

    merged = AutoModelForCausalLM.from_pretrained(export_merged(adapter, model_dir, tmp_path / "merged").path,
                                                  dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=tokens).logits[0], want, rtol=0, atol=1e-4)
