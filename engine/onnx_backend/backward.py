"""Hand-written backward ops, twins of forward.py. Only what the LoRA gradients need: frozen weights get no
gradient, but the gradient flows through every frozen layer to the LoRA tensors below it."""
from __future__ import annotations

import numpy as np

from engine.onnx_backend.forward import (AttentionSaved, AttentionShape, LinearGroup, LinearSaved,
                                         groups_to_rows, heads_to_groups)
from engine.onnx_backend.graph import Graph


def linear_backward(g: Graph, dy: str, saved: LinearSaved, group: LinearGroup,
                    need_dx: bool = True) -> str | None:
    """LoRA gradients of every member (emitted as graph outputs) and dx = dy W_cat + s·(dy B_blk) A_cat, from
    dy [N, Σ outs]. dB comes from one GEMM over all members (dyᵀ u) whose diagonal blocks are the dB_m."""
    members = [i for i, spec in enumerate(group.lora) if spec is not None]
    if not members:
        return g.op("MatMul", dy, group.weight, hint="dx") if need_dx else None
    du = g.op("MatMul", dy, saved.b_blk, hint="dU")                    # [N, R·m], gradient w.r.t. u / s
    if saved.x_drop is None:
        da_cat = g.op("Gemm", du, saved.x, transA=1, alpha=group.scaling, hint="dA")
        das = g.split(da_cat, [group.rank] * len(members), axis=0)
    else:   # each member saw its own dropped-out input
        dus = g.split(du, [group.rank] * len(members), axis=1)
        das = [g.op("Gemm", d, xd, transA=1, alpha=group.scaling, hint="dA") for d, xd in zip(dus, saved.x_drop)]
    for i, da in zip(members, das):
        g.output(da, group.lora[i][2], shape=None)
    db_all = g.op("Gemm", dy, saved.u, transA=1, hint="dB")            # [Σ outs, R·m]
    starts = np.cumsum((0,) + group.outs)
    for j, i in enumerate(members):
        if len(group.outs) == 1:
            db = db_all
        else:
            db = g.op("Slice", db_all, g.const([starts[i], j * group.rank]),
                      g.const([starts[i + 1], (j + 1) * group.rank]), g.const([0, 1]))
        g.output(db, group.lora[i][3], shape=None)
    if not need_dx:
        return None
    if saved.x_drop is None:
        dx_lora = g.op("Gemm", du, saved.a_cat, alpha=group.scaling, hint="dx_lora")
    else:
        dx_lora = None
        for d, i, keep in zip(dus, members, saved.keep):
            dx_lora = g.add(dx_lora, g.op("Mul", g.op("Gemm", d, group.lora[i][0], alpha=group.scaling), keep))
    return g.op("Gemm", dy, group.weight, dx_lora, beta=1.0, hint="dx")


def rmsnorm_backward(g: Graph, dy: str, saved: tuple[str, str], weight: str, axis: int = -1) -> str:
    """dx = rstd·(dy·w − xn·mean(dy·w·xn))."""
    xn, rstd = saved
    gw = g.op("Mul", dy, weight)
    proj = g.reduce_mean(g.op("Mul", gw, xn), [axis])
    return g.op("Mul", g.op("Sub", gw, g.op("Mul", xn, proj)), rstd)


def rope_backward(g: Graph, dy: str, cos: str, sin: str, rot: str) -> str:
    """The transpose of a rotation: dy·cos − rotate_half(dy)·sin (R is antisymmetric: Rᵀ = −R)."""
    return g.op("Sub", g.op("Mul", dy, cos), g.op("Mul", g.op("MatMul", dy, rot), sin))


def attention_backward(g: Graph, dout: str, saved: AttentionSaved, s: AttentionShape) -> tuple[str, str, str]:
    """dq [B, T, NH, HD], dk and dv [B, T, NKV, HD] from d(output) [B·T, NH·HD]."""
    do = heads_to_groups(g, g.reshape(dout, [s.batch, s.seq, s.heads, s.head_dim]), s)     # [B, NKV, G·T, HD]
    dv = g.op("MatMul", g.transpose(saved.p, (0, 1, 3, 2)), do)                             # [B, NKV, T, HD]
    dp = g.op("MatMul", do, g.transpose(saved.v, (0, 1, 3, 2)))                             # [B, NKV, G·T, T]
    # Softmax backward: dS = P·(dP − Σ_j dP·P) and Σ_j dP_j·P_j = Σ_d dO_d·O_d (cheaper: HD instead of T).
    delta = g.reduce_sum(g.op("Mul", do, saved.o), [3])
    ds = g.op("Mul", saved.p, g.op("Sub", dp, delta))
    dq = g.op("Mul", g.op("MatMul", ds, saved.k), g.scalar(1.0 / s.head_dim ** 0.5))      # [B, NKV, G·T, HD]
    dk = g.op("MatMul", g.transpose(ds, (0, 1, 3, 2)), saved.q)                             # q is pre-scaled
    dq = g.reshape(groups_to_rows(g, dq, s), [s.batch, s.seq, s.heads, s.head_dim])
    return dq, g.transpose(dk, (0, 2, 1, 3)), g.transpose(dv, (0, 2, 1, 3))


def swiglu_backward(g: Graph, da: str, up: str, saved: tuple[str, str]) -> tuple[str, str]:
    """d(gate), d(up) of silu(gate)·up, with silu'(x) = σ(x)·(1 + x·(1 − σ(x))) = σ + silu − silu·σ."""
    sig, silu = saved
    dsilu = g.op("Add", sig, g.op("Sub", silu, g.op("Mul", silu, sig)))
    return g.op("Mul", g.op("Mul", da, up), dsilu), g.op("Mul", da, silu)


def lm_head_cross_entropy_backward(g: Graph, logp: str, lm_weight: str, targets_flat: str, mask: str) -> str:
    """d(final hidden) of the summed CE: (softmax − onehot(target))·W, masked per row.

    The one-hot part is a gather of W's target rows, so the [N, V] gradient is never materialised twice.
    """
    probs = g.op("Exp", logp)
    dh = g.op("Sub", g.op("MatMul", probs, lm_weight, hint="dlm"), g.op("Gather", lm_weight, targets_flat, axis=0))
    return g.op("Mul", dh, mask)
