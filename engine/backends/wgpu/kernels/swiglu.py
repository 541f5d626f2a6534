"""Python twin of shaders/swiglu.wgsl: h = act(gate) ⊙ up (SwiGLU: silu; GeGLU: gelu tanh) and its gradients
to gate and up."""
from __future__ import annotations

from engine.backends.wgpu.context import GpuContext, StepEncoder
from engine.backends.wgpu.kernels.grids import grid_1d
from engine.backends.wgpu.uniforms import upload_uniform


# ModelSpec.activation -> the shader's ACTIVATION override.
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}


class SwiGlu:
    """h, gate, up, dh, dgate, dup: [n] (n = B·T·intermediate); `activation` silu (SwiGLU) or gelu_tanh (GeGLU)."""

    def __init__(self, ctx: GpuContext, h, gate, up, n: int, dgate=None, dup=None, dh=None,
                 activation: str = "silu", label: str = "swiglu"):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is unknown; choose from {', '.join(ACTIVATIONS)}")
        constants = {"ACTIVATION": ACTIVATIONS[activation]}
        x, y, stride = grid_1d(ctx, n)
        self.groups = (x, y)
        params = upload_uniform(ctx, "swiglu", "Params", f"{label}.params", n=n, row_stride=stride)
        self.fwd = ctx.pipeline("swiglu", "swiglu_forward", constants)
        self.fwd_bg = ctx.bind_group(self.fwd, {0: h, 2: gate, 3: up, 5: params}, f"{label}.fwd")
        if dh is not None:
            self.bwd = ctx.pipeline("swiglu", "swiglu_backward", constants)
            self.bwd_bg = ctx.bind_group(self.bwd, {0: dgate, 1: dup, 2: gate, 3: up, 4: dh, 5: params}, f"{label}.bwd")

    def encode_forward(self, enc: StepEncoder) -> None:
        enc.dispatch(self.fwd, self.fwd_bg, *self.groups)

    def encode_backward(self, enc: StepEncoder) -> None:
        enc.dispatch(self.bwd, self.bwd_bg, *self.groups)
