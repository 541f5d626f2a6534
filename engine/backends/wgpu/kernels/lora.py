"""The LoRA branch of one adapted projection: y += s·(drop(x)·Aᵀ)·Bᵀ, and its gradients dA, dB and dx.

Its matrix products run on linear.wgsl's GEMM; shaders/lora.wgsl holds the one LoRA-only kernel, the
hash-seeded dropout (forward mask and its backward, regenerated rather than stored).
Shapes: x [M, in], y/dy [M, out], A/dA [r, in], B/dB [out, r], u/du [M, r] (u saved for dB).
Gradients accumulate (beta = 1): micro-batches add up, and the optimizer zeroes them after the update.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.backends.wgpu.context import GpuContext, StepEncoder
from engine.backends.wgpu.kernels.linear import GemmShape, Matmul
from engine.backends.wgpu.kernels.grids import grid_1d
from engine.backends.wgpu.uniforms import upload_uniform


@dataclass(frozen=True)
class LoraDims:
    M: int           # rows (B·T)
    in_features: int
    out_features: int
    rank: int
    scaling: float   # alpha/r, or alpha/sqrt(r) with rsLoRA


class LoraDropout:
    """out = x ⊙ keep/(1−p) with keep from hash(seed, salt, index); backward adds the same mask ⊙ g to dx."""

    def __init__(self, ctx: GpuContext, n: int, salt: int, step_uniform, label: str = "lora_dropout"):
        """step_uniform: (seed u32, p f32) written per step; p = 0 turns dropout into a copy for evaluation."""
        self.ctx, self.n, self.salt, self.step_uniform, self.label = ctx, n, salt, step_uniform, label
        x, y, self.stride = grid_1d(ctx, n)
        self.groups = (x, y)
        self.pipeline = ctx.pipeline("lora", "lora_dropout")

    def bound(self, out, x, accumulate: bool):
        params = upload_uniform(self.ctx, "lora", "Params", f"{self.label}.params", n=self.n, row_stride=self.stride,
                                salt=self.salt, accumulate=int(accumulate))
        bg = self.ctx.bind_group(self.pipeline, {0: out, 1: x, 2: params, 3: self.step_uniform}, self.label)
        return lambda enc: enc.dispatch(self.pipeline, bg, *self.groups)


def input_side(ctx: GpuContext, dims: LoraDims, u, x, lora_a, dropout: float, salt: int, step_uniform, x_drop,
               partials, label: str):
    """The forward's head of a branch: drop(x) and u = drop(x)·Aᵀ. Returns (the LoraDropout or None, its bound
    forward mask step or None, the buffer holding drop(x), the u product)."""
    drop, drop_fwd, x_branch = None, None, x
    if dropout > 0:
        drop = LoraDropout(ctx, dims.M * dims.in_features, salt, step_uniform, f"{label}.dropout")
        drop_fwd = drop.bound(x_drop, x, accumulate=False)
        x_branch = x_drop
    # u (and du) have r columns: a handful of tiles walking all of K, so they split K like dA and dB.
    down = Matmul(ctx, u, x_branch, lora_a, GemmShape(dims.M, dims.rank, dims.in_features, trans_b=True),
                  partials=partials, label=f"{label}.u")
    return drop, drop_fwd, x_branch, down


def input_gradient_steps(ctx: GpuContext, dims: LoraDims, du, lora_a, dx, grad_a_mm: Matmul, dropout, label: str
                         ) -> list:
    """The backward's tail once du is known: dA += duᵀ·drop(x) (grad_a_mm), then dx += drop'(du·A). With dropout
    ((forward mask kernel, LoraDropout, dx_drop [M, in] scratch)), drop(x) is regenerated first for dA and du·A is
    routed back through the same mask."""
    M, fin, r = dims.M, dims.in_features, dims.rank
    if dropout is None:
        dx_mm = Matmul(ctx, dx, du, lora_a, GemmShape(M, fin, r), beta=1.0, label=f"{label}.dx")
        return [grad_a_mm.encode, dx_mm.encode]
    drop_fwd, drop, dx_drop = dropout
    dx_mm = Matmul(ctx, dx_drop, du, lora_a, GemmShape(M, fin, r), label=f"{label}.dx")
    return [drop_fwd, grad_a_mm.encode, dx_mm.encode, drop.bound(dx, dx_drop, accumulate=True)]


class LoraBranch:
    """Bound once to its buffers. With dropout > 0 the branch gets the dropout kernels (p itself comes from
    step_uniform each step) and needs `x_drop`, `dx_drop` ([M, in] scratch)."""

    def __init__(self, ctx: GpuContext, dims: LoraDims, y, u, x, lora_a, lora_b, dy=None, dx=None, grad_a=None,
                 grad_b=None, du=None, dropout: float = 0.0, salt: int = 0, step_uniform=None, x_drop=None,
                 dx_drop=None, partials=None, label: str = "lora"):
        M, fin, fout, r, s = dims.M, dims.in_features, dims.out_features, dims.rank, dims.scaling
        drop, self.drop_fwd, x_branch, self.down = input_side(ctx, dims, u, x, lora_a, dropout, salt, step_uniform,
                                                              x_drop, partials, label)
        self.up = Matmul(ctx, y, u, lora_b, GemmShape(M, fout, r, trans_b=True), alpha=s, beta=1.0,
                         label=f"{label}.y")
        self.backward = []
        if dy is None:
            return
        # dA and dB contract over all M = B·T rows into small matrices: split over K given a partials scratch.
        grad_b_mm = Matmul(ctx, grad_b, dy, u, GemmShape(fout, r, M, trans_a=True), alpha=s, beta=1.0,
                           partials=partials, label=f"{label}.dB")
        du_mm = Matmul(ctx, du, dy, lora_b, GemmShape(M, r, fout), alpha=s, partials=partials,
                       label=f"{label}.du")
        grad_a_mm = Matmul(ctx, grad_a, du, x_branch, GemmShape(r, fin, M, trans_a=True), beta=1.0,
                           partials=partials, label=f"{label}.dA")
        self.backward = [grad_b_mm.encode, du_mm.encode] + input_gradient_steps(
            ctx, dims, du, lora_a, dx, grad_a_mm, (self.drop_fwd, drop, dx_drop) if dropout > 0 else None, label)

    def encode_forward(self, enc: StepEncoder) -> None:
        if self.drop_fwd is not None:
            self.drop_fwd(enc)
        self.down.encode(enc)
        self.up.encode(enc)

    def encode_saved(self, enc: StepEncoder) -> None:
        """Only the part of the forward the backward reads, u = drop(x)·Aᵀ (y untouched): activation recompute
        of a projection whose output is not needed again."""
        if self.drop_fwd is not None:
            self.drop_fwd(enc)
        self.down.encode(enc)

    def encode_backward(self, enc: StepEncoder) -> None:
        """dB += s·dyᵀ·u; du = s·dy·B; dA += duᵀ·drop(x); dx += drop'(du·A). dx must already hold the base
        projection's input gradient (this adds to it)."""
        for step in self.backward:
            step(enc)


