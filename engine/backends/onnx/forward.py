"""Forward ops of the decoder as ONNX nodes. Each `<op>_forward` returns its output and what its twin in
backward.py needs (llm.c style: the same op names forwards and backwards).

Activations are 2-D [N, C] (N = B·T) for every linear layer, 4-D only inside attention.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.backends.onnx.graph import Graph


@dataclass(frozen=True)
class LinearGroup:
    """Projections that read the same input (q/k/v, gate/up, o, down): one frozen GEMM per member, and one
    LoRA-A GEMM for all members (their A stacked: one [N, R·m] product instead of m thin ones).

    Separate member GEMMs (not one over concatenated weights) leave each output in its own tensor, so nothing
    downstream splits or concatenates [N, out]-sized activations, and each LoRA B multiplies only its own
    member (a block-diagonal B over the concatenation spent 2-3x the FLOPs of the thin LoRA GEMMs on zeros).
    """
    weights: tuple[str, ...]        # frozen [out, in] per member
    biases: tuple[str | None, ...]  # frozen [out] per member (ModelSpec.bias_targets) or None
    targets: tuple[str, ...]        # e.g. ("q_proj", "k_proj", "v_proj"), in the order of every tuple here
    lora: tuple[tuple[str, str, str, str] | None, ...]   # per target: (A input, B input, dA out, dB out) or None
    scaling: float
    rank: int
    input_scale: str | None = None  # an RMSNorm weight folded into the frozen weights (see fold_norm_weight)
    dropout: float = 0.0            # LoRA dropout on the branch input (train graph only)
    dropout_masks: tuple[str, ...] = ()   # per LoRA member: graph output name for its scaled mask, or ()
    seed: int = 0                   # first Dropout seed of this group (one distinct seed per member)
    # Phi-3: one LoRA over the fused projection that the members are (qkv_proj, gate_up_proj): (A input
    # [R, in], B input [Σ out_j, R], dA out, dB out), B's row blocks the members' in order (`outs`: their
    # widths); `lora` is then None for every member. Its dropout is one mask on x, as PEFT's one module has.
    fused: tuple[str, str, str, str] | None = None
    outs: tuple[int, ...] = ()


def fold_norm_weight(weight: np.ndarray, norm_weight: np.ndarray) -> np.ndarray:
    """W·diag(w): (xn∘w) Wᵀ = xn (W·diag(w))ᵀ, so a projection after an RMSNorm reads the normalised x
    directly and neither the forward nor the backward pass spends an [N, in] multiply on w. LoRA A sees
    x∘w as in PEFT: the graph multiplies A (tiny) by w instead (LinearGroup.input_scale)."""
    return weight * norm_weight[None, :]


@dataclass
class LinearSaved:
    x: str                          # input [N, in]
    x_drop: list[str] | None = None  # per LoRA member: dropout(x) [N, in] (PEFT: one dropout per module)
    keep: list[str] | None = None   # per LoRA member: mask / (1 − p) [N, in]
    u: list[str] | None = None      # per LoRA member: s·(x A'ᵀ) [N, R]
    a: list[str] | None = None      # per LoRA member: A' = A∘input_scale [R, in]
    a_cat: str | None = None        # A' of the members stacked [R·m, in]


def _lora_members(group: LinearGroup) -> list[int]:
    return [i for i, spec in enumerate(group.lora) if spec is not None]


def _lora_branches(group: LinearGroup) -> int:
    """LoRA modules of a group, each with its own dropout: one per adapted member, or the one fused."""
    return 1 if group.fused is not None else len(_lora_members(group))


def lora_dropout_forward(g: Graph, x: str, group: LinearGroup, saved: LinearSaved) -> None:
    """One Dropout per LoRA member, as PEFT has one per module. Each node gets its own seed; onnxruntime
    advances a node's generator on every run, so masks differ from step to step yet repeat for a seed."""
    ratio, training = g.scalar(group.dropout), g.const(np.array(True), np.bool_)
    saved.x_drop, saved.keep = [], []
    for j in range(_lora_branches(group)):
        xd, mask = g.op("Dropout", x, ratio, training, outputs=2, seed=group.seed + j, hint="lora_drop")
        keep = g.op("Mul", g.op("Cast", mask, to=1), g.scalar(1.0 / (1.0 - group.dropout)))
        if group.dropout_masks:
            g.output(keep, group.dropout_masks[j], shape=None)
        saved.x_drop.append(xd)
        saved.keep.append(keep)


