"""Storage formats of frozen weights: f32, f16, bf16 and GGUF's block formats (q8_0, q4_0, q4_1, q4_k, q5_k, q6_k).

The one owner of what a format is: its GGML type id (the number GGUF files and the WGSL format constants use),
block size, bytes per block, the bytes a [rows, cols] weight needs in a GGUF file and on the GPU, the numpy
dequantization (equal to gguf-py's `gguf.quants.dequantize` bit for bit: the same f32 operations in the same
order) and a quantizer (equal to gguf-py's `gguf.quants.quantize` byte for byte where gguf-py has one; for the
K-quants, which gguf-py only reads, the simple method described at `_quantize_k`).

A weight is row-major [rows, cols] (torch's [out_features, in_features]); blocks run along `cols`, so a row is
`cols / block_size` whole blocks and any permutation of rows keeps every block intact.

GPU layout (`to_gpu_layout`, read by shaders/weight_formats.wgsl). GGUF blocks are not all a multiple of 4 bytes
(q4_0 is 18, q8_0 34, q6_k 210) and WGSL storage reads are u32 words, so each row is re-packed on upload as
    [quant bytes of block 0, 1, …, rb-1][meta bytes of block 0, 1, …, rb-1][zero pad to a whole word]
with rb = cols / block_size. "Quant" bytes are the packed integers (a multiple of 4 bytes per block, so 4
consecutive weights are always inside one u32); "meta" bytes are the scales and minimums, as GGUF stores them
(f16 bits untouched, so widening them on the GPU is exact). See GPU_SPLIT for the byte ranges per format.
Every format except q6_k keeps GGUF's byte count (q8_0/q4_0 add two pad bytes on rows with an odd block count);
q6_k's 18 meta bytes (16 int8 scales + f16 d) get 2 pad bytes so d is word aligned: 212 bytes per 256 weights.
Rows are independent, so the planner can split a weight by rows and row permutations are plain row gathers.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

QK_K = 256   # super-block size of the K-quants


class WeightFormat(enum.Enum):
    """Value = GGML type id (gguf.GGMLQuantizationType), also the WGSL FMT_* constant of the format."""
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q8_0 = 8
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    BF16 = 30

    @property
    def info(self) -> "FormatInfo":
        return FORMATS[self]

    @classmethod
    def parse(cls, name: "str | int | WeightFormat") -> "WeightFormat":
        """A format from its name ("q4_k", "Q4_K", "bf16"), GGML type id or itself; ValueError listing the names."""
        if isinstance(name, WeightFormat):
            return name
        if isinstance(name, (int, np.integer)):
            try:
                return cls(int(name))
            except ValueError:
                pass
        elif str(name).upper() in cls.__members__:
            return cls[str(name).upper()]
        raise ValueError(f"unknown weight format {name!r}; known: {', '.join(f.name.lower() for f in cls)}")


@dataclass(frozen=True)
class FormatInfo:
    format: WeightFormat
    block_size: int          # weights per block along a row
    block_bytes: int         # bytes per block in a GGUF file
    quant_bytes: int         # GPU layout: bytes per block of packed integers (0 for f32/f16/bf16)
    meta_bytes: int          # GPU layout: bytes per block of scales/minimums (padding included)

    @property
    def name(self) -> str:
        return self.format.name.lower()

    @property
    def is_block(self) -> bool:
        return self.block_size > 1

    def check_shape(self, shape: tuple[int, ...], name: str = "weight") -> tuple[int, int]:
        """(rows, cols) of a 1-D or 2-D `shape`, or a ValueError if rows do not split into whole blocks."""
        if len(shape) not in (1, 2) or min(shape, default=0) < 0:
            raise ValueError(f"{name}: shape {tuple(shape)} is not a 1-D or 2-D weight shape")
        rows, cols = (1, shape[0]) if len(shape) == 1 else shape
        if cols % self.block_size:
            raise ValueError(f"{name} of shape {tuple(shape)} cannot be stored as {self.name}: its rows of {cols} "
                             f"are not a multiple of the {self.block_size}-weight block; keep it in f32, f16 or bf16")
        return int(rows), int(cols)

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of a weight of `shape` in a GGUF file (and as `quantize` returns it)."""
        rows, cols = self.check_shape(shape)
        return rows * (cols // self.block_size) * self.block_bytes

    def gpu_row_words(self, cols: int) -> int:
        """u32 words of one row in the GPU layout (the WGSL functions compute the same from the block count)."""
        rb = cols // self.block_size
        per_block = self.quant_bytes + self.meta_bytes if self.is_block else self.block_bytes
        return (rb * per_block + 3) // 4

    def gpu_nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of a weight of `shape` in the GPU layout (`to_gpu_layout`), before GpuContext rounds to 16."""
        rows, cols = self.check_shape(shape)
        return 4 * rows * self.gpu_row_words(cols)


FORMATS: dict[WeightFormat, FormatInfo] = {f.format: f for f in (
    FormatInfo(WeightFormat.F32, 1, 4, 0, 0),
    FormatInfo(WeightFormat.F16, 1, 2, 0, 0),
    FormatInfo(WeightFormat.BF16, 1, 2, 0, 0),
    FormatInfo(WeightFormat.Q8_0, 32, 34, 32, 2),
    FormatInfo(WeightFormat.Q4_0, 32, 18, 16, 2),
    FormatInfo(WeightFormat.Q4_1, 32, 20, 16, 4),
    FormatInfo(WeightFormat.Q4_K, QK_K, 144, 128, 16),
    FormatInfo(WeightFormat.Q5_K, QK_K, 176, 160, 16),
    FormatInfo(WeightFormat.Q6_K, QK_K, 210, 192, 20),
)}

# Byte ranges of a GGUF block that form its quant and meta parts on the GPU (llama.cpp ggml-common.h):
#   q8_0  {f16 d; int8 qs[32]}                              quant qs,          meta d
#   q4_0  {f16 d; u8 qs[16]}                                quant qs,          meta d
#   q4_1  {f16 d; f16 m; u8 qs[16]}                         quant qs,          meta d m
#   q4_k  {f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}      quant qs,          meta d dmin scales
#   q5_k  {f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}  quant qh qs, meta d dmin scales
#   q6_k  {u8 ql[128]; u8 qh[64]; int8 scales[16]; f16 d}   quant ql qh,       meta scales d (+2 zero bytes)
GPU_SPLIT: dict[WeightFormat, tuple[tuple[int, int], tuple[int, int]]] = {
    WeightFormat.Q8_0: ((2, 34), (0, 2)),
    WeightFormat.Q4_0: ((2, 18), (0, 2)),
    WeightFormat.Q4_1: ((4, 20), (0, 4)),
    WeightFormat.Q4_K: ((16, 144), (0, 16)),
    WeightFormat.Q5_K: ((16, 176), (0, 16)),
    WeightFormat.Q6_K: ((0, 192), (192, 210)),
}


def _as_bytes(raw) -> np.ndarray:
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return np.frombuffer(raw, np.uint8)
    return np.ascontiguousarray(raw).view(np.uint8).reshape(-1)


def _blocks(raw, info: FormatInfo, shape) -> tuple[np.ndarray, int, int]:
    rows, cols = info.check_shape(tuple(shape))
    data = _as_bytes(raw)
    if data.size != info.nbytes(shape):
        raise ValueError(f"{info.name} weight of shape {tuple(shape)} needs {info.nbytes(shape)} bytes, "
                         f"got {data.size}")
    return data.reshape(rows * (cols // info.block_size), info.block_bytes), rows, cols


def _f16(b: np.ndarray) -> np.ndarray:
    """f16 bytes [n, 2] -> f32 [n, 1] (exact)."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, groups: int) -> np.ndarray:
    """Bytes [n, groups·m] -> 4-bit values [n, groups, 2, m]: per group of m bytes, low nibbles then high."""
    q = qs.reshape(qs.shape[0], groups, 1, -1) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return q & np.uint8(0x0F)


def k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and 8 six-bit minimums of q4_k/q5_k packed into 12 bytes ([n, 12] -> two [n, 8]).

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same for the
    minimums; bytes 8-11 the low 4 bits of scale 4+j (low nibble) and minimum 4+j (high nibble).
    """
    s = scales.reshape(-1, 3, 4)
    lo_s, lo_m, hi = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([lo_s & 0x3F, (hi & 0x0F) | ((lo_s >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([lo_m & 0x3F, (hi >> 4) | ((lo_m >> 2) & 0x30)], axis=-1)
    return sc, mn


def dequantize(raw, fmt, shape) -> np.ndarray:
    """float32 array of `shape` from a weight stored in `fmt` (GGUF bytes, as `quantize` and GGUF files hold it).

    Every result equals gguf.quants.dequantize bit for bit: scales are widened from f16 exactly and combined
    with the integers in the same f32 operations and order (q4_1 d·q + m; k-quants (d·sc)·q − dmin·m).
    """
    info = FORMATS[WeightFormat.parse(fmt)]
    f = info.format
    if f in (WeightFormat.F32, WeightFormat.F16, WeightFormat.BF16):
        data = _as_bytes(raw)
        if data.size != info.nbytes(shape):
            raise ValueError(f"{info.name} weight of shape {tuple(shape)} needs {info.nbytes(shape)} bytes, "
                             f"got {data.size}")
        if f == WeightFormat.F32:
            out = data.view(np.float32).copy()
        elif f == WeightFormat.F16:
            out = data.view(np.float16).astype(np.float32)
        else:
            out = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return out.reshape(shape)
    b, _, _ = _blocks(raw, info, shape)
    n = b.shape[0]
    if f == WeightFormat.Q8_0:
        out = b[:, 2:].view(np.int8).astype(np.float32) * _f16(b[:, :2])
    elif f == WeightFormat.Q4_0:
        q = _nibbles(b[:, 2:], 1).reshape(n, 32).astype(np.int8) - np.int8(8)
        out = _f16(b[:, :2]) * q.astype(np.float32)
    elif f == WeightFormat.Q4_1:
        q = _nibbles(b[:, 4:], 1).reshape(n, 32).astype(np.float32)
        out = _f16(b[:, :2]) * q + _f16(b[:, 2:4])
    elif f in (WeightFormat.Q4_K, WeightFormat.Q5_K):
        sc, mn = k_scale_min(b[:, 4:16])
        ds = (_f16(b[:, :2]) * sc.astype(np.float32)).reshape(n, 8, 1)
        dm = (_f16(b[:, 2:4]) * mn.astype(np.float32)).reshape(n, 8, 1)
        if f == WeightFormat.Q4_K:
            q = _nibbles(b[:, 16:], 4).reshape(n, 8, 32)
        else:
            high = (b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1)
            q = _nibbles(b[:, 48:], 4).reshape(n, 8, 32) | (high << np.uint8(4))
        out = ds * q.astype(np.float32) - dm
    elif f == WeightFormat.Q6_K:
        ds = (_f16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32)).reshape(n, 16, 1)
        low = _nibbles(b[:, :128], 2).reshape(n, 8, 32)       # [half, nibble, 64 bytes] -> groups of 32
        high = (b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1))
        q = (low | ((high.reshape(n, 8, 32) & np.uint8(3)) << np.uint8(4))).astype(np.int8) - np.int8(32)
        out = ds * q.reshape(n, 16, 16).astype(np.float32)
    else:  # pragma: no cover - FORMATS and this function list the same formats
        raise AssertionError(f)
    return out.reshape(shape)


BF16_CHUNK = 1 << 22   # floats rounded per pass of bf16_bits (16 MiB: temporaries stay small, passes stay cached)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """uint16 [x.size]: float32 `x` rounded to bfloat16 (to nearest, ties to even, on the top 16 bits, as torch's
    .to(bfloat16)); a NaN stays a NaN (its top half with the quiet bit set). The one owner of this rounding.

    In uint32 and in chunks: the sum cannot wrap for any finite or infinite value (the largest, 0xFF800000 for
    -inf, plus 0x8000 stays below 2^32), and NaNs, which might, are replaced afterwards. (An earlier uint64 version
    of the whole array took 1.6 s per 16.8 M floats on the 2-core dev box, this one ~0.1 s.)"""
    flat = np.ascontiguousarray(x, np.float32).reshape(-1).view(np.uint32)
    out = np.empty(flat.size, np.uint16)
    for start in range(0, flat.size, BF16_CHUNK):
        n = flat[start:start + BF16_CHUNK]
        rounded = (n + ((n >> 16) & 1) + np.uint32(0x7FFF)) >> 16
        nan = (n & 0x7FFFFFFF) > 0x7F800000
        if nan.any():
            rounded = np.where(nan, (n >> 16) | 0x40, rounded)
        out[start:start + BF16_CHUNK] = rounded
    return out


def quantize(x: np.ndarray, fmt) -> bytes:
    """GGUF bytes of float32 `x` (1-D or 2-D, rows of whole blocks) in `fmt`.

    f32/f16/bf16, q8_0, q4_0 and q4_1 give exactly what gguf.quants.quantize gives (the reference rounding of
    ggml-quants.c: q8_0 rounds half away from zero, q4_0/q4_1 truncate x/d + 8.5 or (x − min)/d + 0.5).
    q4_k, q5_k and q6_k, which gguf-py cannot quantize, use `_quantize_k`.
    """
    info = FORMATS[WeightFormat.parse(fmt)]
    f = info.format
    x = np.asarray(x, np.float32)
    info.check_shape(x.shape)
    if f == WeightFormat.F32:
        return np.ascontiguousarray(x).tobytes()
    if f == WeightFormat.F16:
        return x.astype(np.float16).tobytes()
    if f == WeightFormat.BF16:
        return bf16_bits(x).tobytes()
    blocks = x.reshape(-1, info.block_size)
    if f == WeightFormat.Q8_0:
        d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
        inv = _safe_inverse(d)
        v = blocks * inv
        q = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))     # round half away from zero
        return np.concatenate([_f16_bytes(d), q.astype(np.int8).view(np.uint8)], axis=1).tobytes()
    if f == WeightFormat.Q4_0:
        # d keeps the sign of the largest-magnitude weight so that weight maps to -8 exactly.
        big = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)
        d = big / np.float32(-8)
        q = np.trunc(blocks * _safe_inverse(d) + np.float32(8.5)).astype(np.uint8).clip(0, 15)
        return np.concatenate([_f16_bytes(d), _pack_nibbles(q)], axis=1).tobytes()
    if f == WeightFormat.Q4_1:
        lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
        d = (hi - lo) / np.float32(15)
        q = np.trunc((blocks - lo) * _safe_inverse(d) + np.float32(0.5)).astype(np.uint8).clip(0, 15)
        return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)], axis=1).tobytes()
    return _quantize_k(blocks, f)


def _safe_inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(v.astype(np.float16)).view(np.uint8).reshape(v.shape[0], -1)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 32] 4-bit values -> [n, 16] bytes: value j in the low nibble of byte j, value 16+j in its high nibble."""
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def _f16_at_least(v: np.ndarray) -> np.ndarray:
    """v rounded to f16, then stepped up one f16 where rounding went down (so v / result ≤ the intended bound)."""
    h = v.astype(np.float16)
    low = h.astype(np.float32) < v
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h


def _quantize_k(blocks: np.ndarray, f: WeightFormat) -> bytes:
    """q4_k / q5_k / q6_k by a simple covering method (not llama.cpp's error-minimising search).

    q4_k/q5_k: each sub-block of 32 stores x ≈ (d·sc)·q − dmin·m with q in [0, L] (L = 15 or 31). Its
    offset dmin·m is the smallest step of dmin at or above −min(0, min x) (6-bit m, rounded up), its step d·sc
    the smallest step of d at or above (max x + dmin·m) / L (6-bit sc, rounded up), with d and dmin the f16 at
    or above the largest needed value / 63. Rounding the 6-bit values up keeps every weight inside
    [−dmin·m, L·d·sc − dmin·m], so q = round((x + dmin·m) / (d·sc)) never clips and every weight is within
    half a step (d·sc / 2, plus f32 rounding) of its value: tests/test_weight_formats.py checks that bound.
    q6_k: each group of 16 stores x ≈ (d·sc)·q, q in [−32, 31], sc an int8 in [0, 127]: d·sc is the smallest
    step of d at or above max|x| / 31, so again no weight clips and the error is at most half a step.
    """
    n = blocks.shape[0]
    b = blocks.reshape(n, QK_K)
    if f == WeightFormat.Q6_K:
        g = b.reshape(n, 16, 16)
        need = np.abs(g).max(axis=2) / np.float32(31)                          # [n, 16] step per group
        d = _f16_at_least(need.max(axis=1, keepdims=True) / np.float32(127))   # [n, 1] f16
        sc = _ceil_ratio(need, d, 127)
        ds = (d.astype(np.float32) * sc.astype(np.float32))[:, :, None]
        q = np.clip(np.round(g * _safe_inverse(ds)), -32, 31).astype(np.int8) + np.int8(32)
        q = q.astype(np.uint8).reshape(n, 2, 4, 32)                           # [half, group of 32, l]
        ql = (q[:, :, 0:2] & 0x0F) | ((q[:, :, 2:4] & 0x0F) << 4)             # [n, 2, 2, 32] -> 64 bytes per half
        qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
        return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.astype(np.int8).view(np.uint8),
                               d.view(np.uint8).reshape(n, 2)], axis=1).tobytes()
    levels = 15 if f == WeightFormat.Q4_K else 31
    s = b.reshape(n, 8, 32)
    lo = -np.minimum(s.min(axis=2), 0)                                         # [n, 8] offset needed, ≥ 0
    dmin = _f16_at_least(lo.max(axis=1, keepdims=True) / np.float32(63))
    mn = _ceil_ratio(lo, dmin, 63)
    dm = dmin.astype(np.float32) * mn.astype(np.float32)                       # [n, 8] as dequantize forms it
    need = (s.max(axis=2) + dm) / np.float32(levels)
    d = _f16_at_least(need.max(axis=1, keepdims=True) / np.float32(63))
    sc = _ceil_ratio(need, d, 63)
    ds = d.astype(np.float32) * sc.astype(np.float32)
    q = np.clip(np.round((s + dm[:, :, None]) * _safe_inverse(ds)[:, :, None]), 0, levels).astype(np.uint8)
    packed = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)], axis=1).astype(np.uint8)
    head = [d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), packed]
    qs = ((q[:, 0::2] & 0x0F) | ((q[:, 1::2] & 0x0F) << 4)).reshape(n, 128)   # sub-blocks 2j, 2j+1 share bytes
    if f == WeightFormat.Q5_K:
        qh = np.zeros((n, 32), np.uint8)
        for sub in range(8):
            qh |= (q[:, sub] >> 4) << np.uint8(sub)
        head.append(qh)
    return np.concatenate(head + [qs], axis=1).tobytes()


