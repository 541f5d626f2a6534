"""engine.model.weight_formats against gguf-py: byte-equal quantization where gguf-py quantizes, bit-equal
dequantization everywhere, error bounds of our K-quant quantizer, sizes and shape refusals."""
import numpy as np
import pytest

from engine.model.weight_formats import FORMATS, QK_K, WeightFormat, dequantize, k_scale_min, quantize, to_gpu_layout
from tests.weight_format_cases import GGUF_QUANTIZES, gguf_dequantize, random_blocks, sample_weight

ALL = list(WeightFormat)
K_QUANTS = (WeightFormat.Q4_K, WeightFormat.Q5_K, WeightFormat.Q6_K)


def bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("fmt", GGUF_QUANTIZES, ids=lambda f: f.name)
@pytest.mark.parametrize("rows,cols", [(1, 32), (5, 96), (37, 64)])
def test_quantize_equals_gguf(fmt, rows, cols):
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize
    x = sample_weight(rows, cols, seed=rows * cols)
    if rows > 4:
        x[4, :32] = -x[4, :32]                     # a block whose largest magnitude is negative (q4_0's sign)
        x[4, 32] = np.float32(3.5)                 # exact halves meet the rounding rules
    want = np.ascontiguousarray(gguf_quantize(x, GGMLQuantizationType(fmt.value))).tobytes()
    assert quantize(x, fmt) == want


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.name)
def test_dequantize_equals_gguf_bit_for_bit(fmt):
    cols = 3 * FORMATS[fmt].block_size if FORMATS[fmt].is_block else 37
    for raw in (quantize(sample_weight(7, cols, seed=3), fmt), random_blocks(7, cols, fmt, seed=4)):
        got = dequantize(raw, fmt, (7, cols))
        assert got.dtype == np.float32 and got.shape == (7, cols)
        np.testing.assert_array_equal(bits(got), bits(gguf_dequantize(raw, fmt, (7, cols))))


