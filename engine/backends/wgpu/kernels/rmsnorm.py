"""Python twin of shaders/rmsnorm.wgsl: RMSNorm forward (saving rstd) and its input gradient."""
from __future__ import annotations

from engine.backends.wgpu.context import GpuContext, StepEncoder
from engine.backends.wgpu.kernels.grids import grid_rows
from engine.backends.wgpu.uniforms import upload_uniform


class RmsNorm:
    """out = w ⊙ x·rstd over rows of `dim`; backward writes (accumulate_dx: adds) dx from dy.

    out/x/dy/dx [rows, dim], rstd [rows] (saved by forward), weight [dim].
    """

    def __init__(self, ctx: GpuContext, out, rstd, x, weight, rows: int, dim: int, eps: float,
                 dx=None, dy=None, accumulate_dx: bool = False, label: str = "rmsnorm"):
        self.groups = grid_rows(ctx, rows)
        self.fwd = ctx.pipeline("rmsnorm", "rmsnorm_forward")
        fwd_params = upload_uniform(ctx, "rmsnorm", "Params", f"{label}.params", rows=rows, dim=dim,
                                    groups_x=self.groups[0], accumulate=0, eps=eps)
        self.fwd_bg = ctx.bind_group(self.fwd, {0: out, 1: rstd, 2: x, 3: weight, 5: fwd_params}, f"{label}.fwd")
        self.bwd_bg = None
        if dx is not None and dy is not None:
            self.bwd = ctx.pipeline("rmsnorm", "rmsnorm_backward")
            bwd_params = upload_uniform(ctx, "rmsnorm", "Params", f"{label}.bwd.params", rows=rows, dim=dim,
                                        groups_x=self.groups[0], accumulate=int(accumulate_dx), eps=eps)
            self.bwd_bg = ctx.bind_group(self.bwd, {0: dx, 1: rstd, 2: x, 3: weight, 4: dy, 5: bwd_params},
                               f"{label}.bwd")

    def encode_forward(self, enc: StepEncoder) -> None:
        enc.dispatch(self.fwd, self.fwd_bg, *self.groups)

    def encode_backward(self, enc: StepEncoder) -> None:
        enc.dispatch(self.bwd, self.bwd_bg, *self.groups)
