"""What the training engines need to know about a Hugging Face causal LM, validated once at the edge.

`load_model_spec(folder)` reads config.json into a frozen `ModelSpec` and refuses, before anything is
allocated, any architecture the engines cannot train — naming it, the supported ones and the linear layers found.
Config quirks that change the arithmetic are read as transformers reads them: which projections carry a bias
(`ModelSpec.bias_targets`), Gemma's (1+w) norms, post-norms, GeGLU, embedding and attention scales and
per-layer-type rope, Gemma 2's attention-logit and final-logit soft-capping, Granite's multipliers, OLMo 2's
post-norms and full-width q/k norms, SmolLM3's layers without rope, Phi-3's fused projections, and which
layers use a sliding window (`ModelSpec.layer_window`), which both engines' attention applies.
The rope itself (scaling types, partial rotary embedding, their refusals) is engine.model.rope's; `RopeSpec` and
`UnsupportedModelError` (engine.model.errors) stay importable from here. The weights themselves are
engine.model.weights' (one tensor at a time, as stored).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.model.errors import UnsupportedModelError
from engine.model.files import read_json_object
from engine.model.hf_names import FUSED_TARGETS, LORA_TARGETS, TARGET_ORDER
from engine.model.rope import RopeSpec, phi3_rope, rope_spec

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "granite", "olmo2", "smollm3",
                         "phi3")
GEMMA_TYPES = ("gemma2", "gemma3_text")

# Architectures people bring that the engines do not compute, and the feature that stops each: named in the
# refusal so the user knows it is not an oversight.
KNOWN_UNSUPPORTED = {
    "gemma3": "Gemma3ForConditionalGeneration is the vision-language model (its text layers live under "
              "model.language_model); the text-only Gemma3ForCausalLM (model_type gemma3_text) is supported",
}


@dataclass(frozen=True)
class ModelSpec:
    model_type: str          # one of SUPPORTED_MODEL_TYPES
    vocab_size: int
    hidden: int              # C
    layers: int              # L
    heads: int               # NH
    kv_heads: int            # NKV (GQA: NH % NKV == 0)
    head_dim: int            # HD
    intermediate: int        # MLP width
    rms_eps: float
    rope: RopeSpec
    tied_embeddings: bool
    qkv_bias: bool           # q/k/v biases: Qwen2; Llama and Qwen3 with attention_bias
    qk_norm: bool            # Qwen3
    max_positions: int
    source: str              # folder the spec was read from
    o_bias: bool = False     # o_proj bias: Llama and Qwen3 with attention_bias
    mlp_bias: bool = False   # gate/up/down biases: Llama with mlp_bias
    # transformers' sliding window: a query sees the keys kv with q − window < kv <= q (itself included), in the
    # layers `window_layers` (masking_utils.sliding_window_overlay).
    sliding_window: int | None = None
    window_layers: tuple[int, ...] = ()
    # Gemma 3 (gemma3_text). Norm weights are used as norm_offset + w (Gemma's x·(1+w)): the engines add the
    # offset once when they load a norm weight, in f32 as transformers does, so the norm kernels stay plain.
    norm_offset: float = 0.0
    post_norms: bool = False     # a norm on the attention output and on the MLP output before each residual add
    pre_norms: bool = True       # the norms before the attention and the MLP (OLMo 2 has none: post-norms only)
    qk_norm_full: bool = False   # q/k norm over the whole projection width [QD] / [KVD] (OLMo 2), not per head
    activation: str = "silu"     # the gated MLP's activation: silu (SwiGLU) | gelu_tanh (GeGLU)
    embed_scale: float = 1.0     # the embedding lookup is multiplied by this (Gemma: sqrt(hidden) in f32;
                                 # Granite: embedding_multiplier)
    score_scale: float | None = None   # the attention scores' scale instead of HD**-0.5 (Gemma:
                                       # query_pre_attn_scalar**-0.5; Granite: attention_multiplier)
    # Granite: each residual branch (o_proj's and down_proj's output, LoRA included) is multiplied by
    # residual_scale before its add, and the logits are divided by logits_scale.
    residual_scale: float = 1.0
    logits_scale: float = 1.0
    local_rope: RopeSpec | None = None           # the rope of the window_layers, where it differs (Gemma 3)
    nope_layers: tuple[int, ...] = ()            # layers without rotary embeddings (SmolLM3's no_rope_layers 0)
    # Gemma 2 (and Gemma 3 where set): the scaled attention scores s become cap·tanh(s / cap) before the mask
    # (attn_logit_softcapping), and the logits z cap·tanh(z / cap) (final_logit_softcapping); None: not capped.
    attn_softcap: float | None = None
    final_softcap: float | None = None
    # Phi-3: q/k/v and gate/up stored fused (qkv_proj, gate_up_proj; the engines split the frozen weights as they
    # load them), so LoRA targets the fused projections (lora_targets); and RoPE on the first rotary_dim dims of
    # each head only (partial_rotary_factor; None: the whole head), the rest passed through unrotated.
    fused: bool = False
    rotary_dim: int | None = None

    @property
    def rope_dim(self) -> int:
        """The dims of each head that RoPE rotates (its inverse frequencies are [rope_dim/2])."""
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """The projections a LoRA on this model may target, as PEFT names them (TARGET_ORDER)."""
        if not self.fused:
            return LORA_TARGETS
        members = {m for group in FUSED_TARGETS.values() for m in group}
        return tuple(t for t in TARGET_ORDER if t not in members)

    @property
    def bias_targets(self) -> tuple[str, ...]:
        """The projections (LORA_TARGETS order) that add a frozen bias [out] after their weight."""
        biased = {"q_proj": self.qkv_bias, "k_proj": self.qkv_bias, "v_proj": self.qkv_bias, "o_proj": self.o_bias,
                  "gate_proj": self.mlp_bias, "up_proj": self.mlp_bias, "down_proj": self.mlp_bias}
        return tuple(t for t in LORA_TARGETS if biased[t])

    @property
    def attention_scale(self) -> float:
        """What the scores q·k are multiplied by, as a Python float as transformers computes it."""
        return self.head_dim ** -0.5 if self.score_scale is None else self.score_scale

    def uses_rope(self, layer: int) -> bool:
        return layer not in self.nope_layers

    def layer_rope(self, layer: int) -> RopeSpec:
        """The rope of one layer: Gemma 3's sliding layers have their own theta."""
        return self.local_rope if self.local_rope is not None and layer in self.window_layers else self.rope

    def layer_window(self, layer: int) -> int | None:
        """The sliding window (in keys) of one layer's attention, None where it attends to every earlier key."""
        return self.sliding_window if layer in self.window_layers else None

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def projection_shape(self, target: str) -> tuple[int, int]:
        """(out_features, in_features) of a targetable projection, as torch stores its weight."""
        return {
            "q_proj": (self.q_dim, self.hidden), "k_proj": (self.kv_dim, self.hidden),
            "v_proj": (self.kv_dim, self.hidden), "o_proj": (self.hidden, self.q_dim),
            "gate_proj": (self.intermediate, self.hidden), "up_proj": (self.intermediate, self.hidden),
            "down_proj": (self.hidden, self.intermediate),
            "qkv_proj": (self.q_dim + 2 * self.kv_dim, self.hidden),
            "gate_up_proj": (2 * self.intermediate, self.hidden),
        }[target]

    def parameter_count(self) -> int:
        per_layer = sum(o * i for o, i in map(self.projection_shape, LORA_TARGETS))
        per_layer += (2 * self.pre_norms + 2 * self.post_norms) * self.hidden
        per_layer += sum(self.projection_shape(t)[0] for t in self.bias_targets)
        if self.qk_norm:
            per_layer += self.q_dim + self.kv_dim if self.qk_norm_full else 2 * self.head_dim
        embed = self.vocab_size * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * per_layer + embed + self.hidden