def linear_forward(g: Graph, x: str, group: LinearGroup) -> tuple[list[str], LinearSaved]:
    """y_j = x W_jᵀ (+ b_j) + s·(x A_jᵀ) B_jᵀ for every member j, each [N, out_j].

    The LoRA part (with the bias, if any) is added to the frozen GEMM's output by a separate Add: onnxruntime's
    Gemm first copies a C input into its output on one thread, which made a [256, 1536] product ~20% slower
    than the product and an Add (measured at the 135M shape, 2 threads: 1.56 against 1.41 ms).
    """
    saved = LinearSaved(x=x)
    members = _lora_members(group)
    lora_y: dict[int, str] = {}
    if group.fused is not None:
        lora_y = dict(enumerate(_fused_lora_forward(g, x, group, saved)))
    elif members:
        saved.a = [group.lora[i][0] for i in members]
        if group.dropout > 0:
            if group.input_scale is not None:
                saved.a = [g.op("Mul", a, group.input_scale, hint="lora_a") for a in saved.a]
            lora_dropout_forward(g, x, group, saved)
            saved.u = [g.op("Gemm", xd, a, transB=1, alpha=group.scaling, hint="lora_u")
                       for a, xd in zip(saved.a, saved.x_drop)]
        else:
            saved.a_cat = g.concat(saved.a, axis=0)
            if group.input_scale is not None:
                saved.a_cat = g.op("Mul", saved.a_cat, group.input_scale, hint="lora_a")
            u = g.op("Gemm", x, saved.a_cat, transB=1, alpha=group.scaling, hint="lora_u")
            saved.u = g.split(u, [group.rank] * len(members), axis=1)
        for i, u in zip(members, saved.u):
            bias = [group.biases[i]] if group.biases[i] else []
            lora_y[i] = g.op("Gemm", u, group.lora[i][1], *bias, transB=1, hint="lora_y")
    ys = []
    for i, weight in enumerate(group.weights):
        if i in lora_y:
            ys.append(g.op("Add", g.op("Gemm", x, weight, transB=1, hint="lin"), lora_y[i]))
        else:
            ys.append(g.op("Gemm", x, weight, *([group.biases[i]] if group.biases[i] else []), transB=1, hint="lin"))
    return ys, saved


def _fused_lora_forward(g: Graph, x: str, group: LinearGroup, saved: LinearSaved) -> list[str]:
    """Each member's part of one LoRA over the fused projection: u = s·drop(x)·A'ᵀ [N, R] once, then
    u·Bᵀ [N, Σ out_j] split into the members' column blocks."""
    if any(group.biases):
        raise ValueError("a fused projection's LoRA with frozen biases is not built (Phi-3 has none)")
    a, b = group.fused[0], group.fused[1]
    saved.a = [g.op("Mul", a, group.input_scale, hint="lora_a") if group.input_scale is not None else a]
    xd = x
    if group.dropout > 0:
        lora_dropout_forward(g, x, group, saved)
        xd = saved.x_drop[0]
    saved.u = [g.op("Gemm", xd, saved.a[0], transB=1, alpha=group.scaling, hint="lora_u")]
    return g.split(g.op("Gemm", saved.u[0], b, transB=1, hint="lora_y"), list(group.outs), axis=1)


def fused_rmsnorm_forward(g: Graph, x: str, width: int, eps: float, residual: str | None = None,
                          guards: list[str] | None = None) -> tuple[str, tuple[str, str], str]:
    """xn = x / sqrt(mean(x²) + eps) without a weight (it is folded into the next projection, or applied by the
    caller), as one onnxruntime kernel; with `residual`, x = residual + x is formed by the same kernel.
    Returns (xn, (xn, rstd), x).

    The fused kernel gives an overflowed row (mean square inf) rstd 0, a silent all-zero row; such rows are
    caught on the loss instead: `guards` collects every rstd, and guard_loss() makes the loss NaN if any is 0.
    """
    ones = g.const(np.ones(width, np.float32), np.float32)
    if residual is None:
        xn, rstd = g.op("SimplifiedLayerNormalization", x, ones, outputs=2, axis=-1, epsilon=eps, hint="norm")
        total = x
    else:
        xn, _, rstd, total = g.op("SkipSimplifiedLayerNormalization", x, residual, ones, outputs=4,
                                  epsilon=eps, domain="com.microsoft", hint="norm")
    if guards is not None:
        guards.append(rstd)
    return xn, (xn, rstd), total


