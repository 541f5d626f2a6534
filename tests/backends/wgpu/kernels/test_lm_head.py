"""Chunked LM head + cross-entropy against torch: loss, d(hidden), −100 masking, chunks and vocabulary pieces."""
import numpy as np
import pytest

from engine.backends.base import shift_labels as shift_targets
from engine.backends.wgpu.kernels.lm_head import LmHead, chunk_rows

pytestmark = pytest.mark.gpu


def build(ctx, hidden, w, targets, chunk, splits, row_weight=None, softcap=None):
    rows, dim = hidden.shape
    vocab = w.shape[0]
    pieces, v0 = [], 0
    for n in splits:
        pieces.append((ctx.upload(w[v0:v0 + n], f"w{v0}"), v0, n))
        v0 += n
    bufs = dict(dh=ctx.buffer(4 * rows * dim, "dh"), row_loss=ctx.buffer(4 * rows, "row_loss"),
                logits=ctx.buffer(4 * chunk * vocab, "logits"), stats=ctx.buffer(64, "stats"))
    weight = np.ones(rows, np.float32) if row_weight is None else row_weight
    head = LmHead(ctx, bufs["dh"], bufs["row_loss"], bufs["logits"], bufs["stats"], ctx.upload(hidden, "h"),
                  ctx.upload(targets.reshape(-1), "targets"), ctx.upload(weight, "row_weight"), pieces, rows, dim,
                  vocab, chunk, softcap=softcap)
    return head, bufs


@pytest.mark.parametrize("B,T,dim,splits,chunk", [(1, 1, 8, [70], 1), (2, 5, 24, [300, 84], 3),
                                                   (3, 4, 33, [129], 12)])
def test_chunked_cross_entropy_loss_and_hidden_grad(gpu_device, B, T, dim, splits, chunk):
    import torch
    ctx = gpu_device
    rng = np.random.default_rng(B * T + dim)
    vocab = sum(splits)
    hidden = rng.standard_normal((B * T, dim)).astype(np.float32)
    w = rng.standard_normal((vocab, dim)).astype(np.float32) * 0.3
    labels = rng.integers(0, vocab, (B, T)).astype(np.int32)
    labels[rng.random((B, T)) < 0.3] = -100
    targets = shift_targets(labels)
    counted = int((targets != -100).sum())
    head, bufs = build(ctx, hidden, w, targets, chunk, splits)
    head.set_step(counted, with_grad=True)
    enc = ctx.encoder()
    head.encode(enc, backward=True)
    head.encode_reduce(enc)
    enc.submit()
    stats = ctx.read(bufs["stats"])
    ht = torch.from_numpy(hidden).double().requires_grad_()
    logits = ht @ torch.from_numpy(w).double().T
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(targets.reshape(-1)).long(),
                                             ignore_index=-100, reduction="sum") / max(counted, 1)
    loss.backward()
    assert stats[5] == counted
    np.testing.assert_allclose(stats[0], loss.item() if counted else 0.0, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ctx.read(bufs["dh"], count=hidden.size).reshape(hidden.shape), ht.grad.numpy(),
                               rtol=1e-4, atol=1e-6)
    assert not ctx.read(bufs["row_loss"]).any(), "loss_reduce leaves row_loss zeroed for the next step"


def test_row_weights_scale_each_rows_gradient_not_the_loss(gpu_device):
    """The preference objectives' backward: d(Σ_r w_r·CE_r)/d(hidden), weights of either sign; the loss stays the
    unweighted CE so a supervised step reads the same."""
    import torch
    ctx = gpu_device
    rng = np.random.default_rng(11)
    hidden = rng.standard_normal((10, 20)).astype(np.float32)
    w = rng.standard_normal((97, 20)).astype(np.float32) * 0.3
    labels = rng.integers(0, 97, (2, 5)).astype(np.int32)
    labels[0, 2] = -100
    targets = shift_targets(labels)
    weight = rng.uniform(-2.0, 2.0, 10).astype(np.float32)
    head, bufs = build(ctx, hidden, w, targets, 4, [60, 37], row_weight=weight)
    head.set_step(1, with_grad=True)
    enc = ctx.encoder()
    head.encode(enc, backward=True)
    head.encode_reduce(enc)
    enc.submit()
    ht = torch.from_numpy(hidden).double().requires_grad_()
    per_row = torch.nn.functional.cross_entropy(ht @ torch.from_numpy(w).double().T,
                                                torch.from_numpy(targets.reshape(-1)).long(), ignore_index=-100,
                                                reduction="none")
    (per_row * torch.from_numpy(weight).double()).sum().backward()
    np.testing.assert_allclose(ctx.read(bufs["stats"])[0], per_row.sum().item(), rtol=1e-5)
    np.testing.assert_allclose(ctx.read(bufs["dh"], count=hidden.size).reshape(hidden.shape), ht.grad.numpy(),
                               rtol=1e-4, atol=1e-6)


