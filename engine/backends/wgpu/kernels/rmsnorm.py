"""Python twin of shaders/rmsnorm.wgsl: RMSNorm forward (saving rstd) and its input gradient."""
from __future__ import annotations

from engine.backends.wgpu.context import GpuContext, StepEncoder
from engine.backends.wgpu.kernels.common import bind, grid_rows, uniform


class RmsNorm:
    """out = w ⊙ x·rstd over rows of `dim`; backward writes (accumulate_dx: adds) dx from dy.

    out/x/dy/dx [rows, dim], rstd [rows] (saved by forward), weight [dim].
    """

    def __init__(self, ctx: GpuContext, out, rstd, x, weight, rows: int, dim: int, eps: float,
                 dx=None, dy=None, accumulate_dx: bool = False, label: str = "rmsnorm"):
        self.groups = grid_rows(ctx, rows)
        self.fwd = ctx.pipeline("rmsnorm", "rmsnorm_forward")
        fwd_params = uniform(ctx, f"{label}.params", rows, dim, self.groups[0], 0, float(eps))
        self.fwd_bg = bind(ctx, self.fwd, {0: out, 1: rstd, 2: x, 3: weight, 5: fwd_params}, f"{label}.fwd")
        self.bwd_bg = None
        if dx is not None and dy is not None:
            self.bwd = ctx.pipeline("rmsnorm", "rmsnorm_backward")
            bwd_params = uniform(ctx, f"{label}.bwd.params", rows, dim, self.groups[0], int(accumulate_dx),
                                 float(eps))
            self.bwd_bg = bind(ctx, self.bwd, {0: dx, 1: rstd, 2: x, 3: weight, 4: dy, 5: bwd_params},
                               f"{label}.bwd")

    def encode_forward(self, enc: StepEncoder) -> None:
        enc.dispatch(self.fwd, self.fwd_bg, *self.groups)

    def encode_backward(self, enc: StepEncoder) -> None:
        enc.dispatch(self.bwd, self.bwd_bg, *self.groups)
