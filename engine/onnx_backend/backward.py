"""Hand-written backward ops, twins of forward.py. Only what the LoRA gradients need: frozen weights get no
gradient, but the gradient flows through every frozen layer to the LoRA tensors below it."""
from __future__ import annotations

from engine.onnx_backend.forward import (AttentionSaved, AttentionShape, LinearGroup, LinearSaved,
                                         groups_to_rows, heads_to_groups, rotate_half)
from engine.onnx_backend.graph import Graph


def linear_backward(g: Graph, dys: list[str], saved: LinearSaved, group: LinearGroup,
                    need_dx: bool = True) -> str | None:
    """LoRA gradients of each member (emitted as graph outputs) and dx = Σ_m dy_m W_m + s·(dy_m B_m) A_m."""
    lora_members = [i for i, spec in enumerate(group.lora) if spec is not None]
    dx = g.op("MatMul", g.concat(dys, axis=1), group.weight, hint="dx") if need_dx else None
    if not lora_members:
        return dx
    dus = []
    for i in lora_members:
        a_in, b_in, da_out, db_out = group.lora[i]
        g.output(g.op("Gemm", dys[i], saved.u[i], transA=1, hint="dB"), db_out, shape=None)
        dus.append(g.op("MatMul", dys[i], b_in, hint="dU"))      # [N, r], gradient w.r.t. u / s
    du_cat = g.concat(dus, axis=1)
    da_cat = g.op("Gemm", du_cat, saved.x, transA=1, alpha=group.scaling, hint="dA")
    for i, da in zip(lora_members, g.split(da_cat, [group.rank] * len(lora_members), axis=0)):
        g.output(da, group.lora[i][2], shape=None)
    if need_dx:
        dx = g.op("Gemm", du_cat, saved.a_cat, dx, alpha=group.scaling, beta=1.0, hint="dx")
    return dx


def rmsnorm_backward(g: Graph, dy: str, saved: tuple[str, str], weight: str, axis: int = -1) -> str:
    """dx = rstd·(dy·w − xn·mean(dy·w·xn))."""
    xn, rstd = saved
    gw = g.op("Mul", dy, weight)
    proj = g.reduce_mean(g.op("Mul", gw, xn), [axis])
    return g.op("Mul", g.op("Sub", gw, g.op("Mul", xn, proj)), rstd)


def rope_backward(g: Graph, dy: str, cos: str, sin: str, head_dim: int) -> str:
    """The transpose of a rotation: dy·cos − rotate_half(dy)·sin."""
    return g.op("Sub", g.op("Mul", dy, cos), g.op("Mul", rotate_half(g, dy, head_dim), sin))


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


def swiglu_backward(g: Graph, da: str, gate: str, up: str, sig: str) -> tuple[str, str]:
    """d(gate), d(up) of silu(gate)·up, with silu'(x) = σ(x)·(1 + x·(1 − σ(x)))."""
    silu = g.op("Mul", gate, sig)
    dup = g.op("Mul", da, silu)
    one = g.scalar(1.0)
    dsilu = g.op("Mul", sig, g.op("Add", one, g.op("Mul", gate, g.op("Sub", one, sig))))
    return g.op("Mul", g.op("Mul", da, up), dsilu), dup


def lm_head_cross_entropy_backward(g: Graph, logp: str, lm_weight: str, targets_flat: str, mask: str) -> str:
    """d(final hidden) of the summed CE: (softmax − onehot(target))·W, masked per row.

    The one-hot part is a gather of W's target rows, so the [N, V] gradient is never materialised twice.
    """
    probs = g.op("Exp", logp)
    dh = g.op("Sub", g.op("MatMul", probs, lm_weight, hint="dlm"), g.op("Gather", lm_weight, targets_flat, axis=0))
    return g.op("Mul", dh, mask)