def _steps(raw: bytes, fmt: WeightFormat, n_blocks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(step d·sc of every group [n_blocks, groups], d [n_blocks, 1], dmin [n_blocks, 1]) of K-quant blocks."""
    b = np.frombuffer(raw, np.uint8).reshape(n_blocks, FORMATS[fmt].block_bytes)
    if fmt == WeightFormat.Q6_K:
        d = b[:, 208:210].copy().view(np.float16).astype(np.float32)
        return d * b[:, 192:208].view(np.int8).astype(np.float32), d, np.zeros_like(d)
    sc, _ = k_scale_min(b[:, 4:16])
    d, dmin = (b[:, i:i + 2].copy().view(np.float16).astype(np.float32) for i in (0, 2))
    return d * sc.astype(np.float32), d, dmin


@pytest.mark.parametrize("fmt,rms_limit", [(WeightFormat.Q4_K, 0.12), (WeightFormat.Q5_K, 0.06),
                                           (WeightFormat.Q6_K, 0.03)], ids=lambda v: getattr(v, "name", v))
def test_k_quant_round_trip_within_half_a_step(fmt, rms_limit):
    # Our K-quant quantizer never clips: every weight lies within half its group's step of the stored value.
    x = sample_weight(9, 3 * QK_K, seed=11)
    raw = quantize(x, fmt)
    back = dequantize(raw, fmt, x.shape)
    steps, d, dmin = _steps(raw, fmt, x.size // QK_K)
    group = 16 if fmt == WeightFormat.Q6_K else 32
    err = np.abs(back - x).reshape(-1, QK_K // group, group).max(axis=2)
    assert (err <= 0.5 * steps * (1 + 1e-5) + 1e-12).all(), (err / np.maximum(steps, 1e-30)).max()
    # ...and the step is no coarser than the group's range needs: one unit of d (and of dmin) above it.
    g = x.reshape(-1, QK_K // group, group)
    levels = 15 if fmt == WeightFormat.Q4_K else 31
    span = np.abs(g).max(axis=2) if fmt == WeightFormat.Q6_K else g.max(axis=2) - np.minimum(g.min(axis=2), 0)
    assert (steps <= (span + dmin) / levels * (1 + 1e-5) + d).all()
    typical = slice(4, None)   # rows 0-3 are the deliberately odd ones (zeros, constant, tiny)
    rel = np.sqrt(((back - x)[typical] ** 2).mean()) / np.sqrt((x[typical] ** 2).mean())
    assert rel < rms_limit


def test_k_quant_zero_and_constant_blocks_are_exact():
    x = np.zeros((2, QK_K), np.float32)
    x[1] = 0.5
    for fmt in K_QUANTS:
        back = dequantize(quantize(x, fmt), fmt, x.shape)
        assert np.array_equal(back[0], x[0])
        np.testing.assert_allclose(back[1], x[1], rtol=2e-3)


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.name)
def test_sizes(fmt):
    info = FORMATS[fmt]
    cols = 4 * info.block_size if info.is_block else 40
    raw = quantize(sample_weight(3, cols, seed=1), fmt)
    assert info.nbytes((3, cols)) == len(raw) == 3 * cols // info.block_size * info.block_bytes
    assert to_gpu_layout(raw, fmt, (3, cols)).nbytes == info.gpu_nbytes((3, cols))
    gguf_bytes_per_weight = info.block_bytes / info.block_size
    extra = info.gpu_nbytes((3, cols)) / info.nbytes((3, cols)) - 1
    assert extra <= (2 / 210 + 1e-9 if fmt == WeightFormat.Q6_K else 0.0), (gguf_bytes_per_weight, extra)


def test_gpu_layout_pads_odd_block_rows():
    # q4_0 with 3 blocks a row: 54 bytes -> 56 (14 words); quants first, then the three f16 scales.
    x = sample_weight(2, 96, seed=2)
    raw = np.frombuffer(quantize(x, WeightFormat.Q4_0), np.uint8).reshape(2, 3, 18)
    words = to_gpu_layout(raw.tobytes(), WeightFormat.Q4_0, (2, 96)).reshape(2, 14)
    row = words[1].view(np.uint8)
    assert row[:48].tobytes() == raw[1, :, 2:].tobytes()
    assert row[48:54].tobytes() == raw[1, :, :2].tobytes() and row[54:].tobytes() == b"\0\0"


@pytest.mark.parametrize("fmt", [WeightFormat.Q8_0, WeightFormat.Q4_K, WeightFormat.Q6_K], ids=lambda f: f.name)
def test_rows_not_whole_blocks_are_refused_with_shape_and_format(fmt):
    x = np.zeros((3, 40), np.float32)
    for call in (lambda: quantize(x, fmt), lambda: FORMATS[fmt].nbytes((3, 40)),
                 lambda: FORMATS[fmt].gpu_nbytes((3, 40)), lambda: to_gpu_layout(b"", fmt, (3, 40))):
        with pytest.raises(ValueError, match=rf"shape \(3, 40\).*{fmt.name.lower()}"):
            call()


def test_wrong_byte_count_and_unknown_format():
    with pytest.raises(ValueError, match=r"q8_0 weight of shape \(2, 32\) needs 68 bytes, got 34"):
        dequantize(bytes(34), "q8_0", (2, 32))
    with pytest.raises(ValueError, match="unknown weight format 'q3_k'.*q4_k"):
        WeightFormat.parse("q3_k")
    assert WeightFormat.parse("Q4_1") is WeightFormat.parse(3) is WeightFormat.Q4_1


def test_bf16_rounding_equals_torch_in_every_chunk(monkeypatch):
    """bf16_bits, the one bf16 rounding (quantize and the GEMM's pack_weight use it): torch's .to(bfloat16) bit for
    bit on every finite and infinite value (ties to even, subnormals, the largest floats), NaN kept NaN (sign and
    quiet bit), across chunk boundaries (a chunk of 1000 floats here)."""
    import torch
    import engine.model.weight_formats as wf
    monkeypatch.setattr(wf, "BF16_CHUNK", 1000)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(5003) * 10.0 ** rng.integers(-40, 38, 5003)).astype(np.float32)
    ties = (np.arange(1, 200, dtype=np.uint32) << 16 | 0x8000).view(np.float32)        # exactly halfway
    edges = np.array([np.inf, -np.inf, 0.0, -0.0, 3.4028235e38, -3.4028235e38, 1e-45, -1e-45], np.float32)
    nans = np.array([0xFFFFFFFF, 0x7FFFFFFF, 0x7F800001, 0xFF800001, 0x7FC00000], np.uint32).view(np.float32)
    x = np.concatenate([x[:2500], ties, edges, nans, x[2500:]])
    got = wf.bf16_bits(x)
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(got[finite], want[finite])
    kept = got[~finite]
    assert np.all((kept & 0x7F80) == 0x7F80) and np.all(kept & 0x40)
    np.testing.assert_array_equal(kept >> 15, x[~finite].view(np.uint32) >> 31)     # the sign stays
