"""Hugging Face tensor and module names of the decoder models the engine trains: the one table that both
backends' weight loading, the PEFT adapter keys and the exports spell them from."""
from __future__ import annotations

# The Linear layers of a decoder block that LoRA may target, in the order every buffer and file lists them.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
# Phi-3's fused projections: one Linear whose output rows are its members' back to back (qkv_proj: q, k, v;
# gate_up_proj: gate, up). The engines hold the members' frozen weights split (engine.model.weights); a LoRA on
# a fused projection is PEFT's: one A [r, in] for all members, one B [Σ out, r] whose row blocks are theirs.
FUSED_TARGETS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# Every name a LoRA may target, in the order every buffer and file lists the targets of a config.
TARGET_ORDER = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj",
                "down_proj")

EMBED_WEIGHT = "model.embed_tokens.weight"
FINAL_NORM_WEIGHT = "model.norm.weight"
LM_HEAD_WEIGHT = "lm_head.weight"


def projection_module(target: str) -> str:
    """A projection's module path inside its block: q_proj -> self_attn.q_proj, gate_proj -> mlp.gate_proj."""
    if target not in TARGET_ORDER:
        raise ValueError(f"{target!r} is not a projection; choose from {', '.join(TARGET_ORDER)}")
    return f"{'self_attn' if target in ATTENTION_TARGETS else 'mlp'}.{target}"


def module_path(layer: int, target: str) -> str:
    """HF module path of a projection, e.g. model.layers.3.self_attn.q_proj."""
    return f"model.layers.{layer}.{projection_module(target)}"


def bias_name(target: str) -> str:
    """Short name of a projection's bias (LAYER_TENSORS): q_proj -> q_bias."""
    return target.removesuffix("_proj") + "_bias"


# A decoder block's frozen tensors: the engine's short name -> the name inside model.layers.{i}.
LAYER_TENSORS = {
    "ln1": "input_layernorm.weight", "ln2": "post_attention_layernorm.weight",
    **{t.removesuffix("_proj"): f"{projection_module(t)}.weight" for t in LORA_TARGETS},
    **{bias_name(t): f"{projection_module(t)}.bias" for t in LORA_TARGETS},
    "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
}


# Gemma 3's four norms per block (OLMo 2 has only the two after the attention and MLP outputs, named as Gemma's): input_layernorm (ln1), the norm on the attention output, the norm before the
# MLP (ln2: the one the MLP projections read, as Llama's post_attention_layernorm is) and the norm on the MLP
# output. Llama's name post_attention_layernorm is Gemma's norm on the attention *output*.
POST_NORM_TENSORS = {
    "ln2": "pre_feedforward_layernorm.weight", "post_attn_norm": "post_attention_layernorm.weight",
    "post_mlp_norm": "post_feedforward_layernorm.weight",
}
# The block tensors that are RMSNorm weights (ModelSpec.norm_offset is added to each when loaded).
NORM_TENSORS = ("ln1", "ln2", "post_attn_norm", "post_mlp_norm", "q_norm", "k_norm")


def layer_tensor(layer: int, name: str, post_norms: bool = False) -> str:
    """Full HF name of a block tensor by its short name (LAYER_TENSORS; with `post_norms`, Gemma's
    POST_NORM_TENSORS first), e.g. (2, "q") -> model.layers.2.self_attn.q_proj.weight."""
    table = {**LAYER_TENSORS, **POST_NORM_TENSORS} if post_norms else LAYER_TENSORS
    return f"model.layers.{layer}.{table[name]}"
