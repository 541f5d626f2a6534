"""Hand-written backward ops, twins of forward.py. Only what the LoRA gradients need: frozen weights get no
gradient, but the gradient flows through every frozen layer to the LoRA tensors below it."""
from __future__ import annotations

from engine.backends.onnx.forward import (GELU_KAPPA, GELU_SQRT_2_OVER_PI, AttentionSaved, AttentionShape,
                                         LinearGroup, LinearSaved, Rope, rope_attributes,
                                         groups_to_rows, heads_to_groups)
from engine.backends.onnx.graph import Graph


def linear_backward(g: Graph, dys: list[str], saved: LinearSaved, group: LinearGroup,
                    need_dx: bool = True) -> str | None:
    """LoRA gradients of every member (emitted as graph outputs) and dx = Σ_j dy_j W_j + s·Σ_j (dy_j B_j) A'_j
    from the members' output gradients dy_j [N, out_j]."""
    members = [i for i, spec in enumerate(group.lora) if spec is not None]
    dx = None
    if group.fused is not None:
        dx = _fused_lora_backward(g, dys, saved, group, need_dx)
    if members:
        dus = [g.op("MatMul", dys[i], group.lora[i][1], hint="dU") for i in members]   # [N, R] each
        for i, u in zip(members, saved.u):
            # dB = (uᵀ dy)ᵀ: transposing the [N, R] u and then the [R, out] product is cheaper than transposing
            # the [N, out] dy (the 135M step: ~15 ms less, of 210 such products).
            dbt = g.op("Gemm", u, dys[i], transA=1, hint="dB")
            g.output(g.transpose(dbt, (1, 0)), group.lora[i][3], shape=None)
        scale = (lambda da: g.op("Mul", da, group.input_scale, hint="dA")) if group.input_scale else (lambda da: da)
        if saved.x_drop is None:                    # dA = dA'∘w (A' = A∘w), for all members at once
            du_cat = g.concat(dus, axis=1)
            das = g.split(scale(g.op("Gemm", du_cat, saved.x, transA=1, alpha=group.scaling, hint="dA")),
                          [group.rank] * len(members), axis=0)
        else:   # each member saw its own dropped-out input
            das = [scale(g.op("Gemm", d, xd, transA=1, alpha=group.scaling, hint="dA"))
                   for d, xd in zip(dus, saved.x_drop)]
        for i, da in zip(members, das):
            g.output(da, group.lora[i][2], shape=None)
        if need_dx:
            if saved.x_drop is None:
                dx = g.op("Gemm", du_cat, saved.a_cat, alpha=group.scaling, hint="dx_lora")
            else:
                for d, a, keep in zip(dus, saved.a, saved.keep):
                    dx = g.add(dx, g.op("Mul", g.op("Gemm", d, a, alpha=group.scaling, hint="dx_lora"), keep))
    if not need_dx:
        return None
    # One Sum (or Add) of the members' products rather than chaining them through Gemm's C input, which
    # onnxruntime copies into the output on one thread first (see linear_forward). Two terms take an Add: its
    # optimizer folds a Gemm feeding a two-input Sum back into a Gemm with C.
    terms = [g.op("Gemm", dy, weight, hint="dx") for dy, weight in zip(dys, group.weights)] + ([dx] if dx else [])
    if len(terms) == 1:
        return terms[0]
    return g.op("Add", *terms) if len(terms) == 2 else g.op("Sum", *terms)


def _fused_lora_backward(g: Graph, dys: list[str], saved: LinearSaved, group: LinearGroup,
                         need_dx: bool) -> str | None:
    """One LoRA over a fused projection (LinearGroup.fused): dy = [dy_1 | … | dy_m] [N, Σ out_j];
    dB = dyᵀ·u, du = dy·B, dA = s·duᵀ·drop(x) (∘ the folded norm weight), and its dx = s·du·A' (through the mask)."""
    _, b, da_name, db_name = group.fused
    dy = g.concat(dys, axis=1)
    u = saved.u[0]
    g.output(g.transpose(g.op("Gemm", u, dy, transA=1, hint="dB"), (1, 0)), db_name, shape=None)
    du = g.op("MatMul", dy, b, hint="dU")
    x = saved.x if saved.x_drop is None else saved.x_drop[0]
    da = g.op("Gemm", du, x, transA=1, alpha=group.scaling, hint="dA")
    g.output(g.op("Mul", da, group.input_scale, hint="dA") if group.input_scale else da, da_name, shape=None)
    if not need_dx:
        return None
    dx = g.op("Gemm", du, saved.a[0], alpha=group.scaling, hint="dx_lora")
    return dx if saved.keep is None else g.op("Mul", dx, saved.keep[0])


def normalized_rmsnorm_backward(g: Graph, dxn: str, saved: tuple[str, str], axis: int = -1) -> str:
    """dx from d(xn) for xn = x·rstd (no weight): rstd·(dxn − xn·mean(dxn·xn))."""
    xn, rstd = saved
    proj = g.reduce_mean(g.op("Mul", dxn, xn), [axis])
    return g.op("Mul", g.op("Sub", dxn, g.op("Mul", xn, proj)), rstd)


def rmsnorm_backward(g: Graph, dy: str, saved: tuple[str, str], weight: str, axis: int = -1) -> str:
    """dx = rstd·(dy·w − xn·mean(dy·w·xn))."""
    return normalized_rmsnorm_backward(g, g.op("Mul", dy, weight), saved, axis)


