"""engine.chat.fit: chat holds the base in half precision, and refuses a base that does not fit, with the numbers."""
from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from engine.chat.fit import ModelTooLarge, chat_dtype, chat_memory
from engine.chat.inference import ChatEngine


def test_cpu_chat_is_bf16_where_the_cpu_has_native_bf16():
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert chat_dtype(torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    assert chat_dtype(torch.device("mps")) == torch.float16


def test_chat_memory_is_the_half_precision_size(tiny_llama_dir):
    chat = ChatEngine(device="cpu", dtype=torch.bfloat16)
    chat.load(tiny_llama_dir)
    held = sum(t.numel() * t.element_size() for t in [*chat._model.parameters(), *chat._model.buffers()])
    assert {p.dtype for p in chat._model.parameters()} == {torch.bfloat16}
    memory = chat_memory(tiny_llama_dir, torch.bfloat16, chat.device, from_gguf=False)
    # inv_freq buffers stay float32 in transformers: counted at 2 bytes here, so the estimate is a little low.
    assert 0.99 * held <= memory.weights <= held
    f32 = chat_memory(tiny_llama_dir, torch.float32, chat.device, from_gguf=False)
    assert f32.weights == 2 * memory.weights
    chat.unload()


def test_a_base_that_does_not_fit_is_refused_with_the_numbers(tiny_llama_dir, monkeypatch):
    import psutil

    need = chat_memory(tiny_llama_dir, torch.bfloat16, torch.device("cpu"), from_gguf=False).host_loading
    memory = namedtuple("svmem", "available total")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(available=need - 1, total=need * 4))
    chat = ChatEngine(device="cpu", dtype=torch.bfloat16)
    gib = f"{need / 2**30:.2f} GiB of RAM in bfloat16"
    with pytest.raises(ModelTooLarge, match=f"cannot chat with .*: loading it needs {gib}, and 0.00 GiB are"):
        chat.load(tiny_llama_dir)
    assert not chat.loaded
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(available=need, total=need * 4))
    chat.load(tiny_llama_dir)
    assert chat.loaded
    chat.unload()
