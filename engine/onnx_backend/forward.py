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


@dataclass
class LinearSaved:
    x: str                          # input [N, in]
    u: dict[int, str]               # member index -> scaled LoRA activation s·(x Aᵀ) [N, r]
    a_cat: str | None               # concatenated LoRA A [R·m, in]


def linear_forward(g: Graph, x: str, group: LinearGroup) -> tuple[list[str], LinearSaved]:
    """y_m = x W_mᵀ (+ b_m) + s·(x A_mᵀ) B_mᵀ for each member m."""
    args = [x, group.weight] + ([group.bias] if group.bias else [])
    y = g.op("Gemm", *args, transB=1, hint="lin")
    ys = g.split(y, group.outs, axis=1)
    lora_members = [i for i, spec in enumerate(group.lora) if spec is not None]
    saved = LinearSaved(x=x, u={}, a_cat=None)
    if lora_members:
        saved.a_cat = g.concat([group.lora[i][0] for i in lora_members], axis=0)
        u_cat = g.op("Gemm", x, saved.a_cat, transB=1, alpha=group.scaling, hint="lora_u")
        us = g.split(u_cat, [group.rank] * len(lora_members), axis=1)
        for i, u in zip(lora_members, us):
            saved.u[i] = u
            ys[i] = g.op("Gemm", u, group.lora[i][1], ys[i], transB=1, hint="lora_y")
    return ys, saved


def rmsnorm_forward(g: Graph, x: str, weight: str, eps: float, axis: int = -1) -> tuple[str, tuple[str, str]]:
    """y = x / sqrt(mean(x²) + eps) · w; saves (x·rstd, rstd)."""
    ms = g.reduce_mean(g.op("Mul", x, x), [axis])
    rstd = g.op("Reciprocal", g.op("Sqrt", g.op("Add", ms, g.scalar(eps))))
    xn = g.op("Mul", x, rstd)
    return g.op("Mul", xn, weight), (xn, rstd)


def rope_tables(inv_freq: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [T, 1, HD] as HF builds them (angles in float32, halves duplicated)."""
    t = np.arange(seq_len, dtype=np.float32)
    angles = np.outer(t, inv_freq).astype(np.float32)
    emb = np.concatenate([angles, angles], axis=-1)
    return np.cos(emb)[:, None, :].astype(np.float32), np.sin(emb)[:, None, :].astype(np.float32)


def rotate_half(g: Graph, x: str, head_dim: int) -> str:
    """[-x2, x1] along the last axis."""
    x1, x2 = g.split(x, [head_dim // 2, head_dim // 2], axis=-1)
    return g.concat([g.op("Neg", x2), x1], axis=-1)


def rope_forward(g: Graph, x: str, cos: str, sin: str, head_dim: int) -> str:
    """x·cos + rotate_half(x)·sin on [B, T, heads, HD]."""
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotate_half(g, x, head_dim), sin))


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


def swiglu_forward(g: Graph, gate: str, up: str) -> tuple[str, str]:
    """silu(gate)·up; saves sigmoid(gate)."""
    sig = g.op("Sigmoid", gate)
    return g.op("Mul", g.op("Mul", gate, sig), up), sig


def cross_entropy_forward(g: Graph, logits: str, targets: str, mask: str) -> tuple[str, tuple[str, str]]:
    """Sum over rows of mask·(−log softmax(logits)[target]); logits [N, V], targets int64 [N, 1], mask [N, 1].

    Saves the softmax and the target probability for the backward pass.
    """
    logp = g.op("LogSoftmax", logits, axis=1)
    picked = g.op("GatherElements", logp, targets, axis=1)
    loss_sum = g.reduce_sum(g.op("Mul", g.op("Neg", picked), mask), [0, 1], keepdims=0)
    return loss_sum, (logp, picked)
