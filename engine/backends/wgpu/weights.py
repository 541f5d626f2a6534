"""Upload a Hugging Face model's frozen weights once, splitting the vocabulary tables to fit storage bindings."""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from engine.model.hf_names import EMBED_WEIGHT, FINAL_NORM_WEIGHT, LM_HEAD_WEIGHT, NORM_TENSORS, layer_tensor
from engine.model.spec import ModelSpec
from engine.model.weight_formats import WeightFormat, to_gpu_layout
from engine.model.weights import WeightSource
from engine.backends.wgpu.buffers import FormatOf, FrozenTensor, HeldWeight, LayerWeights, all_f32, frozen_layout
from engine.backends.wgpu.kernels.linear_f16 import F16_FORMATS, held_abs_max



@dataclass
class ModelWeights:
    embed: list                 # [(buffer [rows, C], first_id, rows)] vocabulary pieces of embed_tokens
    lm_head: list               # the LM head's pieces (the embedding's own when tied)
    vocab_format: WeightFormat  # what the embedding and LM head pieces hold
    final_norm: object          # [C]
    layers: list                # [LayerWeights] × L
    vocab_abs_max: float | None = None   # max |w| of the LM head's table when held f16/bf16 and asked (math f16)


def upload_weights(ctx, spec: ModelSpec, source: WeightSource, max_binding_bytes: int,
                   format_of: FormatOf = all_f32, abs_max: bool = False) -> ModelWeights:
    """Upload the model's frozen tensors, read one at a time from `source` and converted to the format
    `format_of` holds each in (engine.model.weight_formats' GPU layout), as the engine's weight buffers.
    `abs_max`: also find max |w| of every matrix held f16/bf16 (HeldWeight.abs_max: what math f16 checks)."""
    layout = frozen_layout(spec, max_binding_bytes, format_of)

    def upload(hf_name: str, raw: np.ndarray, tensor: FrozenTensor, label: str):
        return ctx.upload(to_gpu_layout(raw, tensor.format, tensor.shape), label)

    def take(hf_name: str, key: str):
        tensor = layout[key]
        source.require(hf_name, tensor.shape)
        if key == "final_norm" or key.rsplit(".", 1)[-1] in NORM_TENSORS:
            # Gemma's x·(1+w): the offset added once here, in f32 as transformers adds it (norms are held f32).
            # Granite divides the logits by logits_scale: folded into the final norm, which only the LM head reads.
            raw = source.f32(hf_name) + np.float32(spec.norm_offset)
            if key == "final_norm" and spec.logits_scale != 1.0:
                raw = raw / np.float32(spec.logits_scale)
            return ctx.upload(to_gpu_layout(raw, tensor.format, tensor.shape), hf_name)
        raw = source.as_format(hf_name, tensor.format)
        buffer = upload(hf_name, raw, tensor, hf_name)
        if len(tensor.shape) != 2:
            return buffer
        largest = held_abs_max(raw, tensor.format) if abs_max and tensor.format in F16_FORMATS else None
        return HeldWeight(buffer, tensor.format, largest)

    largest = {}   # hf_name -> max |w| of a vocabulary table held f16/bf16 (with abs_max)

    def pieces(prefix: str, hf_name: str) -> list:
        """A vocabulary table in row pieces that each fit one storage binding, read and converted once."""
        keys = [k for k in layout if k.startswith(prefix + ".")]
        source.require(hf_name, (spec.vocab_size, spec.hidden))
        fmt = layout[keys[0]].format
        table = source.as_format(hf_name, fmt)      # [V, bytes per row]: rows stay whole
        if abs_max and fmt in F16_FORMATS:
            largest[hf_name] = held_abs_max(table, fmt)
        out = []
        for key in keys:
            v0, rows = int(key.rsplit(".", 1)[1]), layout[key].shape[0]
            out.append((upload(hf_name, table[v0:v0 + rows], layout[key], f"{hf_name}[{v0}:]"), v0, rows))
        return out

    embed = pieces("embed", EMBED_WEIGHT)
    lm_head = embed if spec.tied_embeddings else pieces("lm_head", LM_HEAD_WEIGHT)
    vocab_format = layout[next(k for k in layout if k.startswith("embed."))].format
    layers = []
    for layer in range(spec.layers):
        prefix = f"layers.{layer}."
        own = [k[len(prefix):] for k in layout if k.startswith(prefix)]
        tensors = {name: take(layer_tensor(layer, name, spec.post_norms), prefix + name) for name in own}
        layers.append(LayerWeights(**{"ln1": None, "ln2": None, **tensors}))   # OLMo 2 has neither norm
    head_name = EMBED_WEIGHT if spec.tied_embeddings else LM_HEAD_WEIGHT
    return ModelWeights(embed, lm_head, vocab_format, take(FINAL_NORM_WEIGHT, "final_norm"), layers,
                        largest.get(head_name))
