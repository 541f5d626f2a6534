"""Python twin of shaders/optimizer.wgsl: global grad norm, clip + non-finite guard, AdamW / 8-bit AdamW / SGD.

Every LoRA parameter lives in one flat f32 buffer `params [P]`, its gradient in `grads [P]`. The backend owns
`stats` f32[16]: [0] mean loss (engine), [1] grad L2 norm (GradNorm), [2] clip scale applied (0 when
skipped), [3] 1.0 if skipped, [4] optimizer updates so far (drives bias correction), [5] tokens (engine).
A step encodes GradNorm.encode then Optimizer.encode; nothing is read back. Host twins: engine.backends.optimizers.
"""
from __future__ import annotations

import math

import numpy as np

from engine.backends.base import OptimizerConfig
from engine.backends.wgpu.context import UNIFORM, GpuContext, StepEncoder
from engine.backends.wgpu.kernels.grids import grid_1d
from engine.backends.wgpu.uniforms import uniform_struct
from engine.backends.optimizers import SIGNED_MAP, UNSIGNED_MAP

WORKGROUP = 256
MAX_PARTIALS = 1024          # first-pass workgroups of the norm; fixed by P alone, so the sum order is too
STATS_FLOATS = 16

HYPER = uniform_struct("optimizer", "Hyper")   # both kernels' uniform; a kernel fills only what it reads


def pack_hyper(**values) -> np.ndarray:
    """Bytes of the Hyper uniform; the fields a kernel does not read are 0."""
    fields = {name: 0 for name, _ in HYPER.fields if not name.startswith("_")}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"unknown Hyper fields {sorted(unknown)}")
    return np.frombuffer(HYPER.pack(**{**fields, **values}), np.uint8)


def _check_stats(stats) -> None:
    if stats.size < 4 * STATS_FLOATS:
        raise ValueError(f"stats buffer {stats.label!r} holds {stats.size} bytes; needs f32[{STATS_FLOATS}]")


