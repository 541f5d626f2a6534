"""Python twin of shaders/embedding.wgsl: the token-embedding gather over a table split into vocabulary pieces."""
from __future__ import annotations

from engine.backends.wgpu.context import GpuContext, StepEncoder
from engine.backends.wgpu.kernels.grids import grid_1d
from engine.backends.wgpu.uniforms import upload_uniform
from engine.model.weight_formats import FORMATS, WeightFormat


class Embedding:
    """out [rows, dim] = table[ids]; `pieces` is [(buffer [piece_rows, dim] in `fmt`'s GPU layout, first_id,
    piece_rows)] covering the vocabulary, each value times `scale` (ModelSpec.embed_scale). Frozen and at the bottom of the model: no backward."""

    def __init__(self, ctx: GpuContext, out, ids, pieces: list, rows: int, dim: int,
                 fmt: WeightFormat = WeightFormat.F32, scale: float = 1.0, label: str = "embedding"):
        info = FORMATS[fmt]
        info.check_shape((1, dim), label)
        n4 = rows * -(-dim // 4)
        x, y, stride = grid_1d(ctx, n4)
        self.groups = (x, y)
        self.pipeline = ctx.pipeline("embedding", "embedding_forward", {"FORMAT": fmt.value})
        self.bind_groups = []
        for i, (table, first_id, piece_rows) in enumerate(pieces):
            params = upload_uniform(ctx, "embedding", "Params", f"{label}.{i}.params", n4=n4, dim=dim,
                                    first_id=first_id, piece_rows=piece_rows, row_stride=stride,
                                    row_blocks=dim // info.block_size, scale=scale)
            self.bind_groups.append(ctx.bind_group(self.pipeline, {0: out, 1: ids, 2: table, 3: params},
                                                   f"{label}.{i}"))

    def encode_forward(self, enc: StepEncoder) -> None:
        for bg in self.bind_groups:
            enc.dispatch(self.pipeline, bg, *self.groups)
