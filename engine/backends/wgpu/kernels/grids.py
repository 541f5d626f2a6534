"""Dispatch grids the kernel twins share, folded past the per-dimension workgroup limit."""
from __future__ import annotations

from engine.backends.wgpu.context import GpuContext

WORKGROUP = 256


def grid_1d(ctx: GpuContext, n: int, workgroup: int = WORKGROUP) -> tuple[int, int, int]:
    """Workgroups (x, y) covering n invocations, folding into y past the per-dimension limit; and the row stride."""
    groups = max(1, -(-n // workgroup))
    x = min(groups, ctx.max_workgroups)
    y = -(-groups // x)
    return x, y, x * workgroup


def grid_rows(ctx: GpuContext, rows: int) -> tuple[int, int]:
    """Workgroups (x, y) for one workgroup per row, folded into y past the per-dimension limit."""
    x = max(1, min(rows, ctx.max_workgroups))
    return x, -(-rows // x)