def _layer_list(layers: tuple[int, ...], total: int) -> str:
    """"all 4 layers", "layer 3" or "layers 2, 3" for a message."""
    if len(layers) == total:
        return f"all {total} layers"
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {', '.join(map(str, layers))}"


REQUIRED_CONFIG_KEYS = ("num_attention_heads", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")


def load_model_spec(folder: str | Path) -> ModelSpec:
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json — expected a Hugging Face model folder")
    config = read_json_object(config_path, "model config")
    model_type = config.get("model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        found = sorted({k.rsplit(".", 2)[-2] for k in _weight_names(folder) if k.endswith(".weight")
                        and ".layers." in k})
        why = f" ({KNOWN_UNSUPPORTED[model_type]})" if model_type in KNOWN_UNSUPPORTED else ""
        raise UnsupportedModelError(
            f"{folder}: architecture {model_type!r} ({', '.join(config.get('architectures', []) or ['?'])}) is not "
            f"supported for training{why}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}. "
            f"Linear layers found: {', '.join(found) or 'none'}")
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in config]
    if missing:
        raise UnsupportedModelError(f"{folder}: config.json lacks {', '.join(missing)}; it does not describe a "
                                    f"complete {model_type} model (is this the right folder?)")
    _check_sizes(config, config_path)
    gemma, granite, olmo2 = model_type in GEMMA_TYPES, model_type == "granite", model_type == "olmo2"
    smollm3, gemma3 = model_type == "smollm3", model_type == "gemma3_text"
    phi3 = model_type == "phi3"
    if phi3:
        _check_phi3(config, folder)
    if gemma and config.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"{folder}: use_bidirectional_attention is set (an encoder-style Gemma); "
                                    f"the engines train causal language models only")
    if granite and (config.get("attention_bias") or config.get("mlp_bias")):
        raise UnsupportedModelError(f"{folder}: a Granite model with attention_bias or mlp_bias is unsupported "
                                    f"(its residual_multiplier would scale the o_proj/down_proj biases too)")
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    hidden = int(config["hidden_size"])
    # Qwen3Config's head_dim defaults to 128 and Gemma2Config's and Gemma3TextConfig's to 256 (not
    # hidden / heads) when config.json leaves it out.
    default_hd = {"qwen3": 128, "gemma2": 256, "gemma3_text": 256}.get(model_type)
    head_dim = int(config.get("head_dim", default_hd) or hidden // heads)
    if heads % kv_heads:
        raise UnsupportedModelError(f"{folder}: {heads} attention heads are not a multiple of {kv_heads} KV heads")
    if head_dim > 256 or head_dim % 2:
        raise UnsupportedModelError(f"{folder}: head_dim {head_dim} is unsupported (even, at most 256)")
    # Gemma names its activation hidden_activation (gelu_pytorch_tanh by default); the others hidden_act.
    act_key = "hidden_activation" if gemma else "hidden_act"
    act_name = config.get(act_key) or ("gelu_pytorch_tanh" if gemma else "silu")
    activations = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"} if gemma else {"silu": "silu"}
    if act_name not in activations:
        raise UnsupportedModelError(f"{folder}: {act_key} {act_name!r} is unsupported; supported: "
                                    f"{', '.join(activations)}")
    layers = int(config["num_hidden_layers"])
    window, window_layers = _sliding_window(config, model_type, layers, folder)
    rotary_dim = None
    if phi3:
        rope, rotary_dim = phi3_rope(config, head_dim, folder)
        local_rope = None
    elif gemma3:
        # Gemma 3 keeps one rope per layer type: full_attention (rope_theta, default 1e6, maybe scaled) and
        # sliding_attention (rope_local_base_freq, default 1e4).
        params = config.get("rope_parameters") or {}
        full = dict(params.get("full_attention") or {})
        full.update(config.get("rope_scaling") or {})
        full.setdefault("rope_theta", config.get("rope_theta", 1_000_000.0))
        local = dict(params.get("sliding_attention") or {})
        local.setdefault("rope_theta", config.get("rope_local_base_freq", 10_000.0))
        positions = int(config.get("max_position_embeddings", 2048))
        rope = rope_spec({"rope_parameters": full, "max_position_embeddings": positions}, head_dim, folder)
        local_rope = rope_spec({"rope_parameters": local, "max_position_embeddings": positions}, head_dim, folder)
    else:
        rope, local_rope = rope_spec(config, head_dim, folder), None
    # Which projections carry a bias, as each transformers model class builds its nn.Linear layers: Qwen2's
    # q/k/v always (o never); Llama's and Qwen3's four attention ones with attention_bias; Llama's MLP with
    # mlp_bias. Mistral has none, whatever its config says.
    attention_bias = model_type in ("llama", "qwen3", "gemma2", "gemma3_text", "olmo2", "smollm3") and bool(
        config.get("attention_bias", False))
    return ModelSpec(
        model_type=model_type, vocab_size=int(config["vocab_size"]), hidden=hidden,
        layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        intermediate=int(config["intermediate_size"]),
        rms_eps=float(config.get("rms_norm_eps", 1e-5 if phi3 else 1e-6)),     # Phi3Config's default: 1e-5
        rope=rope, tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        qk_norm=model_type in ("qwen3", "gemma3_text", "olmo2"), qk_norm_full=olmo2, pre_norms=not olmo2,
        max_positions=int(config.get("max_position_embeddings", 4096 if phi3 else 2048)),
        source=str(folder), o_bias=attention_bias,
        mlp_bias=model_type in ("llama", "smollm3") and bool(config.get("mlp_bias", False)),
        sliding_window=window, window_layers=window_layers,
        norm_offset=1.0 if gemma else 0.0, post_norms=gemma or olmo2, activation=activations[act_name],
        # transformers multiplies by embed_scale cast to the weight dtype; the engines compute in f32.
        embed_scale=float(np.float32(hidden ** 0.5)) if gemma else (
            float(config.get("embedding_multiplier", 1.0)) if granite else 1.0),
        score_scale=float(config.get("query_pre_attn_scalar", 256)) ** -0.5 if gemma else (
            float(config.get("attention_multiplier", 1.0)) if granite else None),
        residual_scale=float(config.get("residual_multiplier", 1.0)) if granite else 1.0,
        logits_scale=float(config.get("logits_scaling", 1.0)) if granite else 1.0,
        local_rope=local_rope, nope_layers=_nope_layers(config, layers, folder) if smollm3 else (),
        attn_softcap=_softcap(config, "attn_logit_softcapping", model_type, folder),
        final_softcap=_softcap(config, "final_logit_softcapping", model_type, folder),
        fused=phi3, rotary_dim=rotary_dim)


def _check_phi3(config: dict, folder: Path) -> None:
    """What Phi3ForCausalLM computes differently from what the engines train, refused by name."""
    # Phi3DecoderLayer drops out each residual branch (resid_pdrop) and the attention weights (attention_dropout)
    # in training mode; the engines train without. embd_pdrop is read by nothing in Phi3Model (transformers 5).
    for key in ("resid_pdrop", "attention_dropout"):
        value = config.get(key, 0.0)
        if value not in (0, 0.0, None):
            raise UnsupportedModelError(f"{folder}: {key} is {value!r}: Phi-3's dropout in training mode is not "
                                        f"implemented; set it to 0.0 in config.json to train without it")
    # Phi3Config has no head_dim: the attention would read one given in config.json, but its rope validation
    # sizes the longrope factors by hidden_size / heads; the two must agree.
    heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
    if config.get("head_dim") not in (None, hidden // heads) or hidden % heads:
        raise UnsupportedModelError(f"{folder}: a Phi-3 head_dim of {config.get('head_dim', hidden / heads)!r} "
                                    f"(hidden_size {hidden} / {heads} heads) is unsupported: Phi-3's heads are "
                                    "hidden_size / num_attention_heads wide")


def _nope_layers(config: dict, layers: int, folder: Path) -> tuple[int, ...]:
    """SmolLM3's layers without rotary embeddings: no_rope_layers[i] is 1 where layer i uses rope, by default 0
    on every no_rope_layer_interval-th layer (SmolLM3Config)."""
    interval = int(config.get("no_rope_layer_interval", 4))
    flags = config.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
    if len(flags) != layers or set(flags) - {0, 1}:
        raise UnsupportedModelError(f"{folder}: no_rope_layers {flags!r} is not one 0 or 1 per layer ({layers})")
    return tuple(i for i, uses in enumerate(flags) if not uses)


# Gemma2Config's soft caps when config.json leaves them out (Gemma3TextConfig's are None).
_SOFTCAP_DEFAULTS = {"gemma2": {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}}


def _softcap(config: dict, key: str, model_type: str, folder: Path) -> float | None:
    """A Gemma soft cap as transformers reads it (the config class's default where the key is absent); the
    other architectures' classes never cap, whatever their config says."""
    if model_type not in GEMMA_TYPES:
        return None
    value = config[key] if key in config else _SOFTCAP_DEFAULTS.get(model_type, {}).get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UnsupportedModelError(f"{folder}: {key} is {value!r}; expected a positive number or null")
    return float(value)


_REQUIRED_SIZES = ("num_attention_heads", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")


def _check_sizes(config: dict, path: Path) -> None:
    """Every size the arithmetic divides or allocates by is a positive whole number (not 0, "64" or 64.5)."""
    for key in _REQUIRED_SIZES + _OPTIONAL_SIZES:
        value = config.get(key)
        if value is None and key in _OPTIONAL_SIZES:
            continue
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise UnsupportedModelError(f"{path}: {key} is {value!r}, expected a positive whole number; fix or "
                                        "restore config.json")


def _sliding_window(config: dict, model_type: str, layers: int, folder: Path) -> tuple[int | None, tuple]:
    """(window, layers that use it) as transformers 5 decides them.

    Mistral: every layer, when `sliding_window` is set (MistralConfig's default is 4096; it ignores
    layer_types). Qwen2/Qwen3: only with `use_sliding_window`; then the layers that `layer_types` marks
    "sliding_attention", by default those from `max_window_layers` on. Llama has no window.
    """
    if model_type == "mistral":
        window = config.get("sliding_window", 4096)
        return (None, ()) if window is None else (int(window), tuple(range(layers)))
    if model_type in GEMMA_TYPES:
        # Gemma 2 / 3: every layer_types "sliding_attention" layer uses sliding_window (default 4096); by default
        # one sliding layer then one global (Gemma 2), or five then one (Gemma 3's sliding_window_pattern 6).
        window = config.get("sliding_window", 4096)
        pattern = 2 if model_type == "gemma2" else int(config.get("sliding_window_pattern", 6))
        default = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
        types = config.get("layer_types") or default
    elif model_type == "smollm3":
        # SmolLM3: with use_sliding_window, the layer_types "sliding_attention" layers, by default its NoPE ones.
        window = config.get("sliding_window") if config.get("use_sliding_window", False) else None
        types = config.get("layer_types") or [
            "sliding_attention" if window is not None and i in _nope_layers(config, layers, folder)
            else "full_attention" for i in range(layers)]
    elif model_type == "phi3":
        # Phi-3: every layer, when sliding_window is set (Phi3Model picks the sliding-window mask for all).
        window = config.get("sliding_window")
        return (None, ()) if window is None else (int(window), tuple(range(layers)))
    elif model_type not in ("qwen2", "qwen3"):
        return None, ()
    else:
        window = config.get("sliding_window", 4096) if config.get("use_sliding_window", False) else None
        types = config.get("layer_types")
    if types is None:
        first = int(config.get("max_window_layers", 28))
        types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                 for i in range(layers)]
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown or len(types) != layers:
        raise UnsupportedModelError(
            f"{folder}: layer_types {types!r} is unsupported: the engines compute 'full_attention' and "
            f"'sliding_attention' layers, one entry per layer ({layers})")
    sliding = tuple(i for i, kind in enumerate(types) if kind == "sliding_attention")
    if window is None and sliding:
        # transformers itself raises here ("Could not find a `sliding_window` argument in the config").
        raise UnsupportedModelError(
            f"{folder}: layer_types marks {_layer_list(sliding, layers)} 'sliding_attention' but the config sets no "
            f"window (use_sliding_window {config.get('use_sliding_window', False)!r}, sliding_window "
            f"{config.get('sliding_window')!r}); transformers cannot run it either. Fix config.json")
    return (None, ()) if window is None or not sliding else (int(window), sliding)


def _weight_names(folder: Path) -> list[str]:
    from engine.model.weights import open_weights

    try:
        return list(open_weights(folder).stored())
    except (FileNotFoundError, OSError, ValueError):
        return []
