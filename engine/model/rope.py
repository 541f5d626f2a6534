"""Rotary position embeddings as transformers reads them from config.json: the frozen `RopeSpec` and its
per-pair inverse frequencies.

Owns the rope types (default, linear, llama3, yarn, longrope; `ROPE_TYPES`), with their factors, ramps and
attention factors as modeling_rope_utils computes them; partial rotary embedding (Phi-3's
partial_rotary_factor, `phi3_rope`); and the refusals of the rope settings the engines do not compute exactly.
engine.model.spec calls `rope_spec` and `phi3_rope` while it reads the rest of the config.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.model.errors import UnsupportedModelError

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    scaling_type: str = "default"        # one of ROPE_TYPES
    factor: float = 1.0
    low_freq_factor: float = 1.0         # llama3 only
    high_freq_factor: float = 4.0        # llama3 only
    original_max_position: int = 8192    # llama3, yarn and longrope
    beta_fast: float = 32.0              # yarn only: the ramp between extrapolated and interpolated frequencies
    beta_slow: float = 1.0
    truncate: bool = True                # yarn only: the ramp's bounds rounded to whole dimensions
    short_factor: tuple[float, ...] = ()     # longrope: per-pair divisors [HD/2] for sequences up to
    long_factor: tuple[float, ...] = ()      # original_max_position, and for longer ones
    # What transformers multiplies the rotation's cos and sin by (its attention_scaling; yarn and longrope set
    # it): q and k both carry it, so the scores carry its square.
    attention_factor: float = 1.0

    def inv_freq(self, head_dim: int, seq_len: int | None = None) -> np.ndarray:
        """Per-pair inverse frequencies [head_dim/2] exactly as transformers' rope init functions compute them.
        longrope's depend on the length of the sequences (`seq_len`, the engine's T): its long factors apply
        past original_max_position, as transformers' longrope_frequency_update picks them per batch."""
        pos_freqs = self.theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim)
        inv = 1.0 / pos_freqs
        if self.scaling_type == "yarn":
            return self._yarn_inv_freq(pos_freqs, head_dim)
        if self.scaling_type == "longrope":
            if seq_len is None:
                raise ValueError("longrope's inverse frequencies depend on the sequence length: pass seq_len")
            ext = self.long_factor if seq_len > self.original_max_position else self.short_factor
            return (1.0 / (np.asarray(ext, np.float32) * pos_freqs)).astype(np.float32)
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

    def _yarn_inv_freq(self, pos_freqs: np.ndarray, dim: int) -> np.ndarray:
        """modeling_rope_utils._compute_yarn_parameters: interpolated (/ factor) frequencies below the correction
        range, extrapolated (original) ones above it, a linear ramp between, in f32 as torch computes them."""
        def correction_dim(rotations: float) -> float:
            return (dim * math.log(self.original_max_position / (rotations * 2 * math.pi))) / (
                2 * math.log(self.theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001           # transformers' guard against a zero-width ramp
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
        extrapolation = (np.float32(1) - ramp).astype(np.float32)
        inv_extrapolation = (1.0 / pos_freqs).astype(np.float32)
        inv_interpolation = (1.0 / (np.float32(self.factor) * pos_freqs)).astype(np.float32)
        return (inv_interpolation * (1 - extrapolation) + inv_extrapolation * extrapolation).astype(np.float32)


def rope_spec(config: dict, head_dim: int, folder: Path) -> RopeSpec:
    """The rope as transformers' standardize_rope_params and rope init functions read it."""
    # transformers 5 keeps rope settings in `rope_parameters`; older configs use rope_theta + rope_scaling.
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ROPE_TYPES:
        raise UnsupportedModelError(f"{folder}: rope scaling {kind!r} is unsupported ({', '.join(ROPE_TYPES)})")
    if kind == "default":
        return RopeSpec(theta=theta)
    if "factor" not in params and kind != "longrope":   # longrope's defaults to the positions' ratio
        raise UnsupportedModelError(f"{folder}: rope scaling {kind!r} needs a factor; config.json gives none")
    if kind == "linear":
        return RopeSpec(theta=theta, scaling_type="linear", factor=float(params["factor"]))
    # The pretraining length: a top-level original_max_position_embeddings first (Phi-3's habit, which
    # transformers honours over the rope dict), else the rope dict's, else max_position_embeddings.
    positions = int(config.get("max_position_embeddings", 2048))
    original = int(config.get("original_max_position_embeddings") or params.get(
        "original_max_position_embeddings") or positions)
    if kind == "llama3":
        return RopeSpec(theta=theta, scaling_type="llama3", factor=float(params["factor"]),
                        low_freq_factor=float(params["low_freq_factor"]),
                        high_freq_factor=float(params["high_freq_factor"]), original_max_position=original)
    # standardize_rope_params moves a top-level partial_rotary_factor into the rope dict; yarn's and longrope's
    # inits read it.
    params.setdefault("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if params["partial_rotary_factor"] != 1.0:
        raise UnsupportedModelError(f"{folder}: partial_rotary_factor {params['partial_rotary_factor']!r} is "
                                    f"unsupported: the engines rotate the whole head")
    if kind == "longrope":
        return _longrope_spec(params, theta, positions, original, head_dim, folder)
    return _yarn_spec(params, theta, positions, original, folder)


def _yarn_spec(params: dict, theta: float, positions: int, original: int, folder: Path) -> RopeSpec:
    """modeling_rope_utils._compute_yarn_parameters' factor, ramp bounds and attention factor."""
    factor = params.get("factor")
    factor = float(positions / original if factor is None else factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = params.get("attention_factor")
    if attention is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return RopeSpec(theta=theta, scaling_type="yarn", factor=factor, original_max_position=original,
                    beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                    truncate=bool(params.get("truncate", True)), attention_factor=float(attention))


def _longrope_spec(params: dict, theta: float, positions: int, original: int, head_dim: int,
                   folder: Path) -> RopeSpec:
    """modeling_rope_utils._compute_longrope_parameters' factors and attention factor."""
    factors = {}
    for key in ("short_factor", "long_factor"):
        values = params.get(key)
        if not isinstance(values, list) or len(values) != head_dim // 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
            raise UnsupportedModelError(f"{folder}: longrope {key} must be {head_dim // 2} positive numbers (one per "
                                        f"rotary pair of head_dim {head_dim}), got {values!r}")
        factors[key] = tuple(float(v) for v in values)
    factor = params.get("factor")
    factor = float(positions / original if factor is None else factor)
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeSpec(theta=theta, scaling_type="longrope", factor=factor, original_max_position=original,
                    attention_factor=float(attention), **factors)


def phi3_rope(config: dict, head_dim: int, folder: Path) -> tuple[RopeSpec, int | None]:
    """(rope, rotary dims or None for the whole head) as Phi3Config reads them: rope_scaling replaces
    rope_parameters; "su" and "yarn" mean longrope; only default and longrope are valid; a top-level
    original_max_position_embeddings wins over the rope dict's (Phi3Config's default: 4096); RoPE covers the first
    int(head_dim · partial_rotary_factor) dims of each head, and the longrope factors are per pair of those."""
    params = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params.setdefault("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    kind = "longrope" if kind in ("su", "yarn") else kind
    if kind not in ("default", "longrope"):
        raise UnsupportedModelError(f"{folder}: Phi-3 rope type {kind!r} is unsupported: Phi3Config accepts "
                                    "default and longrope only")
    partial = params.pop("partial_rotary_factor")
    rotary = int(head_dim * partial)
    if isinstance(partial, bool) or not 0 < rotary <= head_dim or rotary % 2:
        raise UnsupportedModelError(f"{folder}: partial_rotary_factor {partial!r} gives {rotary} rotary dims of a "
                                    f"{head_dim}-dim head; expected an even number from 2 to {head_dim}")
    positions = int(config.get("max_position_embeddings", 4096))
    original = config.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
    rope = rope_spec({"rope_parameters": {**params, "rope_type": kind}, "max_position_embeddings": positions,
                       "original_max_position_embeddings": int(original or 4096)}, rotary, folder)
    return rope, None if rotary == head_dim else rotary