class GradNorm:
    """stats[1] = ||grads||_2 in two deterministic passes (fixed partition, tree sums, no atomics)."""

    def __init__(self, ctx: GpuContext, grads, P: int, stats, label: str = "grad_norm"):
        if P < 1 or grads.size < 4 * P:
            raise ValueError(f"grads buffer {grads.label!r} holds {grads.size} bytes; P={P} needs {4 * P}")
        _check_stats(stats)
        self.n_partials = min(MAX_PARTIALS, -(-P // WORKGROUP))
        self.uniform = ctx.upload(pack_hyper(n=P, n_partials=self.n_partials), f"{label}.hyper", UNIFORM)
        self.partials = ctx.buffer(4 * self.n_partials, f"{label}.partials")
        self.partial_pipeline = ctx.pipeline("optimizer", "grad_norm_partial")
        self.final_pipeline = ctx.pipeline("optimizer", "grad_norm_final")
        self.partial_group = ctx.bind_group(self.partial_pipeline, {0: self.uniform, 2: grads, 4: self.partials},
                                  f"{label}.partial")
        self.final_group = ctx.bind_group(self.final_pipeline, {0: self.uniform, 1: stats, 4: self.partials},
                                f"{label}.final")

    def encode(self, enc: StepEncoder) -> None:
        enc.dispatch(self.partial_pipeline, self.partial_group, self.n_partials)
        enc.dispatch(self.final_pipeline, self.final_group, 1)


class Optimizer:
    """Clip, guard and update `params` from `grads` (then zero `grads`), all on the device.

    Call `set_hyper(lr, max_grad_norm)` before submitting each step's encoder (it writes the uniform).
    """

    def __init__(self, ctx: GpuContext, config: OptimizerConfig, params, grads, P: int, stats,
                 label: str = "optimizer"):
        for name, buf in (("params", params), ("grads", grads)):
            if P < 1 or buf.size < 4 * P:
                raise ValueError(f"{name} buffer {buf.label!r} holds {buf.size} bytes; P={P} needs {4 * P}")
        _check_stats(stats)
        if config.name == "adamw8bit" and (config.block_size < 4 or config.block_size % 4):
            raise ValueError(f"8-bit AdamW needs block_size a positive multiple of 4, got {config.block_size}")
        self.ctx, self.config, self.P, self.stats, self.label = ctx, config, P, stats, label
        self.x, self.y, self.row_stride = grid_1d(ctx, P)
        self.n_blocks = -(-P // config.block_size)
        self.blocks_x = min(self.n_blocks, ctx.max_workgroups)
        self.blocks_y = -(-self.n_blocks // self.blocks_x)
        self.uniform = ctx.buffer(HYPER.nbytes, f"{label}.hyper", UNIFORM)
        self.state_buffers: dict[str, object] = {}
        # [P] params before the last applied update (the update kernels copy them); `remember` sets it.
        self.previous = ctx.buffer(4 * P, f"{label}.previous")
        resources = {0: self.uniform, 1: stats, 2: grads, 3: params, 11: self.previous}
        if config.name == "adamw":
            self.state_buffers = {"m": ctx.buffer(4 * P, f"{label}.m"), "v": ctx.buffer(4 * P, f"{label}.v")}
            resources.update({5: self.state_buffers["m"], 6: self.state_buffers["v"]})
        elif config.name == "adamw8bit":
            words = -(-P // 4)
            self.state_buffers = {"m_codes": ctx.buffer(4 * words, f"{label}.m_codes"),
                                  "v_codes": ctx.buffer(4 * words, f"{label}.v_codes"),
                                  "scales": ctx.buffer(8 * self.n_blocks, f"{label}.scales")}
            self.qmap = ctx.upload(np.concatenate([SIGNED_MAP, UNSIGNED_MAP]), f"{label}.qmap")
            resources.update({7: self.state_buffers["m_codes"], 8: self.state_buffers["v_codes"],
                              9: self.state_buffers["scales"], 10: self.qmap})
        self.prepare_pipeline = ctx.pipeline("optimizer", "optimizer_prepare")
        self.prepare_group = ctx.bind_group(self.prepare_pipeline, {0: self.uniform, 1: stats}, f"{label}.prepare")
        self.update_pipeline = ctx.pipeline("optimizer", f"{config.name}_update")
        self.update_group = ctx.bind_group(self.update_pipeline, resources, f"{label}.update")
        self.set_hyper(0.0, 0.0)

    def remember(self, flat: np.ndarray) -> None:
        """Set `previous` (params before the last applied update) to `flat` [P]: after params were loaded, no
        update has been applied to them yet."""
        self.ctx.write(self.previous, np.ascontiguousarray(flat, np.float32))

    def set_hyper(self, lr: float, max_grad_norm: float) -> None:
        if not (math.isfinite(lr) and lr >= 0 and math.isfinite(max_grad_norm) and max_grad_norm >= 0):
            raise ValueError(f"lr and max_grad_norm must be finite and >= 0, got {lr}, {max_grad_norm}")
        c = self.config
        self.ctx.write(self.uniform, pack_hyper(
            lr=lr, max_norm=max_grad_norm, beta1=c.beta1, beta2=c.beta2, eps=c.eps, weight_decay=c.weight_decay,
            n=self.P, row_stride=self.row_stride, block_size=c.block_size, n_blocks=self.n_blocks,
            blocks_per_row=self.blocks_x))

    def encode(self, enc: StepEncoder) -> None:
        enc.dispatch(self.prepare_pipeline, self.prepare_group, 1)
        if self.config.name == "adamw8bit":
            enc.dispatch(self.update_pipeline, self.update_group, self.blocks_x, self.blocks_y)
        else:
            enc.dispatch(self.update_pipeline, self.update_group, self.x, self.y)

    @property
    def memory_bytes(self) -> int:
        """Bytes of optimizer state on the device (moments or codes + scales, map, uniform)."""
        extra = self.qmap.size if self.config.name == "adamw8bit" else 0
        return sum(b.size for b in self.state_buffers.values()) + extra + self.uniform.size + self.previous.size

    # ---- checkpoints: same keys, dtypes and layout as engine.backends.optimizers ------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        ctx, P = self.ctx, self.P
        out = {"step": np.array(int(ctx.read(self.stats, count=5)[4]), np.int64)}
        if self.config.name == "adamw":
            out["m"] = ctx.read(self.state_buffers["m"], count=P)
            out["v"] = ctx.read(self.state_buffers["v"], count=P)
        elif self.config.name == "adamw8bit":
            # Reads are whole 4-byte words (wgpu copies in multiples of 4); the codes past P are padding.
            out["m_codes"] = ctx.read(self.state_buffers["m_codes"], np.uint8, count=-(-P // 4) * 4)[:P]
            out["v_codes"] = ctx.read(self.state_buffers["v_codes"], np.uint8, count=-(-P // 4) * 4)[:P]
            scales = ctx.read(self.state_buffers["scales"], count=2 * self.n_blocks)
            out["m_scale"], out["v_scale"] = scales[:self.n_blocks], scales[self.n_blocks:]
        return out

    def _shapes(self) -> dict[str, tuple[tuple[int, ...], type]]:
        P, nb = self.P, self.n_blocks
        return {"adamw": {"m": ((P,), np.float32), "v": ((P,), np.float32)},
                "adamw8bit": {"m_codes": ((P,), np.uint8), "v_codes": ((P,), np.uint8),
                              "m_scale": ((nb,), np.float32), "v_scale": ((nb,), np.float32)},
                "sgd": {}}[self.config.name]

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        shapes = self._shapes()
        if set(state) != {"step", *shapes}:
            raise ValueError(f"optimizer state has keys {sorted(state)}; expected {sorted({'step', *shapes})}")
        arrays = {}
        for key, (shape, dtype) in shapes.items():
            value = np.asarray(state[key])
            if value.shape != shape or value.dtype != dtype:
                raise ValueError(f"optimizer state {key!r} is {value.dtype}{list(value.shape)}; "
                                 f"expected {np.dtype(dtype)}{list(shape)}")
            arrays[key] = value
        step = int(state["step"])
        if not 0 <= step < 2 ** 24:   # stats[4] is an f32 counter: exact up to 2^24
            raise ValueError(f"optimizer step {step} is outside 0..{2 ** 24 - 1}")
        ctx = self.ctx
        if self.config.name == "adamw":
            ctx.write(self.state_buffers["m"], arrays["m"])
            ctx.write(self.state_buffers["v"], arrays["v"])
        elif self.config.name == "adamw8bit":
            pad = (-self.P) % 4               # codes are packed 4 per u32 word; writes must be whole words
            for key in ("m_codes", "v_codes"):
                ctx.write(self.state_buffers[key], np.concatenate([arrays[key], np.zeros(pad, np.uint8)]))
            ctx.write(self.state_buffers["scales"], np.concatenate([arrays["m_scale"], arrays["v_scale"]]))
        ctx.write(self.stats, np.array([step], np.float32), offset=16)
