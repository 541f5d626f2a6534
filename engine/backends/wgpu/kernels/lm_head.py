"""Python twin of shaders/lm_head.wgsl: the LM head with a chunked softmax cross-entropy.

For each chunk of rows, logits[chunk, vocab] = hidden·Wᵀ is computed piece by piece of the (possibly split)
vocabulary, the cross-entropy kernel adds the rows' losses and, in training, turns the chunk into dlogits in
place, and d(hidden) += dlogits·W goes back piece by piece. Only one chunk of logits ever exists.
With `softcap` (Gemma 2's final_logit_softcapping) the loss and its gradient read cap·tanh(z / cap) of each logit.
"""
from __future__ import annotations

import numpy as np

from engine.backends.wgpu.context import GpuContext, StepEncoder
from engine.backends.wgpu.uniforms import uniform_struct, upload_uniform
from engine.model.weight_formats import WeightFormat
from engine.backends.wgpu.kernels.linear import GemmShape, Matmul
from engine.backends.wgpu.kernels.linear_f16 import MatmulF16, f16_math_ok

# The logits chunk: its rows are the M of both LM-head products, so it must hold a few hundred rows even for a
# 150k-262k vocabulary (at 64 MiB, Qwen3's 151936 left 110 rows: products of 110 rows ran at half the GEMM's speed
# and the LM head took 26% of a B=8 step, bench/results/step_profile-h200-trusted.jsonl); small next to the
# activations of the models it serves (441 rows for Qwen3, 1365 for SmolLM2's 49152, 256 for Gemma 3's 262144).
LOGITS_BUDGET_BYTES = 256 << 20


def chunk_rows(rows: int, vocab: int, max_binding_bytes: int, budget_bytes: int = LOGITS_BUDGET_BYTES,
               max_workgroups: int = 65535) -> int:
    """Rows per logits chunk: as many as fit the budget and one binding (and one dispatch: a workgroup per
    row), at least 1, at most `rows`."""
    fit = min(budget_bytes, max_binding_bytes) // (4 * vocab)
    if fit < 1:
        raise MemoryError(f"one row of {vocab} logits ({4 * vocab} bytes) exceeds the binding limit "
                          f"{max_binding_bytes}")
    return max(1, min(rows, fit, max_workgroups))


