"""Upload a Hugging Face model's frozen weights once, splitting the vocabulary tables to fit storage bindings."""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from engine.model_spec import ModelSpec
from engine.wgpu_buffers import LayerWeights, weight_shapes

HF_LAYER_NAMES = {
    "ln1": "input_layernorm.weight", "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight", "o": "self_attn.o_proj.weight", "ln2": "post_attention_layernorm.weight",
    "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight",
    "q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias", "v_bias": "self_attn.v_proj.bias",
    "o_bias": "self_attn.o_proj.bias", "gate_bias": "mlp.gate_proj.bias", "up_bias": "mlp.up_proj.bias",
    "down_bias": "mlp.down_proj.bias",
    "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
}


@dataclass
class ModelWeights:
    embed: list                 # [(buffer [rows, C], first_id, rows)] vocabulary pieces of embed_tokens
    lm_head: list               # the LM head's pieces (the embedding's own when tied)
    final_norm: object          # [C]
    layers: list                # [LayerWeights] × L


def upload_weights(ctx, spec: ModelSpec, tensors: dict[str, np.ndarray], max_binding_bytes: int) -> ModelWeights:
    """Upload {HF name: array} (engine.model_spec.load_weights) as the engine's weight buffers."""
    folder = spec.source
    shapes = weight_shapes(spec, max_binding_bytes)

    def take(hf_name: str, shape: tuple, rows: slice | None = None):
        if hf_name not in tensors:
            raise ValueError(f"{folder}: weight {hf_name!r} is missing from the safetensors files")
        array = tensors[hf_name] if rows is None else tensors[hf_name][rows]
        if array.shape != tuple(shape):
            raise ValueError(f"{folder}: weight {hf_name!r} has shape {array.shape}, expected {tuple(shape)}")
        return ctx.upload(np.ascontiguousarray(array, np.float32), hf_name)

    def pieces(prefix: str, hf_name: str) -> list:
        out = []
        for key, shape in shapes.items():
            if key.startswith(prefix + "."):
                v0 = int(key.rsplit(".", 1)[1])
                out.append((take(hf_name, shape, slice(v0, v0 + shape[0])), v0, shape[0]))
        return out

    embed = pieces("embed", "model.embed_tokens.weight")
    lm_head = embed if spec.tied_embeddings else pieces("lm_head", "lm_head.weight")
    layers = []
    for layer in range(spec.layers):
        prefix = f"layers.{layer}."
        own = {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}
        layers.append(LayerWeights(**{name: take(f"model.layers.{layer}.{HF_LAYER_NAMES[name]}", shape)
                                      for name, shape in own.items()}))
    return ModelWeights(embed, lm_head, take("model.norm.weight", shapes["final_norm"]), layers)
