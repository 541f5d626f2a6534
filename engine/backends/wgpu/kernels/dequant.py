"""Python twin of shaders/dequant.wgsl, and the upload of a frozen weight in its storage format.

`upload_weight` is how a weight in any engine.model.weight_formats format reaches the GPU: GGUF bytes re-packed into
the GPU layout (engine.model.weight_formats.to_gpu_layout) that shaders/weight_formats.wgsl's `<format>_load4`
functions read. `Dequant` widens such a buffer back to f32 rows: for tests, never on the training path.
"""
from __future__ import annotations

import numpy as np

from engine.backends.wgpu.context import GpuContext, StepEncoder
from engine.backends.wgpu.kernels.grids import grid_rows
from engine.backends.wgpu.uniforms import upload_uniform
from engine.model.weight_formats import FORMATS, WeightFormat, to_gpu_layout

WG = 64   # dequant_rows' workgroup size: invocations, each writing 4 weights of a row


def upload_weight(ctx: GpuContext, raw, fmt, shape: tuple[int, ...], label: str):
    """(buffer, FormatInfo) of a [rows, cols] (or 1-D) weight given as GGUF bytes of format `fmt`.

    The buffer holds `info.gpu_nbytes(shape)` bytes (GpuContext rounds the allocation up to 16). A shape whose
    rows are not whole blocks raises ValueError naming the shape and the format.
    """
    info = FORMATS[WeightFormat.parse(fmt)]
    try:
        words = to_gpu_layout(raw, info.format, shape)
    except ValueError as exc:
        raise ValueError(f"{label}: {exc}") from exc
    return ctx.upload(words, label), info


class Dequant:
    """out [rows, cols] f32 = the weight in `weights` (GPU layout of `fmt`) widened, one dispatch."""

    def __init__(self, ctx: GpuContext, out, weights, fmt, rows: int, cols: int, label: str = "dequant"):
        info = FORMATS[WeightFormat.parse(fmt)]
        info.check_shape((rows, cols), label)
        self.pipeline = ctx.pipeline("dequant", "dequant_rows", {"FORMAT": info.format.value})
        self.groups = grid_rows(ctx, -(-rows * -(-cols // 4) // WG))
        params = upload_uniform(ctx, "dequant", "Params", f"{label}.params", rows=rows, cols=cols,
                                row_blocks=cols // info.block_size, groups_x=self.groups[0])
        self.bind_group = ctx.bind_group(self.pipeline, {0: out, 1: weights, 2: params}, label)

    def encode(self, enc: StepEncoder) -> None:
        enc.dispatch(self.pipeline, self.bind_group, *self.groups)


def dequantize_on_gpu(ctx: GpuContext, weights, fmt, shape: tuple[int, ...]) -> np.ndarray:
    """Read an uploaded weight back as float32 of `shape` (rows, cols), through dequant_rows."""
    rows, cols = FORMATS[WeightFormat.parse(fmt)].check_shape(tuple(shape))
    out = ctx.buffer(4 * rows * cols, "dequant.out")
    enc = ctx.encoder("dequant")
    Dequant(ctx, out, weights, fmt, rows, cols).encode(enc)
    enc.submit()
    return ctx.read(out, count=rows * cols).reshape(shape)
