"""Embedding gather against numpy, with the table split into vocabulary pieces of uneven size."""
import numpy as np
import pytest

from engine.backends.wgpu.kernels.embedding import Embedding

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("rows,dim,splits", [(1, 1, [5]), (7, 72, [11]), (13, 33, [4, 9, 10])])
def test_embedding_gather_over_pieces(gpu_device, rows, dim, splits):
    ctx = gpu_device
    rng = np.random.default_rng(rows)
    vocab = sum(splits)
    table = rng.standard_normal((vocab, dim)).astype(np.float32)
    ids = rng.integers(0, vocab, rows).astype(np.int32)
    ids[0] = vocab - 1
    pieces, v0 = [], 0
    for n in splits:
        pieces.append((ctx.upload(table[v0:v0 + n], f"piece{v0}"), v0, n))
        v0 += n
    out = ctx.buffer(4 * rows * dim, "out")
    emb = Embedding(ctx, out, ctx.upload(ids, "ids"), pieces, rows, dim)
    enc = ctx.encoder()
    emb.encode_forward(enc)
    enc.submit()
    np.testing.assert_array_equal(ctx.read(out, count=rows * dim).reshape(rows, dim), table[ids])


@pytest.mark.parametrize("fmt", ["bf16", "f16", "q8_0", "q4_k"])
def test_embedding_gather_from_a_held_format(gpu_device, fmt):
    """A table held in a 16-bit or block format gathers the dequantized rows (numpy's dequantize)."""
    from engine.model.weight_formats import FORMATS, WeightFormat, dequantize, quantize, to_gpu_layout

    ctx = gpu_device
    fmt = WeightFormat.parse(fmt)
    rows, vocab, dim = 9, 13, 2 * FORMATS[fmt].block_size if FORMATS[fmt].is_block else 38
    rng = np.random.default_rng(fmt.value)
    table = rng.standard_normal((vocab, dim)).astype(np.float32)
    raw = np.frombuffer(quantize(table, fmt), np.uint8).reshape(vocab, -1)
    ids = rng.integers(0, vocab, rows).astype(np.int32)
    pieces = [(ctx.upload(to_gpu_layout(raw[:6], fmt, (6, dim)), "p0"), 0, 6),
              (ctx.upload(to_gpu_layout(raw[6:], fmt, (7, dim)), "p1"), 6, 7)]
    out = ctx.buffer(4 * rows * dim, "out")
    emb = Embedding(ctx, out, ctx.upload(ids, "ids"), pieces, rows, dim, fmt)
    enc = ctx.encoder()
    emb.encode_forward(enc)
    enc.submit()
    want = dequantize(raw.tobytes(), fmt, (vocab, dim)).reshape(vocab, dim)[ids]
    np.testing.assert_array_equal(ctx.read(out, count=rows * dim).reshape(rows, dim), want)


def test_embedding_scale_multiplies_each_value_in_f32(gpu_device):
    """Gemma's sqrt(hidden) scale: table[ids] * f32(scale), as torch multiplies (one f32 rounding)."""
    ctx = gpu_device
    rng = np.random.default_rng(3)
    table = rng.standard_normal((10, 19)).astype(np.float32)
    ids = rng.integers(0, 10, 6).astype(np.int32)
    scale = np.float32(19 ** 0.5)
    out = ctx.buffer(4 * 6 * 19, "out")
    emb = Embedding(ctx, out, ctx.upload(ids, "ids"), [(ctx.upload(table, "t"), 0, 10)], 6, 19, scale=float(scale))
    enc = ctx.encoder()
    emb.encode_forward(enc)
    enc.submit()
    np.testing.assert_array_equal(ctx.read(out, count=6 * 19).reshape(6, 19), table[ids] * scale)
