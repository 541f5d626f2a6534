"""What the training engines need to know about a Hugging Face causal LM, validated once at the edge.

`load_model_spec(folder)` reads config.json into a frozen `ModelSpec` and refuses, before anything is
allocated, any architecture the engines cannot train — naming it, the supported ones and the linear layers found.
`load_weights(folder)` reads every (possibly sharded) safetensors file into float32 numpy arrays.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.model.hf_names import LORA_TARGETS

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    scaling_type: str = "default"        # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0         # llama3 only
    high_freq_factor: float = 4.0        # llama3 only
    original_max_position: int = 8192    # llama3 only

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Per-pair inverse frequencies [head_dim/2] exactly as transformers' rope init functions compute them."""
        inv = 1.0 / (self.theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
        if self.scaling_type == "linear":
            inv = inv / self.factor
        elif self.scaling_type == "llama3":
            low_wavelen = self.original_max_position / self.low_freq_factor
            high_wavelen = self.original_max_position / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (self.original_max_position / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            inv = np.where(medium, smoothed, scaled)
        return inv.astype(np.float32)


@dataclass(frozen=True)
class ModelSpec:
    model_type: str          # llama | mistral | qwen2 | qwen3
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
    qkv_bias: bool           # Qwen2
    qk_norm: bool            # Qwen3
    max_positions: int
    source: str              # folder the spec was read from

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
        }[target]

    def parameter_count(self) -> int:
        per_layer = sum(o * i for o, i in map(self.projection_shape, LORA_TARGETS)) + 2 * self.hidden
        per_layer += (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        per_layer += 2 * self.head_dim if self.qk_norm else 0
        embed = self.vocab_size * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * per_layer + embed + self.hidden


def load_model_spec(folder: str | Path) -> ModelSpec:
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json — expected a Hugging Face model folder")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    model_type = config.get("model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        found = sorted({k.rsplit(".", 2)[-2] for k in _weight_names(folder) if k.endswith(".weight")
                        and ".layers." in k})
        raise UnsupportedModelError(
            f"{folder}: architecture {model_type!r} ({', '.join(config.get('architectures', []) or ['?'])}) is not "
            f"supported for training; supported: {', '.join(SUPPORTED_MODEL_TYPES)}. "
            f"Linear layers found: {', '.join(found) or 'none'}")
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise UnsupportedModelError(f"{folder}: {heads} attention heads are not a multiple of {kv_heads} KV heads")
    if head_dim > 256 or head_dim % 2:
        raise UnsupportedModelError(f"{folder}: head_dim {head_dim} is unsupported (even, at most 256)")
    if config.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{folder}: activation {config.get('hidden_act')!r}; only silu is supported")
    rope = _rope_spec(config, folder)
    return ModelSpec(
        model_type=model_type, vocab_size=int(config["vocab_size"]), hidden=hidden,
        layers=int(config["num_hidden_layers"]), heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        intermediate=int(config["intermediate_size"]), rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope=rope, tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
        qk_norm=model_type == "qwen3", max_positions=int(config.get("max_position_embeddings", 2048)),
        source=str(folder))


def _rope_spec(config: dict, folder: Path) -> RopeSpec:
    # transformers 5 keeps rope settings in `rope_parameters`; older configs use rope_theta + rope_scaling.
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise UnsupportedModelError(f"{folder}: rope scaling {kind!r} is unsupported (default, linear, llama3)")
    if kind == "default":
        return RopeSpec(theta=theta)
    if kind == "linear":
        return RopeSpec(theta=theta, scaling_type="linear", factor=float(params["factor"]))
    return RopeSpec(theta=theta, scaling_type="llama3", factor=float(params["factor"]),
                    low_freq_factor=float(params["low_freq_factor"]),
                    high_freq_factor=float(params["high_freq_factor"]),
                    original_max_position=int(params["original_max_position_embeddings"]))


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("adapter_")]
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (convert .bin checkpoints or a .gguf first)")
    return files


def _weight_names(folder: Path) -> list[str]:
    from safetensors import safe_open
    try:
        names = []
        for f in _weight_files(folder):
            with safe_open(f, framework="np") as handle:
                names.extend(handle.keys())
        return names
    except (FileNotFoundError, OSError):
        return []


def load_weights(folder: str | Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """{tensor name: float32 array} from every safetensors shard (bf16/f16 upcast), optionally only `names`."""
    import torch
    from safetensors import safe_open

    wanted = set(names) if names is not None else None
    out: dict[str, np.ndarray] = {}
    for f in _weight_files(Path(folder)):
        # framework="pt" because numpy has no bfloat16.
        with safe_open(f, framework="pt") as handle:
            for key in handle.keys():
                if wanted is None or key in wanted:
                    out[key] = handle.get_tensor(key).to(torch.float32).numpy()
    return out
