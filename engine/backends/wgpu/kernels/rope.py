"""Python twin of shaders/rope.wgsl: rotary position embedding in place on [B, T, NH, HD] (rotate_half), on
the whole head or (Phi-3's partial rotary) on its first rotary_dim dims."""
from __future__ import annotations

import numpy as np

from engine.backends.wgpu.context import GpuContext, StepEncoder
from engine.backends.wgpu.kernels.grids import grid_1d
from engine.backends.wgpu.uniforms import upload_uniform


def rope_table(inv_freq: np.ndarray, seq_len: int, scale: float = 1.0) -> np.ndarray:
    """(cos, sin) [T, HD/2, 2] float32, the angle rounded to f32 first as transformers does (t * inv_freq in f32),
    times `scale` (yarn's attention factor, which transformers multiplies cos and sin by)."""
    positions = np.arange(seq_len, dtype=np.float32)
    angle = np.outer(positions, inv_freq.astype(np.float32)).astype(np.float32)
    table = np.stack([np.cos(angle.astype(np.float64)), np.sin(angle.astype(np.float64))], axis=-1)
    return (table.astype(np.float32) * np.float32(scale)).astype(np.float32)


class Rope:
    """Rotates x [B, T, n_heads, head_dim] in place for positions 0..T-1 of every sequence.

    One instance per buffer (q and k each get their own); `encode_backward(enc, dx)` applies the transposed
    map to a gradient buffer of the same layout (bind groups for it are made once per buffer and kept). With
    `scale` (yarn's attention factor) the rotation is scaled by it, forward and backward. `rotary_dim`: the
    dims of each head that rotate (the first ones; inv_freq then has rotary_dim/2 entries), None for all.
    """

    def __init__(self, ctx: GpuContext, x_buf, B: int, T: int, n_heads: int, head_dim: int,
                 inv_freq: np.ndarray, label: str = "rope", scale: float = 1.0, rotary_dim: int | None = None):
        rotary = head_dim if rotary_dim is None else rotary_dim
        if rotary % 2 or not 0 < rotary <= head_dim:
            raise ValueError(f"rope needs an even number of rotary dims from 2 to head_dim {head_dim}, got {rotary}")
        inv_freq = np.asarray(inv_freq, np.float32)
        if inv_freq.shape != (rotary // 2,):
            raise ValueError(f"inv_freq has shape {inv_freq.shape}; expected ({rotary // 2},) for {rotary} rotary dims")
        n_pairs = B * T * n_heads * rotary // 2
        if 4 * B * T * n_heads * head_dim > x_buf.size:
            raise ValueError(f"buffer {x_buf.label!r} holds {x_buf.size} bytes; [B={B}, T={T}, NH={n_heads}, "
                             f"HD={head_dim}] f32 needs {4 * B * T * n_heads * head_dim}")
        self.ctx, self.label = ctx, label
        self.forward_pipeline = ctx.pipeline("rope", "rope_forward")
        self.backward_pipeline = ctx.pipeline("rope", "rope_backward")
        self.x, self.y, stride = grid_1d(ctx, n_pairs)
        self.table = ctx.upload(rope_table(inv_freq, T, scale), f"{label}.cos_sin")
        self.params = upload_uniform(ctx, "rope", "Params", f"{label}.params", n_pairs=n_pairs, half=rotary // 2,
                                     n_heads=n_heads, seq_len=T, row_stride=stride, head_dim=head_dim)
        self.forward_group = ctx.bind_group(self.forward_pipeline, {0: x_buf, 1: self.table, 2: self.params},
                                            f"{label}.forward")
        self._backward_groups: dict[int, tuple] = {}
        self._nbytes = 4 * B * T * n_heads * head_dim

    def encode_forward(self, enc: StepEncoder) -> None:
        enc.dispatch(self.forward_pipeline, self.forward_group, self.x, self.y)

    def encode_backward(self, enc: StepEncoder, dx_buf) -> None:
        # Bind groups are cached per gradient buffer (kept alive beside it so its id cannot be reused),
        # so the step loop creates none after the first step.
        cached = self._backward_groups.get(id(dx_buf))
        if cached is None:
            if dx_buf.size < self._nbytes:
                raise ValueError(f"gradient buffer {dx_buf.label!r} holds {dx_buf.size} bytes; needs {self._nbytes}")
            group = self.ctx.bind_group(self.backward_pipeline, {0: dx_buf, 1: self.table, 2: self.params},
                                        f"{self.label}.backward")
            cached = self._backward_groups[id(dx_buf)] = (group, dx_buf)
        enc.dispatch(self.backward_pipeline, cached[0], self.x, self.y)
