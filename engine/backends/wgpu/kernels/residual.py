"""Python twin of shaders/residual.wgsl: residual add (forward only; its backward is the identity)."""
from __future__ import annotations


from engine.backends.wgpu.context import GpuContext, StepEncoder
from engine.backends.wgpu.kernels.grids import grid_1d
from engine.backends.wgpu.uniforms import upload_uniform

class ResidualAdd:
    """out[n] = a[n] + b[n]. Bound once to its buffers; `encode` records one dispatch."""

    def __init__(self, ctx: GpuContext, out, a, b, n: int, label: str = "residual"):
        self.ctx = ctx
        self.pipeline = ctx.pipeline("residual", "residual_forward")
        self.x, self.y, stride = grid_1d(ctx, n)
        self.params = upload_uniform(ctx, "residual", "Params", f"{label}.params", n=n, row_stride=stride)
        self.bind_group = ctx.bind_group(self.pipeline, {0: out, 1: a, 2: b, 3: self.params}, label)

    def encode(self, enc: StepEncoder) -> None:
        enc.dispatch(self.pipeline, self.bind_group, self.x, self.y)
