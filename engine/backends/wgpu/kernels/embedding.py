"""Python twin of shaders/embedding.wgsl: the token-embedding gather over a table split into vocabulary pieces."""
from __future__ import annotations

from engine.backends.wgpu.context import GpuContext, StepEncoder
from engine.backends.wgpu.kernels.grids import grid_1d
from engine.backends.wgpu.uniforms import upload_uniform


class Embedding:
    """out [rows, dim] = table[ids]; `pieces` is [(buffer [piece_rows, dim], first_id, piece_rows)] covering the
    vocabulary. Frozen and at the bottom of the model: no backward."""

    def __init__(self, ctx: GpuContext, out, ids, pieces: list, rows: int, dim: int, label: str = "embedding"):
        n = rows * dim
        x, y, stride = grid_1d(ctx, n)
        self.groups = (x, y)
        self.pipeline = ctx.pipeline("embedding", "embedding_forward")
        self.bind_groups = []
        for i, (table, first_id, piece_rows) in enumerate(pieces):
            params = upload_uniform(ctx, "embedding", "Params", f"{label}.{i}.params", n=n, dim=dim,
                                    first_id=first_id, piece_rows=piece_rows, row_stride=stride)
            self.bind_groups.append(ctx.bind_group(self.pipeline, {0: out, 1: ids, 2: table, 3: params}, f"{label}.{i}"))

    def encode_forward(self, enc: StepEncoder) -> None:
        for bg in self.bind_groups:
            enc.dispatch(self.pipeline, bg, *self.groups)