class LoraGroup:
    """The LoRA branches of n projections that read one input x (q/k/v, or gate/up), without dropout, with their
    A products done once for all: u = x·[A_1; …; A_n]ᵀ [M, n·r], then each y_i += s·u_i·B_iᵀ (u_i the columns
    i·r…); backward each du_i = s·dy_i·B_i into du's columns i·r…, then one dA += duᵀ·x over the stacked
    [n·r, in] gradient and one dx += du·A.

    Why beside LoraBranch: at small batches every LoRA product is a tiny, latency-bound dispatch (1176 of them in
    a Qwen3-0.6B step at batch 1), so doing the shared-input products as one saves 2(n−1) dispatches forward and
    backward per group, more with split K. `lora_a`/`grad_a`: the stacked A tensors (LoraLayout.stacked_binding);
    `lora_b`, `grad_b`, `y`, `dy`: one per member; `u`, `du` [M, n·r]. All members share `dims` but out_features:
    `outs` gives each member's."""

    def __init__(self, ctx: GpuContext, dims: LoraDims, outs: list[int], y: list, u, x, lora_a, lora_b: list,
                 dy: list | None = None, dx=None, grad_a=None, grad_b: list | None = None, du=None, partials=None,
                 label: str = "lora_group"):
        M, fin, r, s, n = dims.M, dims.in_features, dims.rank, dims.scaling, len(outs)
        self.down = Matmul(ctx, u, x, lora_a, GemmShape(M, n * r, fin, trans_b=True), partials=partials,
                           label=f"{label}.u")
        self.up = [Matmul(ctx, y[i], u, lora_b[i], GemmShape(M, outs[i], r, trans_b=True, lda=n * r, a_off=i * r),
                          alpha=s, beta=1.0, label=f"{label}.{i}.y") for i in range(n)]
        self.backward = []
        if dy is None:
            return
        for i in range(n):
            # dB_i += s·dy_iᵀ·u_i (split over the M rows given partials); du_i = s·dy_i·B_i into its columns.
            self.backward += [
                Matmul(ctx, grad_b[i], dy[i], u, GemmShape(outs[i], r, M, trans_a=True, ldb=n * r, b_off=i * r),
                       alpha=s, beta=1.0, partials=partials, label=f"{label}.{i}.dB").encode,
                Matmul(ctx, du, dy[i], lora_b[i], GemmShape(M, r, outs[i], ldc=n * r, c_off=i * r), alpha=s,
                       partials=partials, label=f"{label}.{i}.du").encode]
        self.backward += [
            Matmul(ctx, grad_a, du, x, GemmShape(n * r, fin, M, trans_a=True), beta=1.0, partials=partials,
                   label=f"{label}.dA").encode,
            Matmul(ctx, dx, du, lora_a, GemmShape(M, fin, n * r), beta=1.0, label=f"{label}.dx").encode]

    drop_fwd = None   # FusedLoraBranch's dropout mask step, where it has one

    def encode_forward(self, enc: StepEncoder) -> None:
        """After every member's base projection wrote its y (the branches add to it)."""
        if self.drop_fwd is not None:
            self.drop_fwd(enc)
        self.down.encode(enc)
        for up in self.up:
            up.encode(enc)

    def encode_backward(self, enc: StepEncoder) -> None:
        """After every member's base projection wrote or added its dx (this adds the group's to it)."""
        for step in self.backward:
            step(enc)


