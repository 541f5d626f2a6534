"""Helpers the kernel twins share: bind groups by binding number, and 1-D grids folded past the dispatch limit."""
from __future__ import annotations

import numpy as np

from engine.backends.wgpu.context import UNIFORM, GpuContext


def bind(ctx: GpuContext, pipeline, bindings: dict, label: str):
    """Bind group 0 from {binding number: buffer or (buffer, byte offset, byte size)}.

    Entry points of one shader use different subsets of its bindings (layout="auto" keeps only those used), so
    bindings are given by number rather than position.
    """
    entries = []
    for number, b in sorted(bindings.items()):
        buf, offset, size = b if isinstance(b, tuple) else (b, 0, b.size)
        entries.append({"binding": number, "resource": {"buffer": buf, "offset": offset, "size": size}})
    return ctx.device.create_bind_group(label=label, layout=pipeline.get_bind_group_layout(0), entries=entries)


def uniform(ctx: GpuContext, label: str, *words) -> object:
    """A uniform buffer of 32-bit words (ints become u32, floats f32), padded to 16 bytes as WGSL wants."""
    raw = b"".join(np.array([w], np.float32 if isinstance(w, float) else np.uint32).tobytes() for w in words)
    raw += b"\0" * (-len(raw) % 16)
    return ctx.upload(np.frombuffer(raw, np.uint8), label, UNIFORM)


def grid_rows(ctx: GpuContext, rows: int) -> tuple[int, int]:
    """Workgroups (x, y) for one workgroup per row, folded into y past the per-dimension limit."""
    x = max(1, min(rows, ctx.max_workgroups))
    return x, -(-rows // x)