class LmHead:
    """hidden [rows, C] → chunked logits [chunk, V] → row_loss [rows] and, when training, dhidden [rows, C].

    pieces: [(W buffer [piece_rows, C], first_id, piece_rows)] covering the vocabulary in order.
    stats: the step's f32[16]; loss_reduce writes stats[0] (loss) and stats[5] (counted tokens).
    row_weight: f32 [rows], each row's gradient weight (1 for SFT; see shaders/lm_head.wgsl).
    partials: optional split-K scratch (engine.backends.wgpu.kernels.linear.SPLIT_PARTIAL_FLOATS floats).
    math "f16": logits and d(hidden) multiplied in half precision (kernels.linear_f16, `row_scale` its [rows]
    scratch) where f16_math_ok(fmt, abs_max) allows (abs_max: max |w| of the vocabulary table); `self.math`
    says which arithmetic runs.
    """

    def __init__(self, ctx: GpuContext, dhidden, row_loss, logits, stats, hidden, targets, row_weight, pieces: list,
                 rows: int, dim: int, vocab: int, chunk: int, partials=None, label: str = "lm_head",
                 fmt: WeightFormat = WeightFormat.F32, math: str = "f32", row_scale=None,
                 abs_max: float | None = None, softcap: float | None = None):
        if softcap is not None and not softcap > 0:
            raise ValueError(f"the LM head's logit soft cap must be positive, got {softcap}")
        self.ctx, self.rows, self.vocab, self.chunk = ctx, rows, vocab, chunk
        self.math = "f16" if math == "f16" and f16_math_ok(fmt, abs_max) else "f32"

        def product(ctx, c, a, b, shape, **kw):   # the GEMM of one product, in the head's arithmetic
            if self.math == "f16":
                return MatmulF16(ctx, c, a, b, shape, row_scale, **kw)
            return Matmul(ctx, c, a, b, shape, **kw)

        self.step = upload_uniform(ctx, "lm_head", "Step", f"{label}.step", inv_count=1.0, count=0.0, write_grad=0)
        constants = {"SOFTCAP": softcap} if softcap else None      # none: the plain pipelines
        self.ce = ctx.pipeline("lm_head", "cross_entropy_forward", constants)
        self.reduce = ctx.pipeline("lm_head", "loss_reduce")
        self.cap = ctx.pipeline("lm_head", "soft_cap_logits", constants) if softcap else None
        self.cap_groups = []   # per chunk, with softcap: the read-back's capping bind group
        self.chunks = []   # per chunk: (rows in it, forward matmuls, CE bind group, backward matmuls)
        for c, r0 in enumerate(range(0, rows, chunk)):
            n = min(chunk, rows - r0)
            fwd, bwd = [], []
            for p, (w, v0, vp) in enumerate(pieces):
                shape = GemmShape(n, vp, dim, trans_b=True, ldc=vocab, c_off=v0, a_off=r0 * dim)
                fwd.append(product(ctx, logits, hidden, w, shape, label=f"{label}.{c}.{p}.fwd", b_format=fmt))
                if dhidden is not None:
                    # [n, C] from K = a whole vocabulary piece: few tiles, long K, so split given partials.
                    bwd.append(product(ctx, dhidden, logits, w, GemmShape(n, dim, vp, lda=vocab, a_off=v0,
                                                                         c_off=r0 * dim),
                                      beta=1.0 if p else 0.0, partials=partials, label=f"{label}.{c}.{p}.bwd",
                                      b_format=fmt))
            geometry = upload_uniform(ctx, "lm_head", "Chunk", f"{label}.{c}.chunk", rows=n, vocab=vocab, row0=r0,
                                      n_total=rows)
            ce_bg = ctx.bind_group(self.ce, {0: logits, 1: row_loss, 2: targets, 3: geometry, 4: self.step,
                                             6: row_weight}, f"{label}.{c}")
            self.chunks.append((n, fwd, ce_bg, bwd))
            if softcap:
                self.cap_groups.append(ctx.bind_group(self.cap, {0: logits, 3: geometry}, f"{label}.{c}.cap"))
        reduce_geometry = upload_uniform(ctx, "lm_head", "Chunk", f"{label}.reduce", rows=0, vocab=vocab, row0=0,
                                         n_total=rows)
        self.reduce_bg = ctx.bind_group(self.reduce, {1: row_loss, 3: reduce_geometry, 4: self.step, 5: stats},
                              f"{label}.reduce")

    def set_step(self, counted: int, with_grad: bool, weighted: bool = False) -> None:
        """Per-step constants, written before the step is submitted: 1/counted scales loss and gradient
        (with_grad False, or `weighted` where row_weight carries the whole scale: inv_count 1, so stats[0]
        receives the summed loss)."""
        inv = 1.0 / max(counted, 1) if with_grad and not weighted else 1.0
        raw = uniform_struct("lm_head", "Step").pack(inv_count=inv, count=float(counted), write_grad=int(with_grad))
        self.ctx.write(self.step, np.frombuffer(raw, np.uint8))

    def encode_logits(self, enc: StepEncoder, c: int) -> None:
        """Only the logits of chunk c (rows c·chunk ...), soft-capped where the model caps them, for reading back."""
        for mm in self.chunks[c][1]:
            mm.encode(enc)
        if self.cap is not None:
            enc.dispatch(self.cap, self.cap_groups[c], self.chunks[c][0])

    def encode(self, enc: StepEncoder, backward: bool) -> None:
        """Loss of every row (added into row_loss) and, with backward, dhidden."""
        for n, fwd, ce_bg, bwd in self.chunks:
            for mm in fwd:
                mm.encode(enc)
            enc.dispatch(self.ce, ce_bg, n)
            if backward:
                for mm in bwd:
                    mm.encode(enc)

    def encode_reduce(self, enc: StepEncoder) -> None:
        enc.dispatch(self.reduce, self.reduce_bg, 1)
