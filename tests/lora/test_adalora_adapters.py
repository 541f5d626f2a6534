"""A PEFT AdaLoRA adapter (peft_type ADALORA, pruned by PEFT's own allocator): chat loads it as PEFT does; the
exports, evaluation and training refuse it by name, pointing at the plain LoRA with per-module ranks instead."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bench.peft_adapters import make_adalora_adapter, peft_logits
from engine.lora.peft_read import AdapterError, import_adapter, inference_state, read_adapter
from engine.model.spec import load_model_spec


@pytest.fixture(scope="module")
def adalora_adapter(tiny_llama_dir, tmp_path_factory):
    return make_adalora_adapter(tiny_llama_dir, tmp_path_factory.mktemp("adalora") / "adapter", seed=2)


def test_the_fixture_is_pruned_with_some_projection_at_rank_zero(adalora_adapter):
    kept = [sum(mask) for mask in json.loads((adalora_adapter / "adapter_config.json").read_text())
            ["rank_pattern"].values()]
    assert 0 in kept and max(kept) < 4


def test_chat_answers_with_peft_logits(tiny_llama_dir, adalora_adapter):
    import torch

    from engine.chat.inference import ChatEngine

    chat = ChatEngine(device="cpu", dtype=torch.float32)
    chat.load(tiny_llama_dir)
    try:
        chat.set_active_adapter(chat.load_adapter(adalora_adapter))
        text = "The quick brown fox"
        ids = chat.tokenizer(text, return_tensors="pt")["input_ids"][0].tolist()
        want = peft_logits(tiny_llama_dir, adalora_adapter, ids)
        assert np.abs(want - peft_logits(tiny_llama_dir, None, ids)).max() > 0.1   # the adapter moves them
        np.testing.assert_allclose(chat.logits(text).numpy(), want, rtol=0, atol=1e-5)
    finally:
        chat.unload()


def test_exports_evaluation_and_training_refuse_it_by_name(tiny_llama_dir, adalora_adapter):
    spec = load_model_spec(tiny_llama_dir)
    for read in (lambda: read_adapter(adalora_adapter), lambda: inference_state(adalora_adapter, spec),
                 lambda: import_adapter(adalora_adapter, spec)):
        with pytest.raises(AdapterError, match="AdaLoRA adapter .* plain LoRA adapter with per-module ranks"):
            read()