def test_eval_mode_sums_loss_and_keeps_logits(gpu_device):
    import torch
    ctx = gpu_device
    rng = np.random.default_rng(5)
    hidden = rng.standard_normal((6, 16)).astype(np.float32)
    w = rng.standard_normal((50, 16)).astype(np.float32)
    targets = shift_targets(rng.integers(0, 50, (2, 3)))
    head, bufs = build(ctx, hidden, w, targets, 6, [50])
    head.set_step(4, with_grad=False)
    enc = ctx.encoder()
    head.encode(enc, backward=False)
    head.encode_reduce(enc)
    enc.submit()
    logits = hidden.astype(np.float64) @ w.T
    want = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets.reshape(-1)).long(),
                                             ignore_index=-100, reduction="sum").item()
    np.testing.assert_allclose(ctx.read(bufs["stats"])[0], want, rtol=1e-5)
    np.testing.assert_allclose(ctx.read(bufs["logits"], count=300).reshape(6, 50), logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("splits,chunk", [([61], 7), ([40, 33], 3)])
def test_soft_capped_logits_loss_and_hidden_grad(gpu_device, splits, chunk):
    """Gemma 2's final-logit soft-capping: loss and d(hidden) of CE(cap·tanh(z / cap)), and the capped logits read
    back, on logits large enough that the cap bends them."""
    import torch
    ctx = gpu_device
    rng = np.random.default_rng(len(splits))
    vocab, cap = sum(splits), 4.0
    hidden = rng.standard_normal((7, 19)).astype(np.float32)
    w = rng.standard_normal((vocab, 19)).astype(np.float32)          # logits around ±4: tanh far from linear
    labels = rng.integers(0, vocab, (1, 7)).astype(np.int32)
    labels[0, 3] = -100
    targets = shift_targets(labels)
    counted = int((targets != -100).sum())
    head, bufs = build(ctx, hidden, w, targets, chunk, splits, softcap=cap)
    head.set_step(counted, with_grad=True)
    enc = ctx.encoder()
    head.encode(enc, backward=True)
    head.encode_reduce(enc)
    enc.submit()
    ht = torch.from_numpy(hidden).double().requires_grad_()
    capped = cap * torch.tanh(ht @ torch.from_numpy(w).double().T / cap)
    loss = torch.nn.functional.cross_entropy(capped, torch.from_numpy(targets.reshape(-1)).long(),
                                             ignore_index=-100, reduction="sum") / counted
    loss.backward()
    np.testing.assert_allclose(ctx.read(bufs["stats"])[0], loss.item(), rtol=1e-5)
    np.testing.assert_allclose(ctx.read(bufs["dh"], count=hidden.size).reshape(hidden.shape), ht.grad.numpy(),
                               rtol=1e-4, atol=1e-6)
    enc = ctx.encoder()
    head.encode_logits(enc, 0)
    enc.submit()
    n = min(chunk, 7)
    np.testing.assert_allclose(ctx.read(bufs["logits"], count=n * vocab).reshape(n, vocab),
                               capped[:n].detach().numpy(), rtol=1e-5, atol=1e-5)
    plain = torch.nn.functional.cross_entropy(ht.detach() @ torch.from_numpy(w).double().T,
                                              torch.from_numpy(targets.reshape(-1)).long(), ignore_index=-100,
                                              reduction="sum") / counted
    assert abs(plain.item() - loss.item()) > 0.1


def test_chunk_rows_respects_budget_and_binding():
    assert chunk_rows(10, 100, 1 << 30) == 10
    assert chunk_rows(100_000, 49152, 128 << 20, budget_bytes=64 << 20) == (64 << 20) // (4 * 49152)
    assert chunk_rows(100_000, 1000, 1 << 20) == (1 << 20) // 4000
    with pytest.raises(MemoryError, match="binding limit"):
        chunk_rows(4, 1 << 20, 1 << 20)