def _ceil_ratio(need: np.ndarray, unit: np.ndarray, top: int) -> np.ndarray:
    """The smallest integer k in [0, top] with k·unit ≥ need (in f32, as dequantize multiplies), per element."""
    u = unit.astype(np.float32)
    k = np.ceil(need * _safe_inverse(u)).clip(0, top)
    short = (k * u < need) & (k < top)                 # 1/unit rounded down: one more step
    return (k + short).astype(np.uint8)


def to_gpu_layout(raw, fmt, shape) -> np.ndarray:
    """The u32 words [rows · gpu_row_words] of a weight in the GPU layout (module docstring) from its GGUF bytes."""
    info = FORMATS[WeightFormat.parse(fmt)]
    rows, cols = info.check_shape(tuple(shape))
    data = _as_bytes(raw)
    if data.size != info.nbytes(shape):
        raise ValueError(f"{info.name} weight of shape {tuple(shape)} needs {info.nbytes(shape)} bytes, "
                         f"got {data.size}")
    row_bytes = 4 * info.gpu_row_words(cols)
    out = np.zeros((rows, row_bytes), np.uint8)
    if not info.is_block:
        out[:, :cols * info.block_bytes] = data.reshape(rows, -1)
    else:
        rb = cols // info.block_size
        b = data.reshape(rows, rb, info.block_bytes)
        (q0, q1), (m0, m1) = GPU_SPLIT[info.format]
        out[:, :rb * info.quant_bytes] = b[:, :, q0:q1].reshape(rows, -1)
        meta = np.zeros((rows, rb, info.meta_bytes), np.uint8)
        meta[:, :, :m1 - m0] = b[:, :, m0:m1]
        out[:, rb * info.quant_bytes:rb * (info.quant_bytes + info.meta_bytes)] = meta.reshape(rows, -1)
    return out.view(np.uint32).reshape(-1)