def rope_backward(g: Graph, dy: str, rope: Rope, heads: int) -> str:
    """The transpose of a rotation is the rotation by −angle: dy·cos − rotate_half(dy)·sin, on [B, T, heads·HD]."""
    return g.op("RotaryEmbedding", dy, rope.positions, rope.cos, rope.neg_sin, **rope_attributes(rope, heads),
                domain="com.microsoft", hint="rope_bw")


def attention_backward(g: Graph, dout: str, saved: AttentionSaved, s: AttentionShape) -> tuple[str, str, str]:
    """d(scaled q) [B, T, NH, HD], dk and dv [B, T, NKV, HD] from d(output) [B·T, NH·HD], query block by
    query block (the queries' rotation carries their 1/sqrt(HD), backwards too)."""
    do = heads_to_groups(g, g.reshape(dout, [s.batch, s.seq, s.heads, s.head_dim]), s)     # [B, NKV, T·G, HD]
    dos = g.split(do, [s.block * s.group] * s.query_blocks, axis=2)
    dqs, dks, dvs = [], [], []
    for j, doj in enumerate(dos):
        p, q, k, v, o = saved.p[j], saved.q[j], saved.k[j], saved.v[j], saved.o[j]
        dvs.append(g.op("MatMul", g.transpose(p, (0, 1, 3, 2)), doj))                   # [B, NKV, keys_j, HD]
        dp = g.op("FusedMatMul", doj, v, transB=1, domain="com.microsoft")               # [B, NKV, block·G, keys_j]
        # Softmax backward: dS = P·(dP − Σ_j dP·P) and Σ_j dP_j·P_j = Σ_d dO_d·O_d (cheaper: HD instead of T).
        ds = g.op("Mul", p, g.op("Sub", dp, g.reduce_sum(g.op("Mul", doj, o), [3])))
        if saved.tanh:      # soft-capped scores: d(cap·tanh(s / cap))/ds = 1 − tanh²
            ds = g.op("Mul", ds, cap_slope(g, saved.tanh[j]))
        dqs.append(g.op("FusedMatMul", ds, k, transB=1, domain="com.microsoft"))         # k is [.., HD, keys_j]
        dks.append(g.op("MatMul", g.transpose(ds, (0, 1, 3, 2)), q))                   # q is pre-scaled
    dq = g.reshape(groups_to_rows(g, g.concat(dqs, axis=2), s), [s.batch, s.seq, s.heads, s.head_dim])
    dk, dv = (sum_key_blocks(g, parts, s, saved.first) for parts in (dks, dvs))
    return dq, g.transpose(dk, (0, 2, 1, 3)), g.transpose(dv, (0, 2, 1, 3))


def sum_key_blocks(g: Graph, parts: list[str], s: AttentionShape, first: list[int]) -> str:
    """Σ_j of the blocks' [B, NKV, keys_j, HD] key gradients (keys first[j] .. keys_of(j) − 1), each zero-padded
    to all T keys."""
    padded = [part if first[j] == 0 and s.keys_of(j) == s.seq else
              g.op("Pad", part, g.const([0, 0, first[j], 0, 0, 0, s.seq - s.keys_of(j), 0]))
              for j, part in enumerate(parts)]
    return padded[0] if len(padded) == 1 else g.op("Sum", *padded)


def swiglu_backward(g: Graph, da: str, up: str, saved: tuple[str, ...]) -> tuple[str, str]:
    """d(gate), d(up) of act(gate)·up (forward.swiglu_forward). SwiGLU: silu'(x) = σ(x)·(1 + x·(1 − σ(x)))
    = σ + silu − silu·σ. GeGLU: gelu'(x) = s + 2x·s(1 − s)·√(2/π)(1 + 3·0.044715x²), s = σ(2a) saved."""
    if len(saved) == 3:
        gate, s, act = saved
        slope = g.op("Add", g.op("Mul", g.op("Mul", gate, gate), g.scalar(3.0 * GELU_KAPPA)), g.scalar(1.0))
        spread = g.op("Mul", s, g.op("Sub", g.scalar(1.0), s))
        dact = g.op("Add", s, g.op("Mul", g.op("Mul", g.op("Mul", gate, g.scalar(2.0 * GELU_SQRT_2_OVER_PI)),
                                                      spread), slope))
    else:
        sig, act = saved
        dact = g.op("Add", sig, g.op("Sub", act, g.op("Mul", act, sig)))
    return g.op("Mul", g.op("Mul", da, up), dact), g.op("Mul", da, act)


def cap_slope(g: Graph, tanh: str) -> str:
    """1 − tanh²: the derivative of a soft cap (forward.soft_cap) from its saved tanh."""
    return g.op("Sub", g.scalar(1.0), g.op("Mul", tanh, tanh))


def lm_head_cross_entropy_backward(g: Graph, logp: str, lm_weight: str, targets_flat: str, mask: str,
                                   cap_tanh: str | None = None, targets: str | None = None) -> str:
    """d(final hidden) of the summed CE: (softmax − onehot(target))·W, masked per row; with soft-capped logits
    (`cap_tanh` [N, V] saved by forward.soft_cap, `targets` [N, 1]) each logit's gradient times 1 − tanh².

    The one-hot part is a gather of W's target rows, so the [N, V] gradient is never materialised twice.
    """
    probs = g.op("Exp", logp)
    picked = g.op("Gather", lm_weight, targets_flat, axis=0)                    # [N, C]
    if cap_tanh is not None:
        slope = cap_slope(g, cap_tanh)
        probs = g.op("Mul", probs, slope)
        picked = g.op("Mul", picked, g.op("GatherElements", slope, targets, axis=1))
    dh = g.op("Sub", g.op("MatMul", probs, lm_weight, hint="dlm"), picked)
    return g.op("Mul", dh, mask)
