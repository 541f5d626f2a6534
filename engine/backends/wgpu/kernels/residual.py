"""Python twin of shaders/residual.wgsl: residual add (forward only; its backward is the identity)."""
from __future__ import annotations

import numpy as np

from engine.backends.wgpu.context import UNIFORM, GpuContext, StepEncoder

WORKGROUP = 256


def grid_1d(ctx: GpuContext, n: int, workgroup: int = WORKGROUP) -> tuple[int, int, int]:
    """Workgroups (x, y) covering n invocations, folding into y past the per-dimension limit; and the row stride."""
    groups = max(1, -(-n // workgroup))
    x = min(groups, ctx.max_workgroups)
    y = -(-groups // x)
    return x, y, x * workgroup


class ResidualAdd:
    """out[n] = a[n] + b[n]. Bound once to its buffers; `encode` records one dispatch."""

    def __init__(self, ctx: GpuContext, out, a, b, n: int, label: str = "residual"):
        self.ctx = ctx
        self.pipeline = ctx.pipeline("residual", "residual_forward")
        self.x, self.y, stride = grid_1d(ctx, n)
        self.params = ctx.upload(np.array([n, stride, 0, 0], np.uint32), f"{label}.params", UNIFORM)
        self.bind_group = ctx.bind_group(self.pipeline, [out, a, b, self.params], label)

    def encode(self, enc: StepEncoder) -> None:
        enc.dispatch(self.pipeline, self.bind_group, self.x, self.y)