def guard_loss(g: Graph, loss_sum: str, guards: list[str]) -> str:
    """loss_sum, or NaN when any guarded rstd is 0 (a row whose mean square overflowed)."""
    smallest = g.op("ReduceMin", g.op("Min", *guards) if len(guards) > 1 else guards[0], keepdims=0)
    nan_if_zero = g.op("Where", g.op("Equal", smallest, g.scalar(0.0)), g.scalar(float("nan")), g.scalar(0.0))
    return g.op("Add", loss_sum, nan_if_zero)


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


@dataclass(frozen=True)
class Rope:
    """Constants of onnxruntime's fused RotaryEmbedding kernel (rotate_half convention, as HF's Llama)."""
    positions: str      # int64 [B, T]
    cos: str            # [T, HD/2]
    sin: str            # [T, HD/2]
    neg_sin: str        # [T, HD/2]: the backward pass rotates by the opposite angle
    partial_dim: int = 0    # Phi-3's partial rotary: the first partial_dim dims of each head rotate (tables
                            # [T, partial_dim/2]), the rest pass; 0: the whole head


def rope_tables(inv_freq: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [T, HD/2] as HF builds them (angles in float32; HF duplicates the halves, the kernel does)."""
    angles = np.outer(np.arange(seq_len, dtype=np.float32), inv_freq).astype(np.float32)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope_constants(g: Graph, inv_freq: np.ndarray, batch: int, seq_len: int, scale: float = 1.0,
                   partial_dim: int = 0) -> Rope:
    """The tables times `scale`: a rotation is linear, so the queries' 1/sqrt(HD) rides on their rotation
    (forward and backward) instead of costing a multiply over q and over dq in every layer (not with a partial
    rotary, which leaves the unrotated dims unscaled: there the caller scales q itself)."""
    cos, sin = (np.float32(scale) * table for table in rope_tables(inv_freq, seq_len))
    positions = np.tile(np.arange(seq_len, dtype=np.int64), (batch, 1))
    return Rope(g.const(positions), g.const(cos, np.float32), g.const(sin, np.float32), g.const(-sin, np.float32),
                partial_dim)


def rope_attributes(rope: Rope, heads: int) -> dict:
    """The RotaryEmbedding kernel's attributes: a partial rotary names its rotated dims."""
    return dict(num_heads=heads, interleaved=0, **({"rotary_embedding_dim": rope.partial_dim}
                                                   if rope.partial_dim else {}))


def rope_forward(g: Graph, x: str, rope: Rope, heads: int) -> str:
    """x·cos + rotate_half(x)·sin on x [B, T, heads·HD], one fused kernel (four ops and a pass each before);
    with a partial rotary on each head's first rope.partial_dim dims (rotate_half within them), the rest kept."""
    return g.op("RotaryEmbedding", x, rope.positions, rope.cos, rope.sin, **rope_attributes(rope, heads),
                domain="com.microsoft", hint="rope")


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    query_blocks: int = 1       # causal blocks: see attention_forward
    softcap: float | None = None    # Gemma 2: scaled scores s -> softcap·tanh(s / softcap) before the mask

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def block(self) -> int:
        """Positions per query block."""
        return self.seq // self.query_blocks

    def keys_of(self, block: int) -> int:
        """Keys a query block sees: every position up to its last one."""
        return (block + 1) * self.block

    def first_key(self, block: int, window: int | None) -> int:
        """The first key a query block sees: 0, or with a sliding window its first query's first key."""
        return 0 if window is None else max(0, block * self.block - window + 1)


def query_blocks_for(seq: int) -> int:
    """Causal query blocks: with n blocks, (n − 1)/2n of the attention products and softmax work are skipped, but
    each block costs extra nodes and copies. Blocks of 128 positions up to 4 blocks, of 256 beyond (at most 8).
    Measured at the 135M shape, B=1, 2 cores, interleaved A/B: T=256 2 blocks 1-2% a step faster than 1;
    T=512 4 blocks 2% faster than 2; T=1024 4 blocks 1% faster than 8 and 16% faster than 1."""
    blocks = max(1, min(4, seq // 128) if seq < 1024 else min(8, seq // 256))
    while seq % blocks:
        blocks -= 1
    return blocks


def heads_to_groups(g: Graph, x: str, s: AttentionShape) -> str:
    """[B, T, NH, HD] -> [B, NKV, T·G, HD]: the query heads sharing a KV head stacked along rows, row t·G + g
    for position t of group member g (no K/V repeat). Rows position-major, so the transpose moves whole
    G·HD runs ([B, T, NKV, G·HD] -> [B, NKV, T, G·HD]), faster than interleaving HD runs."""
    x = g.reshape(x, [s.batch, s.seq, s.kv_heads, s.group * s.head_dim])
    x = g.transpose(x, (0, 2, 1, 3))
    return g.reshape(x, [s.batch, s.kv_heads, s.seq * s.group, s.head_dim])


def groups_to_rows(g: Graph, x: str, s: AttentionShape) -> str:
    """[B, NKV, T·G, HD] -> [B·T, NH·HD], the inverse of heads_to_groups followed by flattening."""
    x = g.reshape(x, [s.batch, s.kv_heads, s.seq, s.group * s.head_dim])
    x = g.transpose(x, (0, 2, 1, 3))
    return g.reshape(x, [s.batch * s.seq, s.heads * s.head_dim])


FULL_MASK_BYTES = 32 << 20


def causal_mask(s: AttentionShape, block: int, window: int | None = None) -> np.ndarray:
    """Additive mask of query block `block` against the keys it sees: [B, NKV, block·G, keys] (row r is query
    position block·s.block + r // G, see heads_to_groups); with a sliding `window`, query q sees only the keys
    q − window < k <= q (transformers' sliding_window_overlay), and the columns start at s.first_key. [block·G, keys] when the full one would pass
    FULL_MASK_BYTES. Stored at the scores' full shape, the Add is a plain one: the broadcasting Add took twice
    as long (0.38 ms against 0.18 per layer at the 135M shape)."""
    q = block * s.block + np.repeat(np.arange(s.block), s.group)[:, None]
    k = np.arange(s.first_key(block, window), s.keys_of(block))[None, :]
    visible = (k <= q) & ((q - k < window) if window is not None else True)
    mask = np.where(visible, 0.0, -np.inf).astype(np.float32)
    if mask.nbytes * s.batch * s.kv_heads > FULL_MASK_BYTES:
        return mask
    return np.ascontiguousarray(np.broadcast_to(mask, (s.batch, s.kv_heads) + mask.shape))


@dataclass
class AttentionSaved:
    """Per query block j: q [B, NKV, block·G, HD] (scaled by 1/sqrt(HD)), the keys it sees transposed
    [B, NKV, HD, keys_j] and values [B, NKV, keys_j, HD], its softmax [B, NKV, block·G, keys_j] and output
    [B, NKV, block·G, HD]; with a soft cap, tanh(s / cap) of its scores [B, NKV, block·G, keys_j]. keys_j
    runs from first[j] (0 without a window) to keys_of(j)."""
    q: list[str]
    k: list[str]
    v: list[str]
    p: list[str]
    o: list[str]
    first: list[int]
    tanh: list[str] = field(default_factory=list)


def key_range(g: Graph, x: str, s: AttentionShape, block: int, first: int, axis: int = 2) -> str:
    """Positions first .. keys_of(block) − 1 of x along `axis` ([B, NKV, T, HD], or [B, NKV, HD, T] with axis 3)."""
    if first == 0 and s.keys_of(block) == s.seq:
        return x
    return g.op("Slice", x, g.const([first]), g.const([s.keys_of(block)]), g.const([axis]))


def attention_forward(g: Graph, q: str, k: str, v: str, masks: list[str], s: AttentionShape,
                      window: int | None = None) -> tuple[str, AttentionSaved]:
    """Causal softmax attention; q [B, T, NH, HD] already scaled by 1/sqrt(HD) (see rope_constants), k/v
    [B, T, NKV, HD] -> [B·T, NH·HD]. `masks`: causal_mask(s, j, window) per query block.

    The queries are cut into s.query_blocks blocks of positions; block j is multiplied only with the keys up to
    its last position, so with 2 blocks a quarter of the products (and of the softmax work) is skipped; with a
    sliding window, only with the keys from its first query's first one.
    """
    qg = heads_to_groups(g, q, s)
    # The keys transposed once, straight to [B, NKV, HD, T]: the scores read them as they are, and the
    # backward pass's dq = dS·K reads them transposed (FusedMatMul transB), so no second copy of K is made.
    kt = g.transpose(k, (0, 2, 3, 1))
    vh = g.transpose(v, (0, 2, 1, 3))
    saved = AttentionSaved(q=g.split(qg, [s.block * s.group] * s.query_blocks, axis=2), k=[], v=[], p=[], o=[],
                           first=[s.first_key(j, window) for j in range(s.query_blocks)])
    for j, (qj, mask) in enumerate(zip(saved.q, masks)):
        kj, vj = key_range(g, kt, s, j, saved.first[j], axis=3), key_range(g, vh, s, j, saved.first[j])
        scores = g.op("MatMul", qj, kj)
        if s.softcap is not None:
            saved.tanh.append(g.op("Tanh", g.op("Mul", scores, g.scalar(1.0 / s.softcap))))
            scores = g.op("Mul", saved.tanh[-1], g.scalar(s.softcap))
        p = g.op("Softmax", g.op("Add", scores, mask), axis=-1)
        saved.k.append(kj)
        saved.v.append(vj)
        saved.p.append(p)
        saved.o.append(g.op("MatMul", p, vj))
    return groups_to_rows(g, g.concat(saved.o, axis=2), s), saved


GELU_SQRT_2_OVER_PI = float(np.sqrt(2.0 / np.pi))
GELU_KAPPA = 0.044715


def swiglu_forward(g: Graph, gate: str, up: str, activation: str = "silu") -> tuple[str, tuple[str, ...]]:
    """act(gate)·up with act silu (SwiGLU; saves (sigmoid(gate), silu(gate))) or, for Gemma, gelu_tanh (GeGLU:
    torch's gelu approximate="tanh", ½g(1 + tanh(a)) with a = √(2/π)(g + 0.044715g³), computed as g·σ(2a), which
    has no 1 + tanh cancellation in the negative tail; saves (gate, σ(2a), gelu))."""
    if activation == "gelu_tanh":
        cube = g.op("Mul", gate, g.op("Mul", gate, gate))
        inner = g.op("Mul", g.op("Add", gate, g.op("Mul", cube, g.scalar(GELU_KAPPA))),
                     g.scalar(2.0 * GELU_SQRT_2_OVER_PI))
        sig = g.op("Sigmoid", inner)
        gelu = g.op("Mul", gate, sig)
        return g.op("Mul", gelu, up), (gate, sig, gelu)
    if activation != "silu":
        raise ValueError(f"activation {activation!r} is unknown; choose silu or gelu_tanh")
    sig = g.op("Sigmoid", gate)
    silu = g.op("Mul", gate, sig)
    return g.op("Mul", silu, up), (sig, silu)


def soft_cap(g: Graph, x: str, cap: float) -> tuple[str, str]:
    """(cap·tanh(x / cap), the tanh): Gemma 2's soft-capping; the backward multiplies by 1 − tanh²."""
    t = g.op("Tanh", g.op("Mul", x, g.scalar(1.0 / cap)))
    return g.op("Mul", t, g.scalar(cap)), t


def cross_entropy_forward(g: Graph, logits: str, targets: str, mask: str) -> tuple[str, tuple[str, str]]:
    """Sum over rows of mask·(−log softmax(logits)[target]); logits [N, V], targets int64 [N, 1], mask [N, 1].

    Saves the log-softmax (the backward pass exponentiates it) and the picked log-probabilities.
    """
    logp = g.op("LogSoftmax", logits, axis=1)
    picked = g.op("GatherElements", logp, targets, axis=1)
    loss_sum = g.reduce_sum(g.op("Mul", g.op("Neg", picked), mask), [0, 1], keepdims=0)
    return loss_sum, (logp, picked)
