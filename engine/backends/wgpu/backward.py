"""The backward pass: the forward's calls in reverse, into the LoRA gradients (frozen weights get none).

Gradient routing: d_res carries d(residual stream) down the layers; the residual adds need no kernel (their
backward is the identity), each norm's backward adds its branch into d_res.
"""
from __future__ import annotations

from engine.backends.wgpu.context import StepEncoder
from engine.backends.wgpu.forward import layer_forward
from engine.backends.wgpu.graph import LayerKernels, ModelKernels


def projection_backward(enc: StepEncoder, k: LayerKernels, target: str) -> None:
    """dx (=|+=) dy·W, then the LoRA branch's dB, dA and dx += ..."""
    k.proj[target].encode_backward(enc)
    if target in k.lora:
        k.lora[target].encode_backward(enc)


def layer_backward(enc: StepEncoder, k: LayerKernels) -> None:
    if k.post_mlp_norm is not None:
        k.post_mlp_norm.encode_backward(enc)     # d_res → d_post
    projection_backward(enc, k, "down_proj")     # d_res (d_post) → d_h
    k.swiglu.encode_backward(enc)                # d_h → d_gate, d_up
    projection_backward(enc, k, "up_proj")       # d_up → d_ln (no pre-norms: d_res +=)
    projection_backward(enc, k, "gate_proj")     # d_gate → d_ln +=
    if "gate_up" in k.lora_groups:
        k.lora_groups["gate_up"].encode_backward(enc)   # d_gate, d_up → d_ln +=
    if k.ln2 is not None:
        k.ln2.encode_backward(enc)               # d_ln → d_res +=
    if k.post_attn_norm is not None:
        k.post_attn_norm.encode_backward(enc)    # d_res → d_post
    projection_backward(enc, k, "o_proj")        # d_res (d_post) → d_att
    k.attention.encode_backward(enc)             # d_att → dq, dk, dv
    if k.rope_q is not None:
        k.rope_q.encode_backward(enc, k.dq)
        k.rope_k.encode_backward(enc, k.dk)
    if k.q_norm is not None:
        k.q_norm.encode_backward(enc)            # dq → dq_raw
        k.k_norm.encode_backward(enc)
    projection_backward(enc, k, "v_proj")        # → d_ln
    projection_backward(enc, k, "k_proj")        # → d_ln +=
    projection_backward(enc, k, "q_proj")        # → d_ln +=
    if "qkv" in k.lora_groups:
        k.lora_groups["qkv"].encode_backward(enc)    # dq, dk, dv → d_ln +=
    if k.ln1 is not None:
        k.ln1.encode_backward(enc)               # d_ln → d_res +=


def model_backward(enc: StepEncoder, m: ModelKernels) -> None:
    """After the LM head wrote d_ln = d(final norm output): the final norm, then every layer in reverse.

    With recompute, each layer's forward runs again first to refill the shared activations, except the last
    layer's: its forward was the last to write them, and the final norm and LM head in between do not."""
    m.final_norm.encode_backward(enc)            # d_ln → d_res (written)
    last = len(m.layers) - 1
    for i in range(last, -1, -1):
        if m.recompute and i < last:
            layer_forward(enc, m.layers[i], recompute=True)   # reads x_in, writes no gradient (d_res kept)
        layer_backward(enc, m.layers[i])
