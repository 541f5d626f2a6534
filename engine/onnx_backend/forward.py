"""Forward ops of the decoder as ONNX nodes. Each `<op>_forward` returns its output and what its twin in
backward.py needs (llm.c style: the same op names forwards and backwards).

Activations are 2-D [N, C] (N = B·T) for every linear layer, 4-D only inside attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.onnx_backend.graph import Graph


@dataclass(frozen=True)
class LinearGroup:
    """Projections that read the same input (q/k/v, gate/up, o, down) as one concatenated frozen weight.

    One GEMM over the concatenated weight (and one backward GEMM) is faster than several thin ones.
    """
    weight: str                     # frozen [sum(outs), in] initializer
    bias: str | None                # frozen [sum(outs)] initializer (Qwen2 q/k/v)
    targets: tuple[str, ...]        # e.g. ("q_proj", "k_proj", "v_proj")
    outs: tuple[int, ...]           # out features per target
    lora: tuple[tuple[str, str, str, str] | None, ...]   # per target: (A input, B input, dA out, dB out) or None
    scaling: float
    rank: int
    dropout: float = 0.0            # LoRA dropout on the branch input (train graph only)
    dropout_masks: tuple[str, ...] = ()   # per LoRA member: graph output name for its scaled mask, or ()
    seed: int = 0                   # first Dropout seed of this group (one distinct seed per member)


@dataclass
class LinearSaved:
    x: str                          # input [N, in]
    x_drop: list[str] | None = None  # per LoRA member: dropout(x) [N, in] (PEFT: one dropout per module)
    keep: list[str] | None = None   # per LoRA member: mask / (1 − p) [N, in]
    u: str | None = None            # s·(x A_catᵀ) [N, R·m]: the LoRA activations of every member side by side
    a_cat: str | None = None        # LoRA A of the members, stacked [R·m, in]
    b_blk: str | None = None        # LoRA B block-diagonal [Σ outs, R·m] (zero rows for members without LoRA)


def _lora_members(group: LinearGroup) -> list[int]:
    return [i for i, spec in enumerate(group.lora) if spec is not None]


def lora_block_diagonal(g: Graph, group: LinearGroup) -> str:
    """B_1 … B_m placed block-diagonally: one [Σ outs, R·m] GEMM operand instead of m thin GEMMs."""
    members = _lora_members(group)
    width = group.rank * len(members)
    blocks = []
    for i, out_f in enumerate(group.outs):
        if group.lora[i] is None:
            blocks.append(g.const(np.zeros((out_f, width), np.float32), np.float32))
            continue
        j = members.index(i)
        b = group.lora[i][1]
        if len(members) > 1:
            b = g.op("Pad", b, g.const([0, j * group.rank, 0, (len(members) - 1 - j) * group.rank]))
        blocks.append(b)
    return g.concat(blocks, axis=0)


def lora_dropout_forward(g: Graph, x: str, group: LinearGroup, saved: LinearSaved) -> None:
    """One Dropout per LoRA member, as PEFT has one per module. Each node gets its own seed; onnxruntime
    advances a node's generator on every run, so masks differ from step to step yet repeat for a seed."""
    ratio, training = g.scalar(group.dropout), g.const(np.array(True), np.bool_)
    saved.x_drop, saved.keep = [], []
    for j, _ in enumerate(_lora_members(group)):
        xd, mask = g.op("Dropout", x, ratio, training, outputs=2, seed=group.seed + j, hint="lora_drop")
        keep = g.op("Mul", g.op("Cast", mask, to=1), g.scalar(1.0 / (1.0 - group.dropout)))
        if group.dropout_masks:
            g.output(keep, group.dropout_masks[j], shape=None)
        saved.x_drop.append(xd)
        saved.keep.append(keep)


def linear_forward(g: Graph, x: str, group: LinearGroup) -> tuple[str, LinearSaved]:
    """[y_1 … y_m] = x W_catᵀ (+ b) + s·(x A_catᵀ) B_blkᵀ, as [N, Σ outs].

    The LoRA part is computed first (it is small) and accumulated by the big GEMM itself (Gemm's C input).
    """
    saved = LinearSaved(x=x)
    members = _lora_members(group)
    if not members:
        args = [x, group.weight] + ([group.bias] if group.bias else [])
        return g.op("Gemm", *args, transB=1, hint="lin"), saved
    saved.a_cat = g.concat([group.lora[i][0] for i in members], axis=0)
    if group.dropout > 0:
        lora_dropout_forward(g, x, group, saved)
        saved.u = g.concat([g.op("Gemm", xd, group.lora[i][0], transB=1, alpha=group.scaling, hint="lora_u")
                            for i, xd in zip(members, saved.x_drop)], axis=1)
    else:
        saved.u = g.op("Gemm", x, saved.a_cat, transB=1, alpha=group.scaling, hint="lora_u")
    saved.b_blk = lora_block_diagonal(g, group)
    lora = g.op("Gemm", saved.u, saved.b_blk, *([group.bias] if group.bias else []), transB=1, hint="lora_y")
    return g.op("Gemm", x, group.weight, lora, transB=1, beta=1.0, hint="lin"), saved


