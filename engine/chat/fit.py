"""Which float type chat loads a base in, and whether the base fits the chat device before loading it.

Chat holds the base in half precision wherever the device computes it natively, so chat memory is the model's
half-precision size (parameters × 2 bytes), not its float32 size. A base that does not fit is refused before
anything is loaded, naming the bytes needed and the bytes free.

Measured on the project's 2-core CPU (AMD EPYC with avx512_bf16; SmolLM2-135M demo, `python -m bench.chat_dtype`):
a 256-token prompt took 0.29 s in bfloat16, 0.77 s in float32 and 9.7 s in float16, and decoding ran at 12.6,
11.8 and 8.9 tokens/s. So the CPU uses bfloat16 wherever oneDNN has native bf16 kernels, float32 elsewhere.
The limit: a base can be chatted with when parameters × 2 bytes fit the chat device's free memory (for a GGUF
base, twice that on the host while it loads); otherwise ModelTooLarge says how much is needed and free.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


class ModelTooLarge(RuntimeError):
    """The base model does not fit the chat device's free memory; the message gives both numbers."""


def chat_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the device computes it natively, else float16 (CUDA without bf16, Apple MPS); float32 only
    on a CPU without native bf16 matmuls (emulated bf16 there is several times slower than float32)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


@dataclass(frozen=True)
class ChatMemory:
    weights: int        # bytes of parameters and buffers on the device, in the chat dtype
    host_loading: int   # bytes the host needs while loading (on a CPU device: the weights included)
    device_free: int | None   # what the device has free now; None where it cannot be read (MPS)
    host_free: int


def parameter_count(folder: Path) -> int:
    """Parameters and buffers of the model a folder's config.json describes (a tied LM head counted once),
    from a weightless (meta device) model: nothing is read or allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(t.numel() for t in [*model.parameters(), *model.buffers()])


def chat_memory(folder: Path, dtype: torch.dtype, device: torch.device, from_gguf: bool) -> ChatMemory:
    """What loading the base in `folder` for chat needs, and what is free.

    transformers' GGUF loader (used for llama/qwen2/qwen3 GGUF files) converts every tensor to `dtype` into a
    state dict on the host and copies it into the model, so it holds the weights twice on the host while it
    loads (measured on SmolLM2-135M Q4_1 in bf16: peak 680 MB over 269 MB of weights). A safetensors base is
    read straight into place (device_map)."""
    import psutil

    weights = parameter_count(folder) * torch.empty((), dtype=dtype).element_size()
    on_host = weights if device.type == "cpu" else 0
    host_loading = on_host + (weights if from_gguf else 0)
    return ChatMemory(weights, host_loading, _device_free(device), int(psutil.virtual_memory().available))


def check_chat_fits(model_ref: str, memory: ChatMemory, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a base that cannot be loaded for chat, with the bytes it needs and the bytes free."""
    gib = 2 ** 30
    name = str(dtype).removeprefix("torch.")
    if memory.device_free is not None and device.type != "cpu" and memory.weights > memory.device_free:
        raise ModelTooLarge(
            f"cannot chat with {model_ref}: its weights need {memory.weights / gib:.2f} GiB of {device} memory in "
            f"{name}, and {memory.device_free / gib:.2f} GiB are free; free memory on the device (other programs, "
            "a training run) or choose a smaller model")
    if memory.host_loading > memory.host_free:
        how = " (twice the weights while transformers converts the GGUF)" if memory.host_loading > memory.weights \
            else ""
        raise ModelTooLarge(
            f"cannot chat with {model_ref}: loading it needs {memory.host_loading / gib:.2f} GiB of RAM in "
            f"{name}{how}, and {memory.host_free / gib:.2f} GiB are available; close other programs or choose a "
            "smaller model")


def _device_free(device: torch.device) -> int | None:
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    return None
