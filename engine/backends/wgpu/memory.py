"""How many bytes the wgpu engine allocates for (model, LoRA, optimizer, B, T), before allocating anything.

Computed from the same sizing functions the engine allocates with (engine.backends.wgpu.buffers), plus what the kernel
twins own (RoPE tables, one parameter block per dispatch), so it equals
GpuContext.bytes_allocated after construction (tests/backends/wgpu/test_memory.py checks).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

from engine.backends.base import OptimizerConfig
from engine.backends.wgpu.kernels.lm_head import chunk_rows
from engine.lora.config import LoraConfig, fit_targets
from engine.model.spec import ModelSpec
from engine.backends.wgpu.buffers import (activation_bytes, formats_for, frozen_layout, lora_groups, lora_layout,
                                          nbytes, scratch_shapes, shapes_bytes, vocab_pieces)
from engine.model.hf_names import FUSED_TARGETS
from engine.model.weight_formats import WeightFormat

GEMM_PARAMS = 64        # linear.wgsl Params
SMALL_PARAMS = 16       # 4-word uniforms (residual, swiglu, lm_head chunk/step, dropout)
NORM_PARAMS = 32        # rmsnorm.wgsl / embedding.wgsl / rope / attention Params (5..8 words)


@dataclass(frozen=True)
class MemoryPlan:
    weights: int          # frozen model weights, in the formats they are held in
    adapter: int          # LoRA parameters and gradients (flat, aligned)
    optimizer: int        # optimizer moments / quantisation state and its kernels' buffers
    activations: int      # what the forward saves for the backward, all layers (recompute: each layer's
                          # output and one shared layer's set)
    logits: int           # one chunk of LM-head logits
    scratch: int          # gradients in flight, tokens, statistics
    kernels: int          # per-dispatch parameter blocks, RoPE tables

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def kernel_bytes(spec: ModelSpec, lora: LoraConfig, B: int, T: int, chunk: int, lm_pieces: int,
                 embed_pieces: int) -> int:
    """Parameter blocks and kernel-owned buffers of every bound kernel (engine.backends.wgpu.graph.build_model)."""
    per_layer = 7 * 2 * GEMM_PARAMS                                  # 7 projections: forward + input grad
    groups = lora_groups(lora).values()
    singles = len(lora.targets) - sum(len(g) for g in groups)
    per_layer += singles * 6 * GEMM_PARAMS                           # LoRA: u, y, dB, du, dA, dx
    per_layer += sum(3 * len(g) + 3 for g in groups) * GEMM_PARAMS   # a group of n: u, dA, dx; n·(y, dB, du)
    # A fused projection's LoRA over n members (Phi-3): a group's products, counted above as one single's six.
    per_layer += sum(3 * len(FUSED_TARGETS[t]) - 3 for t in lora.targets if t in FUSED_TARGETS) * GEMM_PARAMS
    if lora.dropout > 0:
        per_layer += len(lora.targets) * 2 * SMALL_PARAMS            # dropout mask forward / backward
    norms = 2 * spec.pre_norms + 2 * spec.qk_norm + 2 * spec.post_norms
    per_layer += norms * 2 * NORM_PARAMS                             # forward + backward
    per_layer += 2 * (nbytes((T, spec.rope_dim // 2, 2)) + NORM_PARAMS)   # RoPE q, k: cos/sin table + params
    per_layer += NORM_PARAMS                                         # attention (its scratch is in Scratch)
    per_layer += 2 * SMALL_PARAMS + SMALL_PARAMS                     # two residual adds, swiglu
    chunks = -(-(B * T) // chunk)
    model = embed_pieces * NORM_PARAMS + 2 * NORM_PARAMS             # embedding pieces, final norm
    model += SMALL_PARAMS + chunks * (lm_pieces * 2 * GEMM_PARAMS + SMALL_PARAMS) + SMALL_PARAMS   # LM head
    model += SMALL_PARAMS                                            # the LoRA dropout step constants
    rope = 2 * (nbytes((T, spec.rope_dim // 2, 2)) + NORM_PARAMS)
    return spec.layers * per_layer + model - len(spec.nope_layers) * rope     # NoPE layers bind no RoPE


def optimizer_bytes(optim: OptimizerConfig, P: int) -> int:
    """engine.backends.wgpu.kernels.optimizer's buffers: GradNorm's partial sums, the update's uniform, the LoRA
    tensors before the last update (the NaN stop keeps them) and its state."""
    from engine.backends.wgpu.kernels.optimizer import HYPER, MAX_PARTIALS, WORKGROUP

    total = 2 * HYPER.nbytes + nbytes((min(MAX_PARTIALS, -(-P // WORKGROUP)),)) + nbytes((P,))
    if optim.name == "adamw":
        total += 2 * nbytes((P,))                                     # m, v
    elif optim.name == "adamw8bit":
        from engine.backends.optimizers import SIGNED_MAP, UNSIGNED_MAP
        total += 2 * nbytes((-(-P // 4),))                            # m, v codes, 4 per word
        total += nbytes((2 * -(-P // optim.block_size),))             # per-block scales of m and v
        total += nbytes((len(SIGNED_MAP) + len(UNSIGNED_MAP),))       # the two quantisation maps
    return total


def memory_plan(spec: ModelSpec, lora: LoraConfig, optim: OptimizerConfig, B: int, T: int,
                max_binding_bytes: int = 128 << 20, max_workgroups: int = 65535, weights: str = "f32",
                stored: Mapping[str, WeightFormat] | None = None, recompute: bool = False) -> MemoryPlan:
    """Bytes WgpuBackend(spec, lora, optim, B, T, weights=weights, recompute=recompute) allocates on an adapter
    with these limits (the defaults are WebGPU's: 128 MiB per storage binding, 65535 workgroups per dimension).
    `stored`: the formats the model file holds its tensors in (engine.model.weights' StoredTensor.format by
    name), needed for weights "stored"."""
    lora = fit_targets(spec, lora)          # as the backend names Phi-3's fused targets
    chunk = chunk_rows(B * T, spec.vocab_size, max_binding_bytes, max_workgroups=max_workgroups)
    frozen = frozen_layout(spec, max_binding_bytes, formats_for(weights, stored))
    vocab_format = next(t.format for k, t in frozen.items() if k.startswith("embed."))
    pieces = vocab_pieces(spec.vocab_size, spec.hidden, max_binding_bytes, vocab_format)
    scratch = scratch_shapes(spec, lora, B, T, chunk, pieces[0][1])
    adapter = nbytes(scratch.pop("lora_params")) + nbytes(scratch.pop("lora_grads"))
    logits = nbytes(scratch.pop("logits"))
    return MemoryPlan(
        weights=sum(t.nbytes for t in frozen.values()), adapter=adapter,
        optimizer=optimizer_bytes(optim, lora_layout(spec, lora).total),
        activations=activation_bytes(spec, lora, B, T, recompute), logits=logits,
        scratch=shapes_bytes(scratch), kernels=kernel_bytes(spec, lora, B, T, chunk, len(pieces), len(pieces)))