# ---- which format a frozen tensor is held in for training ------------------------------------------------------
# `--weights` choices. "stored" keeps each tensor as the model file holds it (a GGUF's own quantization, a
# safetensors' bf16); the others convert on load, tensor by tensor. Norm weights and biases are tiny and always f32.
WEIGHT_CHOICES = ("stored", "f32", "bf16", "f16", "q8", "q4")


def held_format(choice: str, stored: WeightFormat, shape: tuple[int, ...], vocab: bool = False) -> WeightFormat:
    """The format a frozen matrix of `shape` is held in under `choice`.

    q8 is Q8_0. q4 is Q4_K (4.5 bits a weight, 6-bit sub-block scales) where rows are whole 256-weight blocks,
    else Q4_1 (5 bits, blocks of 32). The vocabulary tables (embedding, LM head) stay at 8 bits under q4: every
    token's logit and embedding passes through them, and llama.cpp's 4-bit mixes keep them wider for that reason.
    A row length that no block divides keeps the matrix in bf16 rather than failing."""
    if choice not in WEIGHT_CHOICES:
        raise ValueError(f"weights {choice!r} is unknown; choose from {', '.join(WEIGHT_CHOICES)}")
    if len(shape) != 2:
        return WeightFormat.F32
    if choice == "stored":
        return stored
    if choice == "q4" and vocab:
        choice = "q8"
    wanted = {"f32": (WeightFormat.F32,), "bf16": (WeightFormat.BF16,), "f16": (WeightFormat.F16,),
              "q8": (WeightFormat.Q8_0,), "q4": (WeightFormat.Q4_K, WeightFormat.Q4_1)}[choice]
    return next((f for f in wanted if shape[1] % FORMATS[f].block_size == 0), WeightFormat.BF16)