def rmsnorm_forward(g: Graph, x: str, weight: str, eps: float, axis: int = -1) -> tuple[str, tuple[str, str]]:
    """y = x / sqrt(mean(x²) + eps) · w; saves (x·rstd, rstd).

    A row whose mean square overflowed to inf would get rstd = 1/sqrt(inf) = 0: every later layer would see
    zeros and the loss would settle, finite, at ln(vocab), hiding the divergence from the non-finite guard.
    Such a row gets rstd NaN instead (a NaN mean square gives NaN by itself), so the loss is NaN and the step
    is skipped. The test runs on the [N, 1] mean squares only, so it costs nothing next to the norm.
    """
    ms = g.reduce_mean(g.op("Mul", x, x), [axis])
    rstd = g.op("Reciprocal", g.op("Sqrt", g.op("Add", ms, g.scalar(eps))))
    rstd = g.op("Where", g.op("IsInf", ms), g.scalar(float("nan")), rstd)
    xn = g.op("Mul", x, rstd)
    return g.op("Mul", xn, weight), (xn, rstd)


def rope_tables(inv_freq: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [T, 1, HD] as HF builds them (angles in float32, halves duplicated)."""
    t = np.arange(seq_len, dtype=np.float32)
    angles = np.outer(t, inv_freq).astype(np.float32)
    emb = np.concatenate([angles, angles], axis=-1)
    return np.cos(emb)[:, None, :].astype(np.float32), np.sin(emb)[:, None, :].astype(np.float32)


def rotate_half_matrix(head_dim: int) -> np.ndarray:
    """R with x @ R = rotate_half(x) = [-x2, x1]: one small MatMul instead of split, negate and concat."""
    h = head_dim // 2
    r = np.zeros((head_dim, head_dim), np.float32)
    r[np.arange(h) + h, np.arange(h)] = -1.0
    r[np.arange(h), np.arange(h) + h] = 1.0
    return r


def rope_forward(g: Graph, x: str, cos: str, sin: str, rot: str) -> str:
    """x·cos + rotate_half(x)·sin on [B, T, heads, HD]."""
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", g.op("MatMul", x, rot), sin))


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def heads_to_groups(g: Graph, x: str, s: AttentionShape) -> str:
    """[B, T, NH, HD] -> [B, NKV, G·T, HD]: query heads sharing a KV head stacked along rows (no K/V repeat)."""
    x = g.reshape(x, [s.batch, s.seq, s.kv_heads, s.group, s.head_dim])
    x = g.transpose(x, (0, 2, 3, 1, 4))
    return g.reshape(x, [s.batch, s.kv_heads, s.group * s.seq, s.head_dim])


def groups_to_rows(g: Graph, x: str, s: AttentionShape) -> str:
    """[B, NKV, G·T, HD] -> [B·T, NH·HD], the inverse of heads_to_groups followed by flattening."""
    x = g.reshape(x, [s.batch, s.kv_heads, s.group, s.seq, s.head_dim])
    x = g.transpose(x, (0, 3, 1, 2, 4))
    return g.reshape(x, [s.batch * s.seq, s.heads * s.head_dim])


def causal_mask(s: AttentionShape) -> np.ndarray:
    """Additive mask [G·T, T]: row r is query position r mod T."""
    q = np.tile(np.arange(s.seq), s.group)[:, None]
    k = np.arange(s.seq)[None, :]
    return np.where(k <= q, 0.0, -np.inf).astype(np.float32)


@dataclass
class AttentionSaved:
    q: str          # [B, NKV, G·T, HD], already scaled by 1/sqrt(HD)
    k: str          # [B, NKV, T, HD]
    v: str          # [B, NKV, T, HD]
    p: str          # [B, NKV, G·T, T] softmax
    o: str          # [B, NKV, G·T, HD]


def attention_forward(g: Graph, q: str, k: str, v: str, mask: str, s: AttentionShape) -> tuple[str, AttentionSaved]:
    """Causal softmax attention; q [B, T, NH, HD], k/v [B, T, NKV, HD] -> [B·T, NH·HD]."""
    qg = g.op("Mul", heads_to_groups(g, q, s), g.scalar(1.0 / np.sqrt(s.head_dim)))
    kh = g.transpose(k, (0, 2, 1, 3))
    vh = g.transpose(v, (0, 2, 1, 3))
    scores = g.op("Add", g.op("MatMul", qg, g.transpose(kh, (0, 1, 3, 2))), mask)
    p = g.op("Softmax", scores, axis=-1)
    o = g.op("MatMul", p, vh)
    return groups_to_rows(g, o, s), AttentionSaved(q=qg, k=kh, v=vh, p=p, o=o)


def swiglu_forward(g: Graph, gate: str, up: str) -> tuple[str, tuple[str, str]]:
    """silu(gate)·up; saves (sigmoid(gate), silu(gate))."""
    sig = g.op("Sigmoid", gate)
    silu = g.op("Mul", gate, sig)
    return g.op("Mul", silu, up), (sig, silu)


def cross_entropy_forward(g: Graph, logits: str, targets: str, mask: str) -> tuple[str, tuple[str, str]]:
    """Sum over rows of mask·(−log softmax(logits)[target]); logits [N, V], targets int64 [N, 1], mask [N, 1].

    Saves the log-softmax (the backward pass exponentiates it) and the picked log-probabilities.
    """
    logp = g.op("LogSoftmax", logits, axis=1)
    picked = g.op("GatherElements", logp, targets, axis=1)
    loss_sum = g.reduce_sum(g.op("Mul", g.op("Neg", picked), mask), [0, 1], keepdims=0)
    return loss_sum, (logp, picked)
