"""Weights for the format tests: gguf-py's quantizer where it has one, ours otherwise, and random raw blocks."""
from __future__ import annotations

import numpy as np

from bench.gguf_base import GGUF_QUANTIZES, gguf_bytes  # noqa: F401  (re-used by the format tests)
from engine.model.weight_formats import FORMATS, WeightFormat, quantize

# Byte ranges of each block format's f16 scales (kept finite in random blocks: a NaN scale proves nothing).
F16_FIELDS = {WeightFormat.Q8_0: (0, 2), WeightFormat.Q4_0: (0, 2), WeightFormat.Q4_1: (0, 4),
              WeightFormat.Q4_K: (0, 4), WeightFormat.Q5_K: (0, 4), WeightFormat.Q6_K: (208, 210)}


def sample_weight(rows: int, cols: int, seed: int) -> np.ndarray:
    """Gaussian rows of different scales, with the awkward cases: an all-zero first block, a constant block,
    an all-positive row, and a row small enough that its f16 scales are subnormal."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * rng.uniform(0.02, 3.0, (rows, 1))).astype(np.float32)
    x[0, :32] = 0.0
    if rows > 1:
        x[1, :32] = 0.75
    if rows > 2:
        x[2] = np.abs(x[2])
    if rows > 3:
        x[3] *= np.float32(1e-6)
    return x


def random_blocks(rows: int, cols: int, fmt: WeightFormat, seed: int) -> bytes:
    """Every bit pattern of the integer fields, with finite f16 scales (a block format) or finite values."""
    rng = np.random.default_rng(seed)
    info = FORMATS[fmt]
    if not info.is_block:
        return quantize(rng.standard_normal((rows, cols)).astype(np.float32) * 10, fmt)
    blocks = rng.integers(0, 256, (rows * cols // info.block_size, info.block_bytes), dtype=np.uint8)
    lo, hi = F16_FIELDS[fmt]
    blocks[:, lo:hi] = rng.uniform(-2, 2, (blocks.shape[0], (hi - lo) // 2)).astype(np.float16).view(np.uint8)
    return blocks.tobytes()


def gguf_dequantize(raw: bytes, fmt: WeightFormat, shape: tuple[int, int]) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequant
    info = FORMATS[fmt]
    if fmt == WeightFormat.F32:
        data = np.frombuffer(raw, np.float32).reshape(shape)
    elif fmt == WeightFormat.F16:
        data = np.frombuffer(raw, np.float16).reshape(shape)
    else:
        data = np.frombuffer(raw, np.uint8).reshape(shape[0], -1)
    out = gguf_dequant(data, GGMLQuantizationType(fmt.value))
    assert out.shape == shape and info.nbytes(shape) == len(raw)
    return out