class FusedLoraBranch(LoraGroup):
    """PEFT's LoRA on a fused projection (Phi-3's qkv_proj, gate_up_proj) whose members the engine computes as
    separate projections: one A [r, in] for all members and one B [Σ out_i, r] whose row block i (rows
    off_i = Σ_{j<i} out_j on) is member i's. u = drop(x)·Aᵀ [M, r] once; each y_i += s·u·B_iᵀ; backward
    du = s·Σ_i dy_i·B_i (the first member writes du, the others add), dB_i += s·dy_iᵀ·u into dB's row block i,
    dA += duᵀ·drop(x), dx += drop'(du·A). With dropout, one mask on x serves every member, as PEFT's one module
    has one Dropout; `x_drop`, `dx_drop` are then [M, in] scratch.

    B_i, dB_i are addressed inside the whole B by element offset (GemmShape b_off / c_off), so no member needs a
    binding of its own (their offsets are not 256-byte aligned). `y`, `dy`: one per member; `outs`: their widths.
    Called where a LoraGroup would be, after every member's base projection (forward) or input gradient (backward).
    """

    def __init__(self, ctx: GpuContext, dims: LoraDims, outs: list[int], y: list, u, x, lora_a, lora_b,
                 dy: list | None = None, dx=None, grad_a=None, grad_b=None, du=None, dropout: float = 0.0,
                 salt: int = 0, step_uniform=None, x_drop=None, dx_drop=None, partials=None,
                 label: str = "lora_fused"):
        M, fin, r, s, n = dims.M, dims.in_features, dims.rank, dims.scaling, len(outs)
        if sum(outs) != dims.out_features:
            raise ValueError(f"{label}: the members' widths {outs} do not add up to B's {dims.out_features} rows")
        offs = [sum(outs[:i]) for i in range(n)]
        drop, self.drop_fwd, x_branch, self.down = input_side(ctx, dims, u, x, lora_a, dropout, salt, step_uniform,
                                                              x_drop, partials, label)
        self.up = [Matmul(ctx, y[i], u, lora_b, GemmShape(M, outs[i], r, trans_b=True, b_off=offs[i] * r),
                          alpha=s, beta=1.0, label=f"{label}.{i}.y") for i in range(n)]
        self.backward = []
        if dy is None:
            return
        for i in range(n):
            self.backward += [
                Matmul(ctx, grad_b, dy[i], u, GemmShape(outs[i], r, M, trans_a=True, c_off=offs[i] * r),
                       alpha=s, beta=1.0, partials=partials, label=f"{label}.{i}.dB").encode,
                Matmul(ctx, du, dy[i], lora_b, GemmShape(M, r, outs[i], b_off=offs[i] * r), alpha=s,
                       beta=0.0 if i == 0 else 1.0, partials=partials, label=f"{label}.{i}.du").encode]
        grad_a_mm = Matmul(ctx, grad_a, du, x_branch, GemmShape(r, fin, M, trans_a=True), beta=1.0,
                           partials=partials, label=f"{label}.dA")
        self.backward += input_gradient_steps(
            ctx, dims, du, lora_a, dx, grad_a_mm, (self.drop_fwd, drop, dx_drop) if dropout > 0 else None, label)
