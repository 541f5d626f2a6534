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
