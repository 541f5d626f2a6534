"""Upload a Hugging Face model's frozen weights once, splitting the vocabulary tables to fit storage bindings."""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from engine.model.hf_names import EMBED_WEIGHT, FINAL_NORM_WEIGHT, LM_HEAD_WEIGHT, layer_tensor
from engine.model.spec import ModelSpec
from engine.model.weights import WeightSource
from engine.backends.wgpu.buffers import LayerWeights, weight_shapes



@dataclass
class ModelWeights:
    embed: list                 # [(buffer [rows, C], first_id, rows)] vocabulary pieces of embed_tokens
    lm_head: list               # the LM head's pieces (the embedding's own when tied)
    final_norm: object          # [C]
    layers: list                # [LayerWeights] × L


def upload_weights(ctx, spec: ModelSpec, source: WeightSource, max_binding_bytes: int) -> ModelWeights:
    """Upload the model's frozen tensors, read one at a time from `source`, as the engine's weight buffers."""
    shapes = weight_shapes(spec, max_binding_bytes)

    def take(hf_name: str, shape: tuple) -> object:
        source.require(hf_name, shape)
        return ctx.upload(source.f32(hf_name), hf_name)

    def pieces(prefix: str, hf_name: str) -> list:
        """A vocabulary table in row pieces that each fit one storage binding, read once."""
        keys = [k for k in shapes if k.startswith(prefix + ".")]
        table = source.f32(source.require(hf_name, (spec.vocab_size, spec.hidden)).name)
        out = []
        for key in keys:
            v0, rows = int(key.rsplit(".", 1)[1]), shapes[key][0]
            out.append((ctx.upload(np.ascontiguousarray(table[v0:v0 + rows]), f"{hf_name}[{v0}:]"), v0, rows))
        return out

    embed = pieces("embed", EMBED_WEIGHT)
    lm_head = embed if spec.tied_embeddings else pieces("lm_head", LM_HEAD_WEIGHT)
    layers = []
    for layer in range(spec.layers):
        prefix = f"layers.{layer}."
        own = {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}
        layers.append(LayerWeights(**{name: take(layer_tensor(layer, name), shape) for name, shape in own.items()}))
    return ModelWeights(embed, lm_head, take(FINAL_NORM_WEIGHT, shapes["final_norm"]), layers)
