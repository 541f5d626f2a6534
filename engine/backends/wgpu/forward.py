"""The forward pass, as llm.c writes it: one readable call per operation, layer by layer."""
from __future__ import annotations

from engine.backends.wgpu.context import StepEncoder
from engine.backends.wgpu.graph import LayerKernels, ModelKernels


def projection_forward(enc: StepEncoder, k: LayerKernels, target: str) -> None:
    """y = x·Wᵀ + b, plus the LoRA branch when the target is adapted alone (a LoraGroup's members get theirs
    from the group, after the last member)."""
    k.proj[target].encode_forward(enc)
    if target in k.lora:
        k.lora[target].encode_forward(enc)


def layer_forward(enc: StepEncoder, k: LayerKernels, recompute: bool = False) -> None:
    """With `recompute`, the forward again just before this layer's backward, refilling the activation set the
    layers share: the same kernels in the same order on the same inputs, so the same bits (and, from the same
    step seed and salt, the same LoRA dropout masks). It stops at what the backward reads: down_proj's input h
    and its LoRA u, not down_proj's output nor x_out (the next layer's input, kept) — except with post-norms
    (Gemma 3), whose post-MLP norm backward reads down_proj's output."""
    if k.ln1 is not None:
        k.ln1.encode_forward(enc)
    for target in ("q_proj", "k_proj", "v_proj"):
        projection_forward(enc, k, target)
    if "qkv" in k.lora_groups:
        k.lora_groups["qkv"].encode_forward(enc)
    if k.q_norm is not None:
        k.q_norm.encode_forward(enc)
        k.k_norm.encode_forward(enc)
    if k.rope_q is not None:
        k.rope_q.encode_forward(enc)
        k.rope_k.encode_forward(enc)
    k.attention.encode_forward(enc)
    projection_forward(enc, k, "o_proj")
    if k.post_attn_norm is not None:
        k.post_attn_norm.encode_forward(enc)
    k.attn_residual.encode(enc)
    if k.ln2 is not None:
        k.ln2.encode_forward(enc)
    projection_forward(enc, k, "gate_proj")
    projection_forward(enc, k, "up_proj")
    if "gate_up" in k.lora_groups:
        k.lora_groups["gate_up"].encode_forward(enc)
    k.swiglu.encode_forward(enc)
    if recompute and k.post_mlp_norm is None:
        if "down_proj" in k.lora:
            k.lora["down_proj"].encode_saved(enc)
        return
    projection_forward(enc, k, "down_proj")
    if k.post_mlp_norm is not None:
        k.post_mlp_norm.encode_forward(enc)     # its backward reads down_proj's output and rstd: recomputed too
        if recompute:
            return
    k.mlp_residual.encode(enc)


def model_forward(enc: StepEncoder, m: ModelKernels) -> None:
    """Tokens (scratch ids) → final norm output; the LM head runs separately (loss, logits or backward)."""
    m.embedding.encode_forward(enc)
    for k in m.layers:
        layer_forward(enc, k)
    m.final_norm.encode_forward(enc)
